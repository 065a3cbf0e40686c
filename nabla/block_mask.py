"""The block mask of one attention call (NABLA, STA or both) and the FlexAttention BlockMask made from it.

Nothing here is S x S: masks are over (query block, key block) pairs, and the BlockMask is built from
per-row counts and indices of kept key blocks.
"""

from __future__ import annotations

from functools import cache, lru_cache
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask

from nabla.backend import enough_recompiles, resolve_backend
from nabla.config import SparsityConfig
from nabla.layout import TileLayout
from nabla.masks import coarsen_block_mask, density_bounds, means_logits, nabla_keep, pool_blocks, sta_block_mask

try:  # the CUDA fast path; CPU-only installs may lack Triton
    from nabla.cdf_select import nabla_block_indices
    from nabla.logits_kernel import means_logits_tf32x3, supports_head_dim
except ImportError:
    nabla_block_indices = None


class MaskInputs(NamedTuple):
    """What the mask build needs besides q and k: the layout's padding, STA's static blocks and the config's
    numbers (a NamedTuple: torch.compile guards on its fields like on positional arguments)."""

    valid: torch.Tensor  # bool [S]: the real tokens in tile order
    empty_cols: torch.Tensor  # bool [nb]: key blocks without a real token
    partial_cols: torch.Tensor  # bool [nb]: key blocks holding padding, where mask_mod runs
    sta: torch.Tensor | None  # bool [nb, nb]: STA's blocks, or None
    mode: str
    threshold: float
    block_size: int
    min_density: float | None
    max_density: float | None
    merge: int  # mask rows per kernel query block
    widths: tuple[int, int] | None  # compact FLASH index rows (see `_index_widths`), or None for full rows


def _block_mask_tensors(q: torch.Tensor, k: torch.Tensor, pooled: bool, inputs: MaskInputs) -> tuple[torch.Tensor, ...]:
    """Block mask and its FlexAttention indices, in one function so that CUDA compiles it into few kernels.

    q, k: tile-ordered [B, H, S, D], or with `pooled` their block means [B, H, nb, D] (`pool_blocks`).
    Returns keep [B, H, nb, nb] and, per kernel query block (`merge` consecutive mask rows), (count,
    indices) of the key blocks that hold padding and of the full ones (see `kernel_block_indices`).
    """
    valid, empty_cols, partial_cols, sta, mode, threshold, block_size, min_density, max_density, merge, widths = inputs
    B, H = q.shape[:2]
    nb = partial_cols.shape[0]
    if mode in ("nabla", "nabla+sta"):
        if not pooled:
            q, k = (pool_blocks(x, block_size, valid)[0] for x in (q, k))
        if q.is_cuda and nabla_block_indices is not None:
            logits = means_logits_tf32x3(q, k) if supports_head_dim(q.shape[-1]) else means_logits(q, k)
            # one kernel from the pooled logits to FlexAttention's indices: no pass over the mask after it
            low, high = density_bounds(nb, min_density, max_density)
            return nabla_block_indices(logits, empty_cols, threshold, low, high, partial_cols, sta, merge, widths)
        keep = nabla_keep(means_logits(q, k), empty_cols, threshold, min_density, max_density)
    else:
        keep = torch.full((B, H, nb, nb), mode == "full", dtype=torch.bool, device=q.device)
    if sta is not None:
        keep = keep | sta
    return (keep, *kernel_block_indices(keep, partial_cols, merge))


def kernel_block_indices(keep: torch.Tensor, partial_cols: torch.Tensor, merge: int = 1) -> tuple[torch.Tensor, ...]:
    """FlexAttention's (count, indices) per kernel query block of `merge` consecutive rows of `keep`
    [B, H, nb, nb], which attends the union of its rows' key blocks: first of those holding padding
    (mask_mod runs there), then of the full ones."""
    kept = _row_unions(keep, merge)
    return (*_compact(kept & partial_cols), *_compact(kept & ~partial_cols))


def q_block_indices(
    keep: torch.Tensor, partial_cols: torch.Tensor, merge: int = 1, compiled: bool = False
) -> tuple[torch.Tensor, ...]:
    """The transpose of `kernel_block_indices`, which flex_attention's backward reads: per key block, (count,
    ascending indices) of the kernel query blocks attending it where the key block holds padding, then where it
    is full (a row is one or the other: whether mask_mod runs depends on the key block only)."""
    with enough_recompiles():
        return (_compiled_q_side() if compiled else _q_side)(keep.transpose(-1, -2).contiguous(), partial_cols, merge)


