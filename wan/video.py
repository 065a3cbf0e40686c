"""Writing videos safely: a temporary file beside the target, renamed into place only when complete."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
from diffusers.utils import export_to_video


def check_output_path(path: str | Path, overwrite: bool = False) -> Path:
    """Fail early (before any model loads) on an output path that cannot be written."""
    path = Path(path).expanduser()
    if path.suffix.lower() != ".mp4":
        raise ValueError(f"output: {path} must end in .mp4")
    if path.is_dir():
        raise ValueError(f"output: {path} is a folder; give a file path ending in .mp4")
    if path.exists() and not overwrite:
        raise ValueError(f"output: {path} exists; pass --overwrite to replace it or choose another path")
    folder = path.parent
    if not folder.is_dir():
        raise ValueError(f"output: folder {folder} does not exist")
    try:  # a real write test: permission bits say nothing for root or read-only mounts
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as err:
        raise ValueError(f"output: folder {folder} is not writable ({err.strerror})") from None
    return path


def write_video(frames: np.ndarray, path: str | Path, fps: int = 16) -> Path:
    """Encode frames [F, H, W, 3] (floats in [0, 1]) as MP4; the file appears whole or not at all."""
    path = Path(path).expanduser()
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".part.mp4", dir=path.parent)
    os.close(fd)
    try:
        export_to_video(list(frames), tmp, fps=fps, quality=8)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path
