"""Block-level masks: NABLA (adaptive, from pooled q/k) and STA (static sliding tile window).

Both return boolean masks over (query block, key block) pairs; nothing here is token-level, so
nothing is ever S x S.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch
import torch.nn.functional as F

try:  # the CUDA fast path; CPU-only installs may lack Triton
    from nabla.cdf_select import cdf_keep
except ImportError:
    cdf_keep = None


def pool_blocks(x: torch.Tensor, block_size: int, valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean of `x` [B, H, S, D] over consecutive blocks of `block_size` tokens, in float32.

    Tokens where `valid` [S] is False (padding), and the tail past S when S is not a multiple of the
    block, take no part in the means. Returns the means [B, H, nb, D] and the per-block count of
    real tokens [nb].
    """
    S = x.shape[-2]
    nb = math.ceil(S / block_size)
    weight = torch.ones(S, device=x.device) if valid is None else valid.to(device=x.device, dtype=torch.float32)
    weight = F.pad(weight, (0, nb * block_size - S))
    x = F.pad(x, (0, 0, 0, nb * block_size - S)).unflatten(-2, (nb, block_size))
    sums = (x.float() * weight.view(nb, block_size, 1)).sum(-2)
    counts = weight.view(nb, block_size).sum(-1)
    return sums / counts.clamp(min=1).unsqueeze(-1), counts


def nabla_block_mask(
    q: torch.Tensor,
    k: torch.Tensor,
    threshold: float,
    block_size: int = 64,
    *,
    valid: torch.Tensor | None = None,
    min_density: float | None = None,
    max_density: float | None = None,
) -> torch.Tensor:
    """NABLA block mask [B, H, nb, nb] for tile-ordered q, k [B, H, S, D] (nb = ceil(S / block_size)).

    Pooled map A = softmax(mean_q @ mean_k^T / sqrt(D)); in each row keep the largest entries until
    their total reaches `threshold` (the dropped tail has mass < 1 - threshold). `min_density` and
    `max_density` bound the number of kept blocks per row to [ceil(min * nb), floor(max * nb)]
    (at least one), still taken in order of pooled mass. All of it in float32.
    """
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"nabla_block_mask: threshold={threshold!r} must be in (0, 1]")
    logits, empty = pooled_logits(q, k, block_size, valid)
    return nabla_keep(logits, empty, threshold, min_density, max_density)


def nabla_keep(
    logits: torch.Tensor, empty: torch.Tensor, threshold: float, min_density: float | None, max_density: float | None
) -> torch.Tensor:
    """NABLA's block mask from the pooled logits [B, H, nb, nb] and the key blocks without a real token [nb]."""
    probs = logits.masked_fill(empty, float("-inf")).softmax(-1)
    low, high = density_bounds(probs.shape[-1], min_density, max_density)
    if probs.is_cuda and cdf_keep is not None:
        return cdf_keep(probs, threshold, low, high)  # one Triton kernel, no sort
    return cdf_keep_sorted(probs, threshold, low, high)


