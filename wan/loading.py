"""Load a Wan2.1 text-to-video `WanPipeline` from the hub or a local diffusers-layout folder."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import WanPipeline
from huggingface_hub.errors import HFValidationError

from wan.settings import DEFAULT_MODEL

_HOW_TO_GET = (
    f"get weights with `huggingface-cli download {DEFAULT_MODEL} --local-dir DIR`, "
    "or build an offline demo model with `python scripts/make_tiny_model.py DIR`"
)


class ModelNotFoundError(ValueError):
    """The pipeline's files could not be found (local folder missing, or hub id not downloadable/cached)."""


def _looks_local(model: str) -> bool:
    return model.startswith((".", "/", "~")) or Path(model).expanduser().exists()


def load_pipeline(
    model: str = DEFAULT_MODEL,
    *,
    device: str = "cuda",
    dtype: torch.dtype | None = None,
    cpu_offload: bool = False,
) -> WanPipeline:
    """Load `model` (hub id or local folder) in `dtype` (default: bf16 on CUDA, fp32 elsewhere), VAE in fp32.

    With `cpu_offload`, components stay on the CPU and move to `device` one at a time as they run.
    """
    if dtype is None:
        dtype = torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    # Wan's VAE is run in fp32 in the reference code and diffusers' examples; bf16 degrades decoding.
    dtypes = {"vae": torch.float32, "default": dtype}

    if _looks_local(model):
        path = Path(model).expanduser().absolute()
        if not (path / "model_index.json").is_file():
            what = "is not a diffusers pipeline folder (no model_index.json)" if path.exists() else "does not exist"
            raise ModelNotFoundError(f"model folder {str(path)!r} {what}; {_HOW_TO_GET}")
        pipe = WanPipeline.from_pretrained(str(path), dtype=dtypes)  # real load errors here are not "not found"
    else:
        try:
            pipe = WanPipeline.from_pretrained(model, dtype=dtypes)
        except (OSError, HFValidationError) as e:  # hub errors (offline, no such repo, missing files) are OSErrors
            reason = " ".join(str(e).split())  # hub messages span lines; ours is one
            reason = reason if len(reason) <= 240 else reason[:237] + "..."
            raise ModelNotFoundError(
                f"could not load hub model {model!r} ({type(e).__name__}: {reason}); {_HOW_TO_GET}"
            ) from e

    if cpu_offload:
        pipe.enable_model_cpu_offload(device=device)
    else:
        pipe.to(device)
    return pipe
