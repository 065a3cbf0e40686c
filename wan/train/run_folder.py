"""A training run's output folder: what is in it, the guard against mixing two runs, and its JSONL log.

    OUT/run.json            the run's settings (marks the folder as a run)
    OUT/log.jsonl           one JSON object per optimizer step (rank 0)
    OUT/checkpoints/        step-NNNNNNNN/ folders (wan/train/checkpoints.py)
    OUT/lora/ or OUT/transformer/   the result: a diffusers LoRA, or a diffusers transformer folder
    OUT/validation/         validation videos
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from wan.io.files import atomic_write, check_folder

RUN_FILE = "run.json"
LOG_FILE = "log.jsonl"
OWNED = (RUN_FILE, LOG_FILE, "checkpoints", "lora", "transformer", "validation", "loss.png")


def check_output(folder: str | Path, resume: bool, overwrite: bool) -> Path:
    """One-line ValueError unless `folder` may hold this run: new or empty, or a run with --resume / --overwrite."""
    folder = Path(folder).expanduser()
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"output: {folder} is a file; give a folder for the run")
    check_folder(folder, "output")
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


#: settings a resumed run may change: train for longer, validate differently
RESUMABLE_CHANGES = ("training.steps", "training.validation", "training.tracker")


def check_resume(folder: Path, settings: dict[str, Any]) -> None:
    """One-line ValueError where --resume would continue the run in `folder` under other settings than it was
    started with (the model, the data, the sparsity or the training section), but for RESUMABLE_CHANGES."""
    before = _flat(json.loads((folder / RUN_FILE).read_text()))
    now = _flat(json.loads(json.dumps(settings)))  # tuples as JSON lists, like the file
    changed = sorted(key for key in before.keys() | now.keys() if before.get(key) != now.get(key)
                     and not key.startswith(RESUMABLE_CHANGES))
    if changed:
        shown = "; ".join(f"{key}: {before.get(key)!r} -> {now.get(key)!r}" for key in changed[:3])
        raise ValueError(f"--resume: the run in {folder} was started with other settings ({shown}"
                         f"{'; ...' if len(changed) > 3 else ''}); resume with its config, or start over with "
                         "--overwrite")


def _flat(settings: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in settings.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


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