def _q_side(keep_t: torch.Tensor, partial_cols: torch.Tensor, merge: int) -> tuple[torch.Tensor, ...]:
    # keep_t: keep transposed into a buffer of its own: inductor (torch 2.11, CUDA) fails to generate a cumsum
    # that reads a transposed view ("list indices must be integers or slices, not NoneType")
    attended = _unions(keep_t, merge, -1)
    partial = partial_cols.unsqueeze(-1)  # the key blocks are the rows here
    return tuple(t.contiguous() for t in (*_compact(attended & partial), *_compact(attended & ~partial)))


def _row_unions(keep: torch.Tensor, merge: int) -> torch.Tensor:
    """[B, H, ceil(nb / merge), nb]: the union of each `merge` consecutive rows of `keep` (a last, shorter group
    is the union of the rows it has)."""
    return _unions(keep, merge, -2)


def _unions(keep: torch.Tensor, merge: int, dim: int) -> torch.Tensor:
    """The union of each `merge` consecutive entries of `keep` along `dim` (-2 or -1)."""
    if merge == 1:
        return keep
    extra = -keep.shape[dim] % merge
    if extra:  # repeating the last entry leaves its group's union as it is
        keep = torch.cat([keep, *[keep.narrow(dim, keep.shape[dim] - 1, 1)] * extra], dim)
    return keep.unflatten(dim, (-1, merge)).any(dim)


def attended_mask(keep: torch.Tensor, merge: int = 1) -> torch.Tensor:
    """The key blocks each query block attends [B, H, nb, nb]: each row the union of the `merge` rows of its
    kernel query block (`keep` itself for merge 1)."""
    return _row_unions(keep, merge).repeat_interleave(merge, -2)[..., : keep.shape[-2], :]


@cache
def _compiled_block_mask_tensors():
    return torch.compile(_block_mask_tensors, dynamic=False)


@cache
def _compiled_q_side():
    return torch.compile(_q_side, dynamic=False)


def mask_inputs(layout: TileLayout, config: SparsityConfig, device: torch.device, compact: bool = False) -> MaskInputs:
    """The mask build's inputs for `layout` and `config` on `device` (cached tensors: no host copies per call);
    `compact`: index rows only as wide as the density cap allows (FLASH, which reads a row's first count only)."""
    padded_valid = _padded_valid(layout, config.block_size, device)
    return MaskInputs(
        layout.valid_on(device), _empty_cols(padded_valid, config.block_size), _partial_cols(padded_valid, config.block_size),
        _sta_blocks(layout, config, device) if config.uses_sta else None, config.mode, config.threshold,
        config.block_size, config.min_density, config.max_density, config.query_merge,
        _index_widths(layout, config) if compact else None,
    )


@lru_cache(maxsize=32)
def _index_widths(layout: TileLayout, config: SparsityConfig) -> tuple[int, int]:
    """The most key blocks holding padding, and the most full ones, that a kernel query block can attend: the
    widths of its FlexAttention index rows for FlashAttention-4, which reads only the first `count` of a row
    (torch's Triton kernel needs rows of every key block). At 14B 720p with 64-token blocks and a 10% cap
    they take 0.06 GB instead of 0.5."""
    partial_cols = _partial_cols(_padded_valid(layout, config.block_size, torch.device("cpu")), config.block_size)
    nb, partial = len(partial_cols), int(partial_cols.sum())
    most = nb
    if config.uses_nabla and config.max_density is not None:  # at most `high` NABLA blocks a row, plus STA's
        high = density_bounds(nb, config.min_density, config.max_density)[1]
        sta = int(_sta_blocks_cpu(layout, config.sta_window, config.sta_shift_at_border, config.block_size)
                  .sum(-1).max()) if config.uses_sta else 0
        most = config.query_merge * (high + sta)
    return max(1, min(partial, most)), max(1, min(nb - partial, most))


def build_block_mask(q: torch.Tensor, k: torch.Tensor, layout: TileLayout, config: SparsityConfig) -> torch.Tensor:
    """The kept (query block, key block) pairs [B, H, nb, nb] for `config` (NABLA, STA or their union)."""
    return _block_mask_tensors(q, k, False, mask_inputs(layout, config, q.device))[0]


