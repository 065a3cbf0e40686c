"""A training run's output folder: what is in it, the guard against mixing two runs, and its JSONL log.

    OUT/run.json            the run's settings (marks the folder as a run)
    OUT/log.jsonl           one JSON object per optimizer step (rank 0)
    OUT/checkpoints/        step-NNNNNNNN/ folders (wan/checkpoints.py)
    OUT/lora/ or OUT/transformer/   the result: a diffusers LoRA, or a diffusers transformer folder
    OUT/validation/         validation videos
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from wan.files import atomic_write

RUN_FILE = "run.json"
LOG_FILE = "log.jsonl"
OWNED = (RUN_FILE, LOG_FILE, "checkpoints", "lora", "transformer", "validation", "loss.png")


def check_output(folder: str | Path, resume: bool, overwrite: bool) -> Path:
    """One-line ValueError unless `folder` may hold this run: new or empty, or a run with --resume / --overwrite."""
    folder = Path(folder).expanduser()
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"output: {folder} is a file; give a folder for the run")
    if resume and overwrite:
        raise ValueError("output: --resume and --overwrite exclude each other; continue the run or start over")
    if not folder.is_dir() or not any(folder.iterdir()):
        return folder
    if not (folder / RUN_FILE).is_file():
        raise ValueError(f"output: {folder} is not empty and holds no training run ({RUN_FILE}); "
                         "choose a new or empty folder")
    if not (resume or overwrite):
        raise ValueError(f"output: {folder} holds another run; pass --resume to continue it or --overwrite to "
                         "start over (deletes its checkpoints)")
    return folder


def clear_run(folder: Path) -> None:
    """--overwrite: delete what a run wrote (and nothing else)."""
    for name in OWNED:
        path = folder / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def write_run_file(folder: Path, settings: dict[str, Any]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write(folder / RUN_FILE, lambda tmp: Path(tmp).write_text(json.dumps(settings, indent=2) + "\n"))


def read_log(folder: Path) -> list[dict[str, Any]]:
    path = folder / LOG_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def truncate_log(folder: Path, step: int) -> None:
    """Keep the log lines of steps up to `step` (a resumed run writes the later ones again)."""
    kept = [json.dumps(entry) + "\n" for entry in read_log(folder) if entry["step"] <= step]
    atomic_write(folder / LOG_FILE, lambda tmp: Path(tmp).write_text("".join(kept)))


def append_log(folder: Path, entry: dict[str, Any]) -> None:
    with open(folder / LOG_FILE, "a") as f:
        f.write(json.dumps(entry) + "\n")
