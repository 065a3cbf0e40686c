"""A folder of training clips: find the videos and their captions, and read one as the model's input.

Captions come from a same-name `.txt` beside each video (musubi-tuner's and ai-toolkit's convention) or a
`metadata.jsonl` with `file_name` and `text` per line (Hugging Face's video-folder convention); the
`.txt` wins where both exist.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import imageio.v2 as imageio
import numpy as np
import torch
import torch.nn.functional as F

VIDEO_SUFFIXES = (".mp4", ".mov", ".webm", ".mkv", ".avi")
#: images: one-frame samples (text to image, as Wan's pretraining mixed them in)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


@dataclasses.dataclass(frozen=True)
class Clip:
    path: Path
    caption: str | None  # None: no caption found (the clip is skipped with that reason)

    @property
    def is_image(self) -> bool:
        return self.path.suffix.lower() in IMAGE_SUFFIXES


class ClipError(ValueError):
    """A clip that cannot be used (unreadable, too short, no caption): skipped, with this one-line reason."""


def _metadata_captions(folder: Path) -> dict[str, str]:
    path = folder / "metadata.jsonl"
    if not path.is_file():
        return {}
    captions = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            captions[str(entry["file_name"])] = str(entry["text"])
        except (json.JSONDecodeError, KeyError, TypeError):
            raise ValueError(f"data: {path} line {number} is not a JSON object with file_name and text") from None
    return captions


def find_clips(folder: str | Path) -> list[Clip]:
    """The videos under `folder` (recursively, sorted) with their captions; one-line ValueError if there are none."""
    folder = Path(folder).expanduser()
    if folder.is_file():
        raise ValueError(f"data: {folder} is a file; give the folder that holds the clips (videos with a .txt "
                         "caption each, or a metadata.jsonl)")
    if not folder.is_dir():
        raise ValueError(f"data: folder {folder} does not exist")
    metadata = _metadata_captions(folder)
    videos = sorted(p for p in folder.rglob("*") if p.suffix.lower() in VIDEO_SUFFIXES + IMAGE_SUFFIXES
                    and p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts))
    if not videos:
        raise ValueError(f"data: folder {folder} holds no video or image (allowed: "
                         f"{', '.join(VIDEO_SUFFIXES + IMAGE_SUFFIXES)})")
    clips = []
    for video in videos:
        txt = video.with_suffix(".txt")
        caption = txt.read_text().strip() if txt.is_file() else metadata.get(video.relative_to(folder).as_posix())
        clips.append(Clip(video, caption or None))
    return clips


def frame_indices(frames: int, fps: float, source_fps: float, offset: int = 0) -> list[int]:
    """Source frame of each of `frames` frames at `fps`, starting `offset` frames (at `fps`) in: the frame showing
    time (offset + i) / fps."""
    return [math.floor((offset + i) * source_fps / fps + 1e-6) for i in range(frames)]


def clip_size(path: str | Path) -> tuple[int, int]:
    """(height, width) of a clip's frames or an image; ClipError if unreadable."""
    try:
        if Path(path).suffix.lower() in IMAGE_SUFFIXES:
            from PIL import Image

            with Image.open(path) as image:
                return image.height, image.width
        with imageio.get_reader(path, "ffmpeg") as reader:
            width, height = reader.get_meta_data()["size"]
            return int(height), int(width)
    except Exception as err:  # noqa: BLE001 - whatever the decoder says, the clip is unreadable
        raise ClipError(f"unreadable ({type(err).__name__})") from None


