"""CUDA-only checks, run on the lent GPU (`python -m pytest -q tests/test_gpu.py`); CI has no GPU and skips them."""

import pytest
import torch
import torch.nn.functional as F

from nabla.attention import sparse_attention
from nabla.backend import flash_unavailable_reason, resolve_backend
from nabla.config import SparsityConfig
from nabla.layout import TileLayout

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
# Wan2.1 1.3B 480p and 14B 720p token grids, 81 frames
WAN_SHAPES = {"1.3B-480p": (12, 21, 30, 52), "14B-720p": (40, 21, 45, 80)}


def qkv(heads: int, layout: TileLayout) -> list[torch.Tensor]:
    return [layout.tile(torch.randn(1, heads, layout.length, 128, device="cuda", dtype=torch.bfloat16), dim=2)
            for _ in range(3)]


@cuda
@pytest.mark.skipif(torch.cuda.is_available() and flash_unavailable_reason(torch.device("cuda", 0)) is not None,
                    reason="FlashAttention-4 cannot run on this GPU or is not installed")
@pytest.mark.parametrize("shape", WAN_SHAPES, ids=list(WAN_SHAPES))
@pytest.mark.parametrize("block_size", [128, 64])
def test_flash_matches_triton_at_wan_shapes(shape, block_size):
    heads, *grid = WAN_SHAPES[shape]
    layout = TileLayout(*grid)
    q, k, v = qkv(heads, layout)
    config = SparsityConfig(mode="nabla", threshold=0.4, block_size=block_size, dense_above=1.0)
    flash, stats = sparse_attention(q, k, v, layout, config.replace(backend="flash"), return_stats=True)
    triton = sparse_attention(q, k, v, layout, config.replace(backend="triton"))
    assert stats["backend"] == "flash" and 0 < stats["density"].mean() < 1
    real = layout.valid_on("cuda")
    diff = (flash - triton)[:, :, real].abs().max().item()
    assert diff <= 2e-3, f"FLASH vs Triton max abs diff {diff:.2e}"


@cuda
def test_auto_backend_picks_flash_where_it_runs():
    expected = "flash" if flash_unavailable_reason(torch.device("cuda", 0)) is None else "triton"
    assert resolve_backend("auto", "cuda") == expected


@cuda
@pytest.mark.parametrize("backend", ["triton", "auto"])
@pytest.mark.parametrize("block_size", [128, 64])
def test_compiled_kernel_matches_masked_sdpa(backend, block_size):
    """The compiled CUDA path against a float32 token-level reference, on a padded grid."""
    layout = TileLayout(3, 20, 28)
    q, k, v = qkv(4, layout)
    config = SparsityConfig(mode="nabla", threshold=0.5, block_size=block_size, backend=backend, dense_above=1.0)
    out, stats = sparse_attention(q, k, v, layout, config, return_stats=True)
    S = layout.padded_length
    mask = stats["mask"].repeat_interleave(block_size, -1).repeat_interleave(block_size, -2)[..., :S, :S]
    mask = mask & layout.valid_on("cuda")
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask)
    real = layout.valid_on("cuda")
    diff = (out.float() - ref)[:, :, real].abs().max().item()
    assert diff <= 2e-2, f"{stats['backend']}: max abs diff {diff:.2e} against masked float32 SDPA"
