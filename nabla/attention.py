"""Sparse attention on FlexAttention: block mask (NABLA, STA or both) -> BlockMask -> flex_attention."""

from __future__ import annotations

import warnings
from functools import cache, lru_cache

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from nabla.backend import dense_above, kernel_options, resolve_backend
from nabla.config import SparsityConfig
from nabla.layout import TileLayout, _on
from nabla.masks import coarsen_block_mask, density_bounds, means_logits, nabla_keep, pool_blocks, sta_block_mask

try:  # the CUDA fast path; CPU-only installs may lack Triton
    from nabla.cdf_select import nabla_block_indices
    from nabla.logits_kernel import means_logits_tf32x3, supports_head_dim
except ImportError:
    nabla_block_indices = None


def _block_mask_tensors(
    q: torch.Tensor,
    k: torch.Tensor,
    pooled: bool,
    valid: torch.Tensor,
    empty_cols: torch.Tensor,
    partial_cols: torch.Tensor,
    sta: torch.Tensor | None,
    mode: str,
    threshold: float,
    block_size: int,
    min_density: float | None,
    max_density: float | None,
    merge: int,
    widths: tuple[int, int] | None,
) -> tuple[torch.Tensor, ...]:
    """Block mask and its FlexAttention indices, in one function so that CUDA compiles it into few kernels.

    q, k: tile-ordered [B, H, S, D], or with `pooled` their block means [B, H, nb, D] (`pool_blocks`).
    Returns keep [B, H, nb, nb] and, per kernel query block (`merge` consecutive mask rows), (count,
    indices) of the key blocks that hold padding and of the full ones (see `kernel_block_indices`).
    """
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


def _row_unions(keep: torch.Tensor, merge: int) -> torch.Tensor:
    """[B, H, ceil(nb / merge), nb]: the union of each `merge` consecutive rows of `keep` (a last, shorter group
    is the union of the rows it has)."""
    if merge == 1:
        return keep
    extra = -keep.shape[-2] % merge
    if extra:  # repeating the last row leaves its group's union as it is
        keep = torch.cat([keep, keep[..., -1:, :].expand(*keep.shape[:-2], extra, keep.shape[-1])], -2)
    return keep.unflatten(-2, (-1, merge)).any(-2)


def attended_mask(keep: torch.Tensor, merge: int = 1) -> torch.Tensor:
    """The key blocks each query block attends [B, H, nb, nb]: each row the union of the `merge` rows of its
    kernel query block (`keep` itself for merge 1)."""
    return _row_unions(keep, merge).repeat_interleave(merge, -2)[..., : keep.shape[-2], :]


@cache
def _compiled_block_mask_tensors():
    return torch.compile(_block_mask_tensors, dynamic=False)


def _mask_inputs(q: torch.Tensor, layout: TileLayout, config: SparsityConfig, compact: bool = False) -> tuple:
    valid = layout.valid_on(q.device)
    padded_valid = _padded_valid(layout, config.block_size, q.device)
    empty_cols, partial_cols = _empty_cols(padded_valid, config.block_size), _partial_cols(padded_valid, config.block_size)
    sta = _sta_blocks(layout, config, q.device) if config.uses_sta else None
    return (valid, empty_cols, partial_cols, sta, config.mode, config.threshold, config.block_size,
            config.min_density, config.max_density, config.query_merge, _index_widths(layout, config) if compact else None)


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
    return _block_mask_tensors(q, k, False, *_mask_inputs(q, layout, config))[0]


