"""Precomputed training inputs: each clip encoded once by the model's VAE and text encoder, one safetensors a clip.

An entry's name holds a hash of everything its tensors depend on (the clip's path, size and modification
time, its caption, the training size, frames and fps, the model), so a changed clip or setting never reuses a
stale entry: it simply has another name. A clip that cannot be used gets a `.skip.json` under the same key
(its reason), so it is reported again without being decoded again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from wan.clips import Clip, ClipError, read_clip
from wan.files import atomic_write
from wan.train_config import TrainingConfig

CACHE_VERSION = 1  # bump when what an entry holds changes
MAX_TEXT_TOKENS = 512  # WanPipeline's max_sequence_length: the text embeddings the transformer was trained on


@dataclasses.dataclass
class CacheReport:
    entries: list[Path]
    skipped: list[tuple[Path, str]]  # clip, reason
    encoded: int  # entries written by this call (the rest were reused)


def cache_key(clip: Clip, training: TrainingConfig, model: str) -> str:
    stat = clip.path.stat()
    fields = {"clip": str(clip.path.resolve()), "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns,
              "caption": clip.caption, "height": training.height, "width": training.width,
              "frames": training.frames, "fps": training.fps, "model": model, "version": CACHE_VERSION}
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
def encode_clip(encoders, video: torch.Tensor, caption: str) -> dict[str, torch.Tensor]:
    """Latents [C, F', H', W'] (float32) and text embeddings [512, D] of one clip, on the CPU."""
    vae = encoders.vae
    latents = vae.encode(video[None].to(vae.device, vae.dtype)).latent_dist.mode()[0].float()
    latents = normalize_latents((vae.config.latents_mean, vae.config.latents_std), latents)
    embeds, _ = encoders.encode_prompt(caption, do_classifier_free_guidance=False, max_sequence_length=MAX_TEXT_TOKENS,
                                       device=encoders.text_encoder.device)
    return {"latents": latents.cpu().contiguous(), "prompt_embeds": embeds[0].cpu().contiguous()}


def _write_skip(entry: Path, reason: str) -> None:
    atomic_write(_skip_path(entry), lambda tmp: Path(tmp).write_text(json.dumps({"reason": reason})))


def precompute(clips: Iterable[Clip], cache_dir: Path, training: TrainingConfig, model: str,
               load_encoders: Callable[[], object], progress: Callable[[Iterable], Iterable] = iter) -> CacheReport:
    """Encode every clip without a valid entry (the encoders load only if one is missing) and list the usable ones.

    `load_encoders()` returns a WanPipeline-like object with `vae`, `text_encoder` and `encode_prompt`.
    """
    cache_dir.mkdir(parents=True, exist_ok=True)
    report, encoders = CacheReport([], [], 0), None
    for clip in progress(list(clips)):
        entry = entry_path(cache_dir, clip, cache_key(clip, training, model))
        if entry.is_file():
            report.entries.append(entry)
            continue
        if _skip_path(entry).is_file():
            report.skipped.append((clip.path, json.loads(_skip_path(entry).read_text())["reason"]))
            continue
        try:
            if clip.caption is None:
                raise ClipError("no caption (a same-name .txt or a metadata.jsonl line)")
            video = read_clip(clip.path, training.height, training.width, training.frames, training.fps)
        except ClipError as err:
            _write_skip(entry, str(err))
            report.skipped.append((clip.path, str(err)))
            continue
        encoders = encoders or load_encoders()
        tensors = encode_clip(encoders, video, clip.caption)
        atomic_write(entry, lambda tmp, t=tensors, name=str(clip.path): save_file(t, tmp, metadata={"clip": name}))
        report.entries.append(entry)
        report.encoded += 1
    return report


def load_entries(entries: Iterable[Path]) -> list[dict[str, torch.Tensor]]:
    return [load_file(str(entry)) for entry in entries]