def make_block_mask(
    q: torch.Tensor,
    k: torch.Tensor,
    layout: TileLayout,
    config: SparsityConfig,
    compiled: bool,
    means: tuple[torch.Tensor, torch.Tensor] | None = None,
    for_backward: bool = False,
) -> tuple[BlockMask, torch.Tensor]:
    """FlexAttention BlockMask for `config` and the boolean block mask it came from.

    `means`: the block means of q and k [B, H, nb, D] (`pool_blocks`) where the caller has them (a compiled
    caller computes them in the graph that writes q and k), else they are pooled here from q, k [B, H, S, D].
    `for_backward`: the BlockMask also holds the q indices that flex_attention's backward reads (`q_block_indices`,
    compiled, where `BlockMask.from_kv_blocks` would sort every row eagerly: docs/HISTORY.md).
    """
    build = _compiled_block_mask_tensors() if compiled else _block_mask_tensors
    compact = compiled and q.is_cuda and resolve_backend(config.backend, q.device, q.dtype) == "flash"
    with enough_recompiles():
        inputs = mask_inputs(layout, config, q.device, compact)
        keep, *indices = build(*(means or (q, k)), means is not None, inputs)
    if for_backward:
        indices += q_block_indices(keep, inputs.partial_cols, config.query_merge, compiled)
    return _from_indices(indices, keep, layout, config.block_size, config.query_merge, not compiled), keep


def _from_indices(
    indices: list[torch.Tensor], keep: torch.Tensor, layout: TileLayout, block_size: int, merge: int,
    exact_mask_mod: bool,
) -> BlockMask:
    """BlockMask from (count, indices) of the partial and of the full key blocks per kernel query block, then, where
    given (for a backward), of the kernel query blocks per key block (`q_block_indices`)."""
    if exact_mask_mod:
        mask_mod = _exact_mask_mod(attended_mask(keep, merge), layout, block_size)
    else:
        mask_mod = _padding_mask_mod(layout, block_size, keep.device)
    S = layout.padded_length
    mask = BlockMask.from_kv_blocks(*indices[:4], BLOCK_SIZE=(block_size * merge, block_size), mask_mod=mask_mod,
                                    seq_lengths=(S, S), compute_q_blocks=False)
    if len(indices) == 8:  # set after construction: BlockMask's constructor differs between torch releases
        mask.q_num_blocks, mask.q_indices, mask.full_q_num_blocks, mask.full_q_indices = indices[4:]
    return mask