def nearest_bucket(size: tuple[int, int], buckets: list[list[int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is nearest `size`'s (in log ratio: 2:1 and 1:2 are as far from 1:1)."""
    ratio = math.log(size[1] / size[0])
    height, width = min(buckets, key=lambda b: abs(math.log(b[1] / b[0]) - ratio))
    return height, width


def clip_length(path: str | Path, fps: int) -> int:
    """How many frames at `fps` the clip at `path` holds (its duration at that rate); ClipError if unreadable."""
    try:
        with imageio.get_reader(path, "ffmpeg") as reader:
            source_fps = float(reader.get_meta_data().get("fps") or 0)
            count = reader.count_frames()
    except Exception as err:  # noqa: BLE001 - whatever the decoder says, the clip is unreadable
        raise ClipError(f"unreadable ({type(err).__name__})") from None
    if source_fps <= 0:
        raise ClipError("unreadable (no frame rate in the file)")
    return math.floor((count - 1) * fps / source_fps + 1e-6) + 1


def window_offsets(length: int, frames: int, sampling: str, samples: int, stride: int | None) -> list[int]:
    """The first frame (at the training fps) of each sample drawn from a clip `length` frames long: `start` one at 0,
    `uniform` `samples` evenly spread over the clip, `windows` one every `stride` frames (at most `samples`, where it
    is more than 1); none if the clip is shorter than `frames`."""
    last = length - frames
    if last < 0:
        return []
    if sampling == "start":
        return [0]
    if sampling == "uniform":
        count = min(samples, last + 1)
        return sorted({round(i * last / max(count - 1, 1)) for i in range(count)})
    offsets = list(range(0, last + 1, stride or frames))
    return offsets[:samples] if samples > 1 else offsets


def resize_center_crop(video: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """[F, 3, h, w] scaled (antialiased) so that it covers height x width, then the centre cut out."""
    h, w = video.shape[-2:]
    scale = max(height / h, width / w)
    size = (max(height, round(h * scale)), max(width, round(w * scale)))
    video = F.interpolate(video, size=size, mode="bilinear", antialias=True, align_corners=False)
    top, left = (size[0] - height) // 2, (size[1] - width) // 2
    return video[..., top:top + height, left:left + width]


def read_image(path: str | Path, height: int, width: int) -> torch.Tensor:
    """An image as a one-frame clip [3, 1, H, W] in [-1, 1], scaled and centre-cropped as clips are."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            pixels = np.asarray(image.convert("RGB"))
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise ClipError(f"unreadable ({type(err).__name__})") from None
    frame = torch.from_numpy(pixels.copy()).permute(2, 0, 1)[None].float() / 127.5 - 1
    return resize_center_crop(frame, height, width).clamp(-1, 1).permute(1, 0, 2, 3).contiguous()


def read_clip(path: str | Path, height: int, width: int, frames: int, fps: int, offset: int = 0) -> torch.Tensor:
    """`frames` consecutive frames at `fps`, `offset` frames (at `fps`) from the clip's start, as [3, F, H, W] floats
    in [-1, 1] (the VAE's input).

    ClipError if the file cannot be read or is shorter than frames / fps seconds.
    """
    try:
        reader = imageio.get_reader(path, "ffmpeg")
    except Exception as err:  # noqa: BLE001 - whatever the decoder says, the clip is unreadable
        raise ClipError(f"unreadable ({type(err).__name__}: {str(err).strip().splitlines()[0][:200]})") from None
    with reader:
        source_fps = float(reader.get_meta_data().get("fps") or 0)
        if source_fps <= 0:
            raise ClipError("unreadable (no frame rate in the file)")
        wanted = frame_indices(frames, fps, source_fps, offset)
        picked: dict[int, np.ndarray] = {}
        seen = 0
        try:
            for index, frame in enumerate(reader):
                seen = index + 1
                if index in wanted:
                    picked[index] = frame[..., :3]
                if index >= wanted[-1]:
                    break
        except Exception as err:  # noqa: BLE001 - a corrupt stream ends the clip like any decoder error
            raise ClipError(f"unreadable ({type(err).__name__})") from None
    if wanted[-1] not in picked:
        raise ClipError(f"too short: {seen} frames at {source_fps:g} fps; needs {frames} frames at {fps} fps")
    video = torch.from_numpy(np.stack([picked[i] for i in wanted])).permute(0, 3, 1, 2).float() / 127.5 - 1
    return resize_center_crop(video, height, width).clamp(-1, 1).permute(1, 0, 2, 3).contiguous()