def make_block_mask(
    q: torch.Tensor,
    k: torch.Tensor,
    layout: TileLayout,
    config: SparsityConfig,
    compiled: bool,
    means: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[BlockMask, torch.Tensor]:
    """FlexAttention BlockMask for `config` and the boolean block mask it came from.

    `means`: the block means of q and k [B, H, nb, D] (`pool_blocks`) where the caller has them (a compiled
    caller computes them in the graph that writes q and k), else they are pooled here from q, k [B, H, S, D].
    """
    build = _compiled_block_mask_tensors() if compiled else _block_mask_tensors
    compact = compiled and q.is_cuda and resolve_backend(config.backend, q.device, q.dtype) == "flash"
    with _enough_recompiles():
        keep, *indices = build(*(means or (q, k)), means is not None, *_mask_inputs(q, layout, config, compact))
    return _from_indices(indices, keep, layout, config.block_size, config.query_merge, not compiled), keep


def _from_indices(
    indices: list[torch.Tensor], keep: torch.Tensor, layout: TileLayout, block_size: int, merge: int,
    exact_mask_mod: bool,
) -> BlockMask:
    """BlockMask from (count, indices) of the partial and of the full key blocks per kernel query block."""
    if exact_mask_mod:
        mask_mod = _exact_mask_mod(attended_mask(keep, merge), layout, block_size)
    else:
        mask_mod = _padding_mask_mod(layout, block_size, keep.device)
    S = layout.padded_length
    return BlockMask.from_kv_blocks(
        *indices, BLOCK_SIZE=(block_size * merge, block_size), mask_mod=mask_mod, seq_lengths=(S, S),
        compute_q_blocks=False,
    )


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


def _eager_flex(*args, **kwargs) -> torch.Tensor:
    # The eager path is chosen on purpose (CPU: exact, no compiler); PyTorch's advice to compile does not apply.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile", category=UserWarning)
        return flex_attention(*args, **kwargs)


#: compiled graphs allowed per process for flex_attention and for the mask build (one per sequence length, heads,
#: block size, backend, padding layout, and for the mask build per threshold and density bounds), above dynamo's
#: default of 8: past its limit dynamo would run flex_attention eagerly, where only the padding mask_mod applies and
#: the block mask is ignored (dense attention, S x S in memory), and the mask build eagerly (several times slower).
RECOMPILE_LIMIT = 64


def _enough_recompiles():
    return torch._dynamo.config.patch(recompile_limit=max(RECOMPILE_LIMIT, torch._dynamo.config.recompile_limit))


@cache
def _compiled_flex():
    # fullgraph: should the limit still be hit, dynamo raises instead of falling back to eager flex_attention
    return torch.compile(flex_attention, dynamic=False, fullgraph=True)


def attend_block_mask(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask: BlockMask, compiled: bool, backend: str = "triton"
) -> torch.Tensor:
    """flex_attention of q, k, v [B, H, S, D] on a prepared BlockMask (from `make_block_mask`).

    `compiled` must match the one the BlockMask was made with: the eager path relies on the exact
    mask_mod that `make_block_mask(..., compiled=False)` attaches. `backend` ("flash" or "triton",
    from `resolve_backend`) picks the compiled CUDA kernel.
    """
    if not compiled:
        return _eager_flex(q, k, v, block_mask=block_mask)
    options = kernel_options(backend, block_mask.BLOCK_SIZE, q.device, q.dtype) if q.is_cuda else None
    with _enough_recompiles():
        return _compiled_flex()(q, k, v, block_mask=block_mask, kernel_options=options)


def kernel_density(block_mask: BlockMask) -> torch.Tensor:
    """[H] the fraction of (kernel query block, key block) pairs that the kernel computes, mean over the
    batch: the mask density, or more where kernel query blocks attend the union of several mask rows
    (`query_block_size`)."""
    visited = block_mask.kv_num_blocks + block_mask.full_kv_num_blocks
    key_blocks = -(-block_mask.seq_lengths[1] // block_mask.BLOCK_SIZE[1])  # index rows may be narrower
    return visited.float().mean(dim=(0, 2)) / key_blocks


def too_dense(block_mask: BlockMask, limit: float) -> bool:
    """Whether the kernel would compute more than `limit` of the blocks (`kernel_density`): there the sparse
    kernel is slower than dense attention (see nabla.backend.dense_above)."""
    # The check waits for the mask on the device: only pay for it where a fallback can happen.
    return limit < 1.0 and kernel_density(block_mask).mean().item() > limit


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
    """Block-sparse attention of tile-ordered q, k, v [B, H, S, D] (S = layout.padded_length).

    Builds the block mask for `config`, turns it into a FlexAttention BlockMask and runs
    flex_attention on it (or dense attention where the mask is denser than `config.dense_above`);
    padding keys never take part. `compiled` defaults to True on CUDA (a compiled kernel, compiled
    once per shape, on `config.backend`) and False elsewhere (eager, exact, slow).
    With `return_stats`, also returns {"density": [H] fraction of blocks kept per head, "kernel_density": [H]
    fraction the kernel computes (`kernel_density`), "mask": [B, H, nb, nb], "dense": whether it ran dense,
    "backend": the kernel that ran}.
    """
    if q.shape[-2] != layout.padded_length:
        raise ValueError(f"sparse_attention: sequence length {q.shape[-2]} != padded length {layout.padded_length} of {layout}")
    compiled = q.is_cuda if compiled is None else compiled
    backend = resolve_backend(config.backend, q.device, q.dtype) if compiled else "eager"
    block_mask, keep = make_block_mask(q, k, layout, config, compiled)
    ran_dense = too_dense(block_mask, dense_above(config, backend))
    out = dense_attention(q, k, v, layout) if ran_dense else attend_block_mask(q, k, v, block_mask, compiled, backend)
    if not return_stats:
        return out
    stats = {"density": keep.float().mean(dim=(0, 2, 3)), "kernel_density": kernel_density(block_mask), "mask": keep,
             "dense": ran_dense, "backend": backend}
    return out, stats


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: TileLayout) -> torch.Tensor:
    """Dense attention of tile-ordered q, k, v over the real tokens (fastest SDPA backend); padding rows are 0."""
    if not layout.has_padding:
        return F.scaled_dot_product_attention(q, k, v)
    real = _on(layout, "tile_index", q.device)
    out = torch.zeros_like(q)
    out[:, :, real] = F.scaled_dot_product_attention(q[:, :, real], k[:, :, real], v[:, :, real])
    return out
