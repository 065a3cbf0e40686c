"""Writing videos safely: MP4 (encoded) or .npy (raw frames, no encoder), whole or not at all, never lost.

An MP4's encoder is checked before any model loads; if encoding still fails after a generation, the
frames go to a .npy beside the target instead, since they took the whole run to make.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from wan.io.files import atomic_write, check_target

SUFFIXES = (".mp4", ".npy")


def check_encoder() -> None:
    """One-line ValueError unless imageio's ffmpeg backend (what export_to_video encodes MP4 with) works."""
    try:
        import imageio_ffmpeg

        imageio_ffmpeg.get_ffmpeg_exe()
    except (ImportError, RuntimeError) as err:
        raise ValueError(f"output: writing MP4 needs ffmpeg ({type(err).__name__}: {str(err).splitlines()[0]}); "
                         "install it with `pip install imageio-ffmpeg`, or write raw frames with --output NAME.npy"
                         ) from None


def check_output_path(path: str | Path, overwrite: bool = False) -> Path:
    """Fail early (before any model loads) on an output that cannot be written: bad path, or no MP4 encoder."""
    path = Path(path).expanduser()
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise ValueError(f"output: {path} must end in .mp4 (video) or .npy (raw frames, no encoder needed)")
    path = check_target(path, suffix, "output", overwrite)
    if suffix == ".mp4":
        check_encoder()
    return path


#: x264's preset: several times faster to encode than its default (medium) at the same quality setting, for files of
#: about the same size and fidelity (BENCHMARKS.md, "With the faster MP4 writer")
X264_PRESET = "veryfast"


def export_to_video(frames: np.ndarray, path: str, fps: int, quality: int) -> None:
    """diffusers' export_to_video (imageio's ffmpeg writer, the same quality and macro block size, the same 8-bit
    frames) with the frames made 8-bit by torch on every core and x264's faster preset."""
    import imageio
    import torch

    video = torch.from_numpy(np.asarray(frames, dtype=np.float32)).mul(255).to(torch.uint8).numpy()
    with imageio.get_writer(path, fps=fps, quality=quality, macro_block_size=16,
                            ffmpeg_params=["-preset", X264_PRESET]) as writer:
        for frame in video:
            writer.append_data(frame)


def _save_frames(frames: np.ndarray, path: str | Path) -> Path:
    def save(tmp: str) -> None:
        with open(tmp, "wb") as f:  # a file object: np.save would append .npy to a name
            np.save(f, np.asarray(frames, dtype=np.float32))

    return atomic_write(path, save)


def write_video(frames: np.ndarray, path: str | Path, fps: int = 16) -> Path:
    """Write frames [F, H, W, 3] (floats in [0, 1]) as MP4, or as float32 .npy if `path` ends in .npy."""
    if Path(path).suffix.lower() == ".npy":
        return _save_frames(frames, path)
    return atomic_write(path, lambda tmp: export_to_video(frames, tmp, fps=fps, quality=8))


def _free_beside(path: Path) -> Path:
    """`path` with suffix .npy, or NAME.1.npy, NAME.2.npy, ... if taken: a fallback never replaces a file."""
    candidate, n = path.with_suffix(".npy"), 0
    while candidate.exists():
        n += 1
        candidate = path.with_suffix(f".{n}.npy")
    return candidate


def write_video_or_frames(frames: np.ndarray, path: str | Path, fps: int = 16) -> tuple[Path, str | None]:
    """`write_video`, or if that fails, the raw frames in a .npy beside `path`.

    Returns the file written and None, or the .npy written and the one-line reason the video was not.
    """
    path = Path(path).expanduser()
    try:
        return write_video(frames, path, fps), None
    except Exception as err:  # noqa: BLE001 - whatever the encoder raises, the frames must survive it
        reason = str(err).strip().splitlines()[0] if str(err).strip() else ""
        return _save_frames(frames, _free_beside(path)), f"{type(err).__name__}: {reason}"[:300]
