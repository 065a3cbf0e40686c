"""The one attention call of NABLA: tile-ordered q, k, v -> block mask -> block-sparse (or dense) attention.

`attend` is the core every caller goes through (`sparse_attention`, the Wan processor, the benchmarks, training):
it builds the mask without gradients, decides between the sparse kernel and dense attention, runs it (with a
backward where q, k or v need one) and returns the output with what it decided.
"""

from __future__ import annotations

import dataclasses
import warnings
from functools import cache
from typing import Protocol

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from nabla.backend import check_trainable, dense_above, enough_recompiles, kernel_options, resolve_backend
from nabla.block_mask import kernel_density, make_block_mask, token_mask
from nabla.config import SparsityConfig
from nabla.layout import TileLayout, _on


class Timer(Protocol):
    """Marks the end of the mask build (`split`) and of the attention (`stop`) of one call."""

    def split(self) -> None: ...

    def stop(self) -> None: ...


@dataclasses.dataclass
class AttentionResult:
    """The output of one attention call and what the call decided."""

    out: torch.Tensor  # [B, H, S, D] in tile order; padding rows are 0 or junk, never read
    mask: torch.Tensor  # bool [B, H, nb, nb]: the kept (query block, key block) pairs
    kernel_density: torch.Tensor  # [H]: the fraction of blocks the sparse kernel computes (`kernel_density`)
    dense: bool  # dense attention ran instead: the kernel would have computed more than `dense_above`
    backend: str  # "flash", "triton" or "eager" (CPU: exact; under autograd SDPA under the token mask)

    @property
    def density(self) -> torch.Tensor:
        """[H]: the fraction of blocks the mask keeps, mean over the batch and the rows."""
        return self.mask.float().mean(dim=(0, 2, 3))


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: TileLayout,
    config: SparsityConfig,
    *,
    means: tuple[torch.Tensor, torch.Tensor] | None = None,
    compiled: bool | None = None,
    timer: Timer | None = None,
) -> AttentionResult:
    """Block-sparse attention of tile-ordered q, k, v [B, H, S, D] (S = layout.padded_length) under `config`.

    The mask comes from q and k (or their block means [B, H, nb, D], `means`) without gradients, as NABLA's authors
    choose it; gradients flow through attention only, to q, k and v. Where the kernel would compute more than
    `config.dense_above` of the blocks, dense attention over the real tokens runs instead. `compiled` defaults to
    True on CUDA (compiled kernels on `config.backend`) and False elsewhere (exact, slow). `timer`, if given, is
    split after the mask build and stopped after the attention.
    """
    if q.shape[-2] != layout.padded_length:
        raise ValueError(f"attend: sequence length {q.shape[-2]} != padded length {layout.padded_length} of {layout}")
    compiled = q.is_cuda if compiled is None else compiled
    backend = resolve_backend(config.backend, q.device, q.dtype) if compiled else "eager"
    grad = torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v))
    if grad:
        check_trainable(config, q.device)
    else:  # eager flex_attention refuses inputs that require grad on the CPU, even under no_grad
        q, k, v = q.detach(), k.detach(), v.detach()
    with torch.no_grad():
        block_mask, keep = make_block_mask(q.detach(), k.detach(), layout, config, compiled,
                                           means=tuple(m.detach() for m in means) if means else None,
                                           for_backward=grad and q.is_cuda)
    if timer is not None:
        timer.split()
    ran_dense = too_dense(block_mask, dense_above(config, backend))
    if ran_dense:
        out = dense_attention(q, k, v, layout)
    elif grad and not q.is_cuda:  # FlexAttention has no backward on the CPU
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=token_mask(keep, layout, config.block_size,
                                                                            config.query_merge))
    else:
        out = attend_block_mask(q, k, v, block_mask, compiled, backend)
    if timer is not None:
        timer.stop()
    return AttentionResult(out, keep, kernel_density(block_mask), ran_dense, backend)


def sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: TileLayout,
    config: SparsityConfig,
    *,
    compiled: bool | None = None,
    return_stats: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, dict]:
    """`attend`'s output [B, H, S, D]; with `return_stats` also {"density": [H] fraction of blocks kept per head,
    "kernel_density": [H] fraction the kernel computes, "mask": [B, H, nb, nb], "dense": whether it ran dense,
    "backend": the kernel that ran}."""
    result = attend(q, k, v, layout, config, compiled=compiled)
    if not return_stats:
        return result.out
    stats = {"density": result.density, "kernel_density": result.kernel_density, "mask": result.mask,
             "dense": result.dense, "backend": result.backend}
    return result.out, stats


def _eager_flex(*args, **kwargs) -> torch.Tensor:
    # The eager path is chosen on purpose (CPU: exact, no compiler); PyTorch's advice to compile does not apply.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile", category=UserWarning)
        return flex_attention(*args, **kwargs)


@cache
def _compiled_flex():
    # fullgraph: should the recompile limit be hit, dynamo raises instead of falling back to eager flex_attention
    return torch.compile(flex_attention, dynamic=False, fullgraph=True)


def attend_block_mask(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask: BlockMask, compiled: bool, backend: str = "triton"
) -> torch.Tensor:
    """flex_attention of q, k, v [B, H, S, D] on a prepared BlockMask (from `make_block_mask`).

    `compiled` must match the one the BlockMask was made with: the eager path relies on the exact
    mask_mod that `make_block_mask(..., compiled=False)` attaches. `backend` ("flash" or "triton",
    from `resolve_backend`) picks the compiled CUDA kernel. Compiled, it has a backward where the BlockMask
    holds q indices (`make_block_mask(..., for_backward=True)`).
    """
    if not compiled:
        return _eager_flex(q, k, v, block_mask=block_mask)
    options = kernel_options(backend, block_mask.BLOCK_SIZE, q.device, q.dtype) if q.is_cuda else None
    with enough_recompiles():
        return _compiled_flex()(q, k, v, block_mask=block_mask, kernel_options=options)


def too_dense(block_mask: BlockMask, limit: float) -> bool:
    """Whether the kernel would compute more than `limit` of the blocks (`kernel_density`): there the sparse
    kernel is slower than dense attention (see nabla.backend.dense_above)."""
    # The check waits for the mask on the device: only pay for it where a fallback can happen.
    return limit < 1.0 and kernel_density(block_mask).mean().item() > limit


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: TileLayout) -> torch.Tensor:
    """Dense attention of tile-ordered q, k, v over the real tokens (fastest SDPA backend); padding rows are 0."""
    if not layout.has_padding:
        return F.scaled_dot_product_attention(q, k, v)
    real = _on(layout, "tile_index", q.device)
    out = F.scaled_dot_product_attention(q[:, :, real], k[:, :, real], v[:, :, real])
    return torch.zeros_like(q).index_copy(2, real, out)  # out of place: autograd takes it as it is
