"""`--prompts FILE`: many videos from one loaded (and compiled) model, the file checked whole before it loads.

FILE is plain text, one prompt a line (blank lines skipped), or, ending in `.jsonl`, one JSON object a line
with `prompt` and optionally `negative_prompt`, `seed` and `output`. An entry without `output` is numbered
after --output: `fox.mp4` gives `fox-1.mp4`, `fox-2.mp4`, ... (zero-padded to the entry count).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from wan.generate.settings import GenerationSettings
from wan.io.video import check_output_path

ENTRY_KEYS = ("prompt", "negative_prompt", "seed", "output")


@dataclasses.dataclass(frozen=True)
class Job:
    """One video to make: its settings, its output file, and where it was asked for (for error lines)."""

    settings: GenerationSettings
    output: Path
    where: str


@dataclasses.dataclass(frozen=True)
class Entry:
    line: int
    values: dict[str, Any]


def read_prompts(path: Path) -> list[Entry]:
    """The entries of a prompts file, each with a non-empty `prompt`; anything else is a one-line ValueError."""
    if not path.is_file():
        raise ValueError(f"prompts: file not found: {path}")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise ValueError(f"prompts: {path} is not a text file (byte 0x{err.object[err.start]:02x} at offset "
                         f"{err.start} is not UTF-8)") from None
    jsonl = path.suffix.lower() == ".jsonl"
    entries = []
    for number, text in enumerate(lines, 1):
        if not text.strip():
            continue
        where = f"prompts: {path} line {number}"
        values = _json_entry(text, where) if jsonl else {"prompt": text.strip()}
        entries.append(Entry(number, values))
    if not entries:
        raise ValueError(f"prompts: {path} holds no prompt; write one prompt a line (or JSON objects in a .jsonl)")
    return entries


def _json_entry(text: str, where: str) -> dict[str, Any]:
    try:
        values = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{where} is not valid JSON: {err.msg} at column {err.colno}") from None
    if not isinstance(values, dict):
        raise ValueError(f"{where} must be a JSON object such as {{\"prompt\": \"a cat\"}}, got {text.strip()[:80]}")  # noqa: TRY004
    for key in values:
        if key not in ENTRY_KEYS:
            raise ValueError(f"{where}: unknown key {key!r}; allowed keys: {', '.join(ENTRY_KEYS)}")
    if "prompt" not in values:
        raise ValueError(f"{where} has no \"prompt\"")
    if "output" in values and not (isinstance(values["output"], str) and values["output"]):
        raise ValueError(f"{where}: output {values['output']!r} must be a file path (a non-empty string)")
    return values


def plan_jobs(path: Path, entries: list[Entry], settings: GenerationSettings, output: Path,
              overwrite: bool) -> list[Job]:
    """One Job per entry: `settings` with the entry's prompt, negative prompt and seed, each checked as a single
    run's are; outputs named or numbered after `output`, distinct and writable (existing ones only with
    `overwrite`). Errors are one line that names the file and line."""
    width = len(str(len(entries)))
    jobs, taken = [], {}
    for index, entry in enumerate(entries, 1):
        where = f"prompts: {path} line {entry.line}"
        values = dict(entry.values)
        named = values.pop("output", None)
        target = Path(named) if named else output.with_name(f"{output.stem}-{index:0{width}d}{output.suffix}")
        try:
            job_settings = dataclasses.replace(settings, **values)
            job_settings.validate()
            target = check_output_path(target, overwrite)
        except ValueError as err:
            raise ValueError(f"{where}: {err}") from None
        key = target.resolve()
        if key in taken:
            raise ValueError(f"{where}: output {target} is also line {taken[key]}'s; give each entry its own")
        taken[key] = entry.line
        jobs.append(Job(job_settings, target, f"{path} line {entry.line}"))
    return jobs
