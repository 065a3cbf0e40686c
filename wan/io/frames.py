"""Wan VACE's control inputs, read whole before any model loads: a video and its mask (an MP4 or another format
imageio's ffmpeg reads, or frames in a .npy as generate writes them), as PIL frames of the output's size, and
reference images (which models take them: wan.models.spec, checked by wan.generate.plan)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from wan.io.images import read_image

if TYPE_CHECKING:
    from PIL import Image

_WHAT = "give a video file (MP4, ...) or its frames in a .npy, [F, H, W, 3] or [F, H, W]"


def _load_npy(path: Path) -> np.ndarray:
    """Frames [F, H, W, 3] or [F, H, W] (a mask) as uint8: floats are in [0, 1], as generate writes them."""
    frames = np.load(path, allow_pickle=False)
    if frames.ndim not in (3, 4) or (frames.ndim == 4 and frames.shape[-1] != 3) or not frames.size:
        raise ValueError(f"frames of shape {list(frames.shape)}")
    if frames.dtype == np.uint8:
        return frames
    return (np.clip(frames.astype(np.float32), 0, 1) * 255).round().astype(np.uint8)


def _load_video(path: Path) -> np.ndarray:
    import imageio.v2 as imageio  # its ffmpeg plugin decodes the video

    return np.stack(imageio.mimread(path, memtest=False))


def read_frames(path: str | Path, flag: str) -> np.ndarray:
    """Every frame of the video at `path`, uint8 [F, H, W, 3] (or [F, H, W]); a file that is missing or cannot be
    read as frames is a one-line ValueError naming `flag` (--video, --mask)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ValueError(f"{flag}: {path} {'is not a file' if path.exists() else 'does not exist'}; {_WHAT}")
    try:
        return _load_npy(path) if path.suffix.lower() == ".npy" else _load_video(path)
    except Exception as err:  # noqa: BLE001 - whatever the decoder raises, the user gets one line
        reason = " ".join(str(err).split())[:200] or type(err).__name__
        raise ValueError(f"{flag}: {path} cannot be read as frames ({reason}); {_WHAT}") from None


def control_frames(path: str | Path, flag: str, frames: int, size: tuple[int, int] | None, mask: bool
                   ) -> list[Image.Image]:
    """The `frames` frames of the video at `path` resized to `size` (width, height; None: as they are), RGB, or
    greyscale for a `mask` (nearest neighbour: its edges stay hard). One frame a generated frame: another count is a
    one-line ValueError."""
    from PIL import Image

    pixels = read_frames(path, flag)
    if len(pixels) != frames:
        raise ValueError(f"{flag}: {path} has {len(pixels)} frames and the video {frames} (--frames); give a video "
                         f"of {frames} frames, or as many --frames as it has (4k+1)")
    mode, resample = ("L", Image.NEAREST) if mask else ("RGB", Image.BICUBIC)
    images = [Image.fromarray(frame).convert(mode) for frame in pixels]
    return images if size is None else [image.resize(size, resample) for image in images]


def pipeline_controls(settings: Any, face_size: int | None = None) -> dict[str, Any]:
    """The control arguments of a WanVACEPipeline call for `settings` (its `video`, `mask`, `reference_images` and
    `conditioning_scale`), or of a WanAnimatePipeline call where it has a pose video (`animate_controls`): none
    where none is given."""
    if settings.pose_video is not None:
        return animate_controls(settings, face_size)
    controls: dict[str, Any] = {}
    size = (settings.width, settings.height)
    for name, flag in (("video", "--video"), ("mask", "--mask")):
        if getattr(settings, name) is not None:
            controls[name] = control_frames(getattr(settings, name), flag, settings.frames, size, name == "mask")
    if settings.reference_images:
        controls["reference_images"] = [read_image(path, "--reference-image") for path in settings.reference_images]
    if settings.conditioning_scale is not None:
        controls["conditioning_scale"] = float(settings.conditioning_scale)
    return controls


def animate_controls(settings: Any, face_size: int | None) -> dict[str, Any]:
    """A WanAnimatePipeline call's controls: the pose video at the video's size, the face video at `face_size`
    pixels square (its motion encoder's; None: as they are), the whole video one segment of `frames`, and with
    `video` and `mask` its replacement mode (the background video and the character's mask)."""
    size = (settings.width, settings.height)
    face = None if face_size is None else (face_size, face_size)
    controls = {"pose_video": control_frames(settings.pose_video, "--pose-video", settings.frames, size, False),
                "face_video": control_frames(settings.face_video, "--face-video", settings.frames, face, False),
                "segment_frame_length": settings.frames}
    if settings.video is not None and settings.mask is not None:
        controls.update(mode="replace",
                        background_video=control_frames(settings.video, "--video", settings.frames, size, False),
                        mask_video=control_frames(settings.mask, "--mask", settings.frames, size, True))
    return controls
