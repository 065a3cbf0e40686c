"""Writing videos safely: a temporary file beside the target, renamed into place only when complete."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from diffusers.utils import export_to_video

from wan.files import atomic_write, check_target


def check_output_path(path: str | Path, overwrite: bool = False) -> Path:
    """Fail early (before any model loads) on an output path that cannot be written."""
    return check_target(path, ".mp4", "output", overwrite)


def write_video(frames: np.ndarray, path: str | Path, fps: int = 16) -> Path:
    """Encode frames [F, H, W, 3] (floats in [0, 1]) as MP4; the file appears whole or not at all."""
    return atomic_write(path, lambda tmp: export_to_video(list(frames), tmp, fps=fps, quality=8))