@lru_cache(maxsize=32)
def _sta_blocks_cpu(layout: TileLayout, window: tuple, shift: bool, block_size: int) -> torch.Tensor:
    return coarsen_block_mask(sta_block_mask(layout.grid, window, shift), block_size // layout.tile_size)


def _sta_blocks(layout: TileLayout, config: SparsityConfig, device: torch.device) -> torch.Tensor:
    if config.block_size % layout.tile_size:
        raise ValueError(f"STA needs block_size ({config.block_size}) to be a multiple of the tile ({layout.tile_size})")
    return _device_copy(_sta_blocks_cpu(layout, config.sta_window, config.sta_shift_at_border, config.block_size), device)


@lru_cache(maxsize=64)
def _device_copy(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    return t.to(device)


def _compact(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the count and the ascending column indices of True entries (no argsort over all blocks)."""
    n = mask.shape[-1]
    counts = mask.sum(-1, dtype=torch.int32)
    slot = torch.where(mask, mask.cumsum(-1, dtype=torch.int32) - 1, n)  # unkept go to a dump column
    cols = torch.arange(n, device=mask.device, dtype=torch.int32).expand_as(mask)
    indices = torch.zeros(*mask.shape[:-1], n + 1, dtype=torch.int32, device=mask.device)
    return counts, indices.scatter_(-1, slot.long(), cols)[..., :n]


@lru_cache(maxsize=32)
def _padded_valid(layout: TileLayout, block_size: int, device: torch.device) -> torch.Tensor:
    """`layout.valid` padded with False up to whole blocks, so mask_mod never indexes past the end."""
    valid = layout.valid_on(device)
    return F.pad(valid, (0, -len(valid) % block_size), value=False)


@lru_cache(maxsize=32)
def _empty_cols(padded_valid: torch.Tensor, block_size: int) -> torch.Tensor:
    """bool [nb]: key blocks without a real token, whose pooled probability is 0."""
    return ~padded_valid.view(-1, block_size).any(-1)


@lru_cache(maxsize=32)
def _partial_cols(padded_valid: torch.Tensor, block_size: int) -> torch.Tensor:
    """bool [nb]: key blocks that hold padding, where mask_mod must run."""
    return ~padded_valid.view(-1, block_size).all(-1)


def _exact_mask_mod(keep: torch.Tensor, layout: TileLayout, block_size: int):
    # Eager flex_attention ignores the block structure and applies only mask_mod, so on that path
    # mask_mod also looks the block mask up.
    valid = _padded_valid(layout, block_size, keep.device)

    def mask_mod(b, h, q_idx, kv_idx):
        return keep[b, h, q_idx // block_size, kv_idx // block_size] & valid[kv_idx]

    return mask_mod


def to_flex_block_mask(keep: torch.Tensor, layout: TileLayout, block_size: int, exact_mask_mod: bool) -> BlockMask:
    """BlockMask from a block-level mask [B, H, nb, nb], built from block indices (never S x S).

    Kept key blocks without padding are "full" blocks (no mask_mod evaluated); those holding padding
    keys are "partial" and run a mask_mod that drops the padding keys. With `exact_mask_mod` the
    mask_mod also applies the block mask itself (for eager flex_attention, which applies only mask_mod).
    """
    partial_cols = _partial_cols(_padded_valid(layout, block_size, keep.device), block_size)
    return _from_indices(kernel_block_indices(keep, partial_cols), keep, layout, block_size, 1, exact_mask_mod)


@lru_cache(maxsize=32)
def _padding_mask_mod(layout: TileLayout, block_size: int, device: torch.device):
    # One function object per layout: compiled flex_attention then sees the same mask_mod every call.
    period, count = _padding_pattern(layout, block_size)
    if period:
        # mask_mod runs on partial key blocks only; where their padding is the same few trailing slots of every
        # `period` tokens, two integer ops decide it (a lookup in `valid` per score cost FlashAttention-4 6%)
        def padding_mask_mod(b, h, q_idx, kv_idx):
            return (kv_idx & (period - 1)) < count

        return padding_mask_mod
    valid = _padded_valid(layout, block_size, torch.device(device))

    def padding_mask_mod(b, h, q_idx, kv_idx):
        return valid[kv_idx]

    return padding_mask_mod


@lru_cache(maxsize=32)
def _padding_pattern(layout: TileLayout, block_size: int) -> tuple[int, int]:
    """(period, count) such that in every key block holding padding, slot i is real exactly when i % period <
    count (period a power of two dividing the block), or (0, 0) where no such pattern exists. At 1280x720 the
    (1, 8, 8) tiles of the bottom tile row hold 5 of 8 rows: (64, 40); where only the right tile column is cut
    it is (8, columns kept)."""
    valid = _padded_valid(layout, block_size, torch.device("cpu")).view(-1, block_size)
    partial = valid[~valid.all(-1)]
    if partial.numel() == 0:
        return 0, 0
    slot = torch.arange(block_size)
    period = 2
    while period <= block_size and block_size % period == 0:
        count = int(partial[0, :period].sum())
        if torch.equal(partial, (slot % period < count).expand_as(partial)):
            return period, count
        period *= 2
    return 0, 0


def token_mask(keep: torch.Tensor, layout: TileLayout, block_size: int, merge: int = 1) -> torch.Tensor:
    """bool [B, H, S, S]: the token pairs that attention under the block mask `keep` [B, H, nb, nb] computes
    (each query block attends its kernel block's union of rows, `attended_mask`; padding keys never). S x S:
    for references and the CPU backward at test sizes, never the GPU path. A row without any key (a query
    block of padding only) attends the real keys, so that softmax stays finite; such rows are dropped."""
    S = layout.padded_length
    blocks = attended_mask(keep, merge)
    mask = blocks.repeat_interleave(block_size, -1).repeat_interleave(block_size, -2)[..., :S, :S]
    valid = layout.valid_on(keep.device)
    mask = mask & valid
    return mask | (~mask.any(-1, keepdim=True) & valid)


def kernel_density(block_mask: BlockMask) -> torch.Tensor:
    """[H] the fraction of (kernel query block, key block) pairs that the kernel computes, mean over the
    batch: the mask density, or more where kernel query blocks attend the union of several mask rows
    (`query_block_size`)."""
    visited = block_mask.kv_num_blocks + block_mask.full_kv_num_blocks
    key_blocks = -(-block_mask.seq_lengths[1] // block_mask.BLOCK_SIZE[1])  # index rows may be narrower
    return visited.float().mean(dim=(0, 2)) / key_blocks
