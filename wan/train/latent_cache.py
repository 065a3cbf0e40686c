"""Precomputed training inputs: each clip encoded once by the model's VAE and text encoder, one safetensors a clip.

An entry's name holds a hash of everything its tensors depend on (the clip's path, size and modification
time, its caption, the training size, frames and fps, the model), so a changed clip or setting never reuses a
stale entry: it simply has another name. A clip that cannot be used gets a `.skip.json` under the same key
(its reason), so it is reported again without being decoded again. For image-to-video models an entry also holds what
WanImageToVideoPipeline conditions on, with the clip's first frame as the image.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from wan.io.files import atomic_write
from wan.models.spec import MAX_TEXT_TOKENS, T2V, ModelSpec
from wan.train.clips import (
    Clip,
    ClipError,
    clip_length,
    clip_size,
    nearest_bucket,
    read_clip,
    read_image,
    window_offsets,
)
from wan.train.config import TrainingConfig

CACHE_VERSION = 1  # bump when what an entry holds changes


@dataclasses.dataclass
class CacheReport:
    entries: list[Path]
    skipped: list[tuple[Path, str]]  # clip, reason
    encoded: int  # entries written by this call (the rest were reused)


def cache_key(clip: Clip, training: TrainingConfig, model: str, spec: ModelSpec = T2V, offset: int = 0,
              size: tuple[int, int] | None = None) -> str:
    stat = clip.path.stat()
    fields = {"clip": str(clip.path.resolve()), "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns,
              "caption": clip.caption, "height": training.height, "width": training.width,
              "frames": training.frames, "fps": training.fps, "model": model, "version": CACHE_VERSION}
    if spec.image_condition:  # only there: the keys of text-to-video entries stay what they were
        fields["condition"] = "first frame"
    if offset:  # a window past the start: the keys of the first window stay what they were
        fields["offset"] = offset
    if size is not None:  # a bucket's size
        fields["height"], fields["width"] = size
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:20]


def entry_path(cache_dir: Path, clip: Clip, key: str) -> Path:
    return cache_dir / f"{clip.path.stem}-{key}.safetensors"


def _skip_path(entry: Path) -> Path:
    return entry.with_suffix(".skip.json")


def normalize_latents(mean_std: tuple[list[float], list[float]], latents: torch.Tensor) -> torch.Tensor:
    """The VAE's latents in the space the transformer works in: (z - mean) / std per channel (WanPipeline's inverse)."""
    mean, std = (torch.tensor(v, dtype=latents.dtype, device=latents.device).view(-1, 1, 1, 1) for v in mean_std)
    return (latents - mean) / std


@torch.no_grad()
def encode_clip(encoders, video: torch.Tensor, caption: str, spec: ModelSpec = T2V) -> dict[str, torch.Tensor]:
    """Latents [C, F', H', W'] (float32) and text embeddings [512, D] of one clip, on the CPU; for an image-to-video
    `spec` also its first frame's condition (`image_inputs`). A Kandinsky 5 clip's are its own
    (wan.train.kandinsky5_inputs)."""
    if spec.kandinsky5:
        from wan.train.kandinsky5_inputs import encode_clip as encode_kandinsky5

        return encode_kandinsky5(encoders, video, caption)
    vae = encoders.vae
    latents = vae.encode(video[None].to(vae.device, vae.dtype)).latent_dist.mode()[0].float()
    latents = normalize_latents((vae.config.latents_mean, vae.config.latents_std), latents)
    embeds, _ = encoders.encode_prompt(caption, do_classifier_free_guidance=False, max_sequence_length=MAX_TEXT_TOKENS,
                                       device=encoders.text_encoder.device)
    tensors = {"latents": latents, "prompt_embeds": embeds[0]}
    if spec.image_condition:
        tensors.update(image_inputs(encoders, video, latents, spec.image_embeds))
    return {name: t.cpu().contiguous() for name, t in tensors.items()}


def image_inputs(encoders, video: torch.Tensor, latents: torch.Tensor, clip_tokens: bool) -> dict[str, torch.Tensor]:
    """What WanImageToVideoPipeline feeds the transformer for the clip's first frame as the image: `condition`
    [4 + C, F', H', W'], the frame mask and the latents of the frame followed by black (its prepare_latents), and
    with `clip_tokens` the CLIP image tokens `image_embeds` [N, D] (its encode_image)."""
    frame = video[None, :, 0]  # [1, 3, H, W] in [-1, 1]: what the pipeline's video_processor.preprocess makes of it
    _, frames, height, width = video.shape
    # `latents` only fills the pipeline's noise slot, which is not used here (and draws no random numbers)
    _, condition = encoders.prepare_latents(frame.to(encoders.vae.device), 1, latents.shape[0], height, width, frames,
                                            torch.float32, latents.device, latents=latents[None])
    inputs = {"condition": condition[0]}
    if clip_tokens:
        image = encoders.video_processor.postprocess(frame, output_type="pil")
        inputs["image_embeds"] = encoders.encode_image(image, latents.device)[0]
    return inputs


def _write_skip(entry: Path, reason: str) -> None:
    atomic_write(_skip_path(entry), lambda tmp: Path(tmp).write_text(json.dumps({"reason": reason})))


def precompute(clips: Iterable[Clip], cache_dir: Path, training: TrainingConfig, model: str,
               load_encoders: Callable[[], object], progress: Callable[[Iterable], Iterable] = iter,
               spec: ModelSpec = T2V) -> CacheReport:
    """Encode every clip without a valid entry (the encoders load only if one is missing) and list the usable ones.

    `load_encoders()` returns the model's pipeline without transformers (`vae`, `text_encoder`, `encode_prompt`, and
    for image to video `prepare_latents` and `encode_image`).
    """
    cache_dir.mkdir(parents=True, exist_ok=True)
    report, encoders = CacheReport([], [], 0), None
    for clip in progress(list(clips)):
        try:
            offsets = clip_offsets(clip, training)
            size = nearest_bucket(clip_size(clip.path), training.buckets) if training.buckets else None
        except ClipError as err:
            report.skipped.append((clip.path, str(err)))
            continue
        height, width = size or (training.height, training.width)
        for offset in offsets:
            entry = entry_path(cache_dir, clip, cache_key(clip, training, model, spec, offset, size))
            if entry.is_file():
                report.entries.append(entry)
                continue
            if _skip_path(entry).is_file():
                report.skipped.append((clip.path, json.loads(_skip_path(entry).read_text())["reason"]))
                continue
            try:
                if clip.caption is None:
                    raise ClipError("no caption (a same-name .txt or a metadata.jsonl line)")
                video = read_image(clip.path, height, width) if clip.is_image else read_clip(
                    clip.path, height, width, training.frames, training.fps, offset)
            except ClipError as err:
                _write_skip(entry, str(err))
                report.skipped.append((clip.path, str(err)))
                continue
            encoders = encoders or load_encoders()
            tensors = encode_clip(encoders, video, clip.caption, spec)
            atomic_write(entry, lambda tmp, t=tensors, name=str(clip.path): save_file(t, tmp, metadata={"clip": name}))
            report.entries.append(entry)
            report.encoded += 1
    return report


def clip_offsets(clip: Clip, training: TrainingConfig) -> list[int]:
    """The first frames of the samples a clip gives (wan.train.clips.window_offsets): the start alone unless
    training.frame_sampling draws more, which needs the clip's length."""
    if training.frame_sampling == "start" or clip.is_image:
        return [0]
    length = clip_length(clip.path, training.fps)
    offsets = window_offsets(length, training.frames, training.frame_sampling, training.samples_per_clip,
                             training.window_stride)
    if not offsets:
        raise ClipError(f"too short: {length} frames at {training.fps} fps; needs {training.frames}")
    return offsets


def load_entries(entries: Iterable[Path]) -> list[dict[str, torch.Tensor]]:
    return [load_file(str(entry)) for entry in entries]


@torch.no_grad()
def empty_prompt_embeds(encoders) -> torch.Tensor:
    """The empty prompt's text embeddings [512, D] on the CPU, as a clip's caption is encoded (caption dropout)."""
    embeds, _ = encoders.encode_prompt("", do_classifier_free_guidance=False, max_sequence_length=MAX_TEXT_TOKENS,
                                       device=encoders.text_encoder.device)
    return embeds[0].cpu()
