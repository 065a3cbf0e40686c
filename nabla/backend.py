"""Which FlexAttention kernel runs the sparse attention, its options, and where it stops beating dense."""

from __future__ import annotations

import importlib.util
from functools import cache

import torch

from nabla.config import SparsityConfig

# Density of the blocks the kernel computes above which the sparse kernel no longer beats dense cuDNN
# attention, per (backend, block size, kernel query block size), mask build included. Where the sparse kernel
# loses, a layer is better off running dense, so these are the crossovers of scripts/bench_attention.py, the
# lower of the two Wan shapes' (1.3B 480p, 14B 720p) rounded down: a layer never takes the slower kernel. For
# 64-token mask rows in 128-row kernel blocks the crossover scales the 128-token one by what those kernels cost
# per computed block. The measured values: docs/GPU-FACTS.md ("Moved from code comments").
DENSE_ABOVE = {
    ("triton", 128, 128): 0.6, ("triton", 64, 64): 0.35, ("triton", 64, 128): 0.5,
    ("flash", 128, 128): 0.8, ("flash", 64, 64): 0.5, ("flash", 64, 128): 0.6,
}


@cache
def flash_unavailable_reason(device: torch.device) -> str | None:
    """Why FlexAttention's FLASH backend (FlashAttention-4) cannot run on `device`, or None if it can."""
    if device.type != "cuda":
        return f"it needs a CUDA GPU, not {device.type}"
    major, minor = torch.cuda.get_device_capability(device)
    if major not in (9, 10):
        return f"it needs a Hopper or Blackwell GPU (compute capability 9.x or 10.x), this one is {major}.{minor}"
    try:
        found = importlib.util.find_spec("flash_attn.cute") is not None
    except ImportError:
        found = False
    if not found:
        return "the flash-attn-4 package is not installed (pip install flash-attn-4, or this project's [gpu] extra)"
    return None


def resolve_backend(backend: str, device: torch.device | str, dtype: torch.dtype | None = None) -> str:
    """The kernel that runs on `device` for q, k, v of `dtype` (None: 16-bit): "flash", "triton", or "eager" off
    CUDA (exact, slow, for tests).

    "auto" takes flash where it can run; an explicit "flash" that cannot is a one-line ValueError.
    """
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    reason = flash_unavailable_reason(device)
    if reason is None and dtype is not None and dtype not in (torch.bfloat16, torch.float16):
        reason = f"FlashAttention-4 takes bfloat16 or float16, not {str(dtype).removeprefix('torch.')}"
    if backend == "flash":
        if reason is not None:
            raise ValueError(f"config: backend 'flash' cannot run here: {reason}; use backend: auto or triton")
        return "flash"
    if device.type != "cuda":
        return "eager"
    return "flash" if backend == "auto" and reason is None else "triton"


def kernel_options(
    backend: str, block_size: tuple[int, int], device: torch.device, dtype: torch.dtype = torch.bfloat16
) -> dict | None:
    """flex_attention's kernel_options for `backend`, the BlockMask's (query, key) tokens per block and q's dtype."""
    if backend == "eager":
        return None
    if backend == "flash":
        return {"BACKEND": "FLASH"}
    q_block, kv_block = block_size
    if dtype.itemsize > 2:
        # float32 tiles of 128 x 128 in three stages ask for more shared memory than the GPU has
        # (docs/GPU-FACTS.md): 64 x 64 tiles fit and divide both block sizes
        return {"BACKEND": "TRITON", "BLOCK_M": 64, "BLOCK_N": 64, "num_stages": 2, "num_warps": 4}
    # Tiles must divide the blocks (the default 128x64 tiles refuse 64-token query blocks). Where the GPU has TMA
    # (compute capability 9 and up), TMA loads make the sparse kernel faster (docs/GPU-FACTS.md).
    options: dict = {"BACKEND": "TRITON", "BLOCK_M": q_block, "BLOCK_N": kv_block}
    if torch.cuda.get_device_capability(device)[0] >= 9:
        options["USE_TMA"] = True
        if block_size == (128, 128):
            options.update(num_warps=8, num_stages=3)
    return options


def dense_above(config: SparsityConfig, backend: str) -> float:
    """The density of computed blocks (`nabla.attention.kernel_density`) above which a layer runs dense:
    `config.dense_above`, or the measured crossover for "auto".

    1.0 (never) where the kernel cannot compute more than the limit: NABLA alone under a `max_density` cap
    at or below it (times the mask rows merged per kernel query block, whose union it computes); checking the
    density would only cost a device synchronisation per layer.
    """
    if config.dense_above == "auto":
        limit = DENSE_ABOVE.get((backend, config.block_size, config.query_merge * config.block_size), 1.0)
    else:
        limit = config.dense_above
    if config.mode == "nabla" and config.max_density is not None and config.max_density * config.query_merge <= limit:
        return 1.0
    return float(limit)


#: compiled graphs allowed per process for flex_attention and for the mask build (one per sequence length, heads,
#: block size, backend, padding layout, and for the mask build per threshold and density bounds), above dynamo's
#: default of 8: past its limit dynamo would run flex_attention eagerly, where only the padding mask_mod applies and
#: the block mask is ignored (dense attention, S x S in memory), and the mask build eagerly (several times slower).
RECOMPILE_LIMIT = 64


def enough_recompiles():
    """A context in which dynamo may compile up to RECOMPILE_LIMIT graphs of one function."""
    return torch._dynamo.config.patch(recompile_limit=max(RECOMPILE_LIMIT, torch._dynamo.config.recompile_limit))


def check_trainable(config: SparsityConfig, device: torch.device | str) -> None:
    """One-line ValueError where flex_attention's backward cannot run `config` on `device`: on CUDA both kernels'
    backward take 128-token key blocks only (FLASH on Hopper asks for them; Triton finds no tile for 64); the CPU
    backward (SDPA under the token-level mask) takes either."""
    if torch.device(device).type == "cuda" and config.is_sparse and config.block_size != 128:
        raise ValueError(f"config: block_size {config.block_size} cannot train on CUDA (flex_attention's backward "
                         "takes 128-token key blocks on FLASH and Triton); use block_size: 128 for training")