def pooled_logits(
    q: torch.Tensor, k: torch.Tensor, block_size: int, valid: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """NABLA's pooled logits mean_q @ mean_k^T / sqrt(D) [B, H, nb, nb] (float32), and the key blocks
    without a real token [nb] (bool), whose probability is 0."""
    qa, counts = pool_blocks(q, block_size, valid)
    ka, _ = pool_blocks(k, block_size, valid)
    return means_logits(qa, ka), counts == 0


def means_logits(q_means: torch.Tensor, k_means: torch.Tensor) -> torch.Tensor:
    """mean_q @ mean_k^T / sqrt(D) [B, H, nb, nb] from the block means [B, H, nb, D] of `pool_blocks`."""
    # scaled before the product: no pass over the nb x nb logits after it
    return (q_means / math.sqrt(q_means.shape[-1])) @ k_means.transpose(-1, -2)


def density_bounds(nb: int, min_density: float | None, max_density: float | None) -> tuple[int, int]:
    """The least and most key blocks a row keeps: [ceil(min * nb), floor(max * nb)], at least one."""
    low = max(1, math.ceil(min_density * nb)) if min_density is not None else 1
    high = max(low, math.floor(max_density * nb)) if max_density is not None else nb
    return low, high


def cdf_keep_sorted(probs: torch.Tensor, threshold: float, low: int, high: int) -> torch.Tensor:
    """NABLA's CDF binarization of each row of `probs` [..., n] by sorting: keep the largest entries
    until their mass reaches `threshold`, but at least `low` and at most `high` of them."""
    nb = probs.shape[-1]
    # Under a density cap only the `high` largest entries can be kept: top-k instead of a full sort.
    mass, order = probs.topk(high, -1) if high < nb else probs.sort(-1, descending=True)
    if threshold >= 1.0:
        keep_count = torch.full(mass.shape[:-1], nb, device=mass.device)
    else:
        # A block is kept when the mass of the larger blocks before it is still <= threshold; this is
        # the spec's "ascending running sum >= 1 - threshold" counted from the other end.
        mass_before = mass.cumsum(-1) - mass
        keep_count = (mass_before <= threshold).sum(-1)
    keep_count = keep_count.clamp(low, high)
    rank_kept = torch.arange(mass.shape[-1], device=probs.device) < keep_count.unsqueeze(-1)
    return torch.zeros_like(probs, dtype=torch.bool).scatter_(-1, order, rank_kept)


def _check_window(grid: tuple[int, int, int], window: tuple[int, int, int]) -> None:
    if len(grid) != 3 or any(not isinstance(g, int) or g < 1 for g in grid):
        raise ValueError(f"sta_block_mask: grid={grid!r} must be three positive ints (T, Ht, Wt) in tiles")
    if len(window) != 3 or any(not isinstance(w, int) or w < 1 or w % 2 == 0 for w in window):
        raise ValueError(f"sta_block_mask: window={window!r} must be three odd positive ints (wT, wH, wW) in tiles")


@lru_cache(maxsize=32)
def sta_block_mask(
    grid: tuple[int, int, int], window: tuple[int, int, int], shift_at_border: bool = False
) -> torch.Tensor:
    """STA tile mask [n, n], n = T * Ht * Wt, for tile grid (T, Ht, Wt) and window (wT, wH, wW) in tiles.

    Query tile (t, h, w) sees key tile (t', h', w') iff |t - t'| <= wT // 2, |h - h'| <= wH // 2 and
    |w - w'| <= wW // 2: the window shrinks at the borders (how the NABLA checkpoints were trained).
    With `shift_at_border` the window's centre is moved inward instead, so every query tile sees a
    full window where the grid allows (FastVideo / attention-gym STA). Cached per arguments.
    """
    grid, window = tuple(grid), tuple(window)
    _check_window(grid, window)
    mask = torch.ones(1, 1, dtype=torch.bool)
    for size, win in zip(grid, window):
        pos = torch.arange(size)
        radius = win // 2
        centre = pos.clamp(radius, max(radius, size - 1 - radius)) if shift_at_border else pos
        axis = (centre[:, None] - pos[None, :]).abs() <= radius
        # Kronecker product over axes keeps tile order: t outermost, then h, then w.
        mask = (mask[:, None, :, None] & axis[None, :, None, :]).flatten(0, 1).flatten(1, 2)
    return mask


def coarsen_block_mask(mask: torch.Tensor, factor: int) -> torch.Tensor:
    """OR-pool a [..., n, n] block mask by `factor` along both axes (e.g. 64-token tiles -> 128-token blocks)."""
    if factor == 1:
        return mask
    n = mask.shape[-1]
    nb = math.ceil(n / factor)
    padded = F.pad(mask, (0, nb * factor - n, 0, nb * factor - n))
    return padded.unflatten(-1, (nb, factor)).unflatten(-3, (nb, factor)).any(-1).any(-2)
