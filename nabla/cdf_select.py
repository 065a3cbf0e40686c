"""NABLA's CDF binarization as one Triton kernel: a row of the pooled map in registers, no sort.

For probabilities p >= 0 the int32 bit patterns order like the floats, so thresholds can be found
by bisection over bit patterns, exactly, in 31 steps a row. With S(>b) the mass of the entries
above bit pattern b (non-increasing in b), an entry x is kept iff S(>x) <= threshold (the mass of
the larger entries does not yet reach the threshold) iff bits(x) >= b*, the smallest b with
S(>b) <= threshold. The density bounds clamp b* between the bit patterns of the `high`-th and the
`low`-th largest entries. Same result as sorting, except at exact ties.

`nabla_block_indices` runs the whole block mask in that one kernel: the softmax of the pooled logits,
the cut, the union with STA, and the per-row (count, ascending indices) of the kept key blocks that
FlexAttention's BlockMask takes, so that no pass over the [B, H, nb, nb] mask follows.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

ONE_BITS = 0x3F800000  # bit pattern of 1.0f: no probability lies above it


@triton.jit
def _smallest_bits_with_mass_at_most(p, bits, threshold, lo, ONE: tl.constexpr):
    hi = ONE  # S(>hi) = 0 <= threshold always holds: the answer lies in [lo, hi]
    for _ in range(31):
        mid = lo + (hi - lo) // 2
        ok = tl.sum(tl.where(bits > mid, p, 0.0), axis=0) <= threshold
        hi = tl.where(ok, mid, hi)
        lo = tl.where(ok, lo, mid + 1)
    return hi


@triton.jit
def _largest_bits_with_count_at_least(bits, k, ONE: tl.constexpr):
    lo, hi = 0, ONE + 1  # count(>= 0) = n >= k; count(>= ONE + 1) = 0 < k
    for _ in range(31):
        mid = lo + (hi - lo + 1) // 2
        ok = tl.sum((bits >= mid).to(tl.int32), axis=0) >= k
        lo = tl.where(ok, mid, lo)
        hi = tl.where(ok, hi, mid - 1)
    return lo


@triton.jit
def _row_keep(p, inside, threshold, low, high, ONE: tl.constexpr, CAP_HIGH: tl.constexpr, RAISE_LOW: tl.constexpr):
    """The kept lanes of one row of probabilities `p` (0 past the row)."""
    bits = tl.where(inside, p.to(tl.int32, bitcast=True), -1)  # lanes past the row: below every entry
    # The cut is max(mass cut, cap cut), then min(that, floor cut). Each bisection is a chain of 31 row-wide
    # sums, so search only where a bound binds: under a cap, the cap's cut first (it binds where caps are set)
    # and the mass search only above it, where it keeps fewer (S(>cut) > threshold means the mass cut is higher).
    bound = tl.full((), -1, tl.int32)  # the count that a binding density bound sets, else -1
    if CAP_HIGH:
        cut = _largest_bits_with_count_at_least(bits, high, ONE)  # at most ~high kept
        bound = bound * 0 + high
        if tl.sum(tl.where(bits > cut, p, 0.0), axis=0) > threshold:
            cut = _smallest_bits_with_mass_at_most(p, bits, threshold, cut + 1, ONE)
            bound = bound * 0 - 1
    else:
        cut = _smallest_bits_with_mass_at_most(p, bits, threshold, tl.full((), 0, tl.int32), ONE)
    # (the mass search always keeps the largest entry, so low <= 1 holds by itself)
    if RAISE_LOW:  # noqa: SIM102 (a constexpr branch: compiled out, not a runtime test)
        if tl.sum((bits >= cut).to(tl.int32), axis=0) < low:
            cut = _largest_bits_with_count_at_least(bits, low, ONE)  # at least low kept
            bound = bound * 0 + low
    keep = bits >= cut
    if CAP_HIGH or RAISE_LOW:
        # A bound keeps exactly its count, as sorting does: of the entries tied at the cut (probabilities that
        # underflow to 0 in a peaked row, say), only the first ones, so that a tie cannot keep the whole row.
        tied = bits == cut
        room = bound - tl.sum((bits > cut).to(tl.int32), axis=0)
        keep = tl.where(bound >= 0, (bits > cut) | (tied & (tl.cumsum(tied.to(tl.int32), axis=0) <= room)), keep)
    return keep


@triton.jit
def _cdf_keep_kernel(
    probs_ptr, keep_ptr, n, threshold, low, high,
    BLOCK: tl.constexpr, ONE: tl.constexpr, CAP_HIGH: tl.constexpr, RAISE_LOW: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    inside = offs < n
    p = tl.load(probs_ptr + row * n + offs, mask=inside, other=0.0)
    keep = _row_keep(p, inside, threshold, low, high, ONE, CAP_HIGH, RAISE_LOW)
    tl.store(keep_ptr + row * n + offs, keep, mask=inside)


@triton.jit
def _store_compacted(selected, offs, inside, counts_ptr, indices_ptr, row, width):
    """Row `row` of (count, indices [width]): the selected columns ascending, then the others ascending up to
    `width` (every slot written, so the output needs no zero fill; FlexAttention reads only the first
    `count`, which never exceeds `width`)."""
    sel = selected.to(tl.int32)
    running = tl.cumsum(sel, axis=0)  # selected columns up to and including this one
    count = tl.sum(sel, axis=0)
    slot = tl.where(selected, running - 1, count + offs - running)
    tl.store(indices_ptr + row * width + slot, offs, mask=inside & (slot < width))
    tl.store(counts_ptr + row, count)


@triton.jit
def _nabla_row(logits_ptr, sta_ptr, keep_ptr, row, n, offs, inside, empty, threshold, low, high,
               ONE: tl.constexpr, CAP_HIGH: tl.constexpr, RAISE_LOW: tl.constexpr, HAS_STA: tl.constexpr):
    """One row of the block mask from its pooled logits (softmax, cut, STA union), stored and returned."""
    x = tl.load(logits_ptr + row * n + offs, mask=inside & ~empty, other=float("-inf"))
    e = tl.exp(x - tl.max(x, axis=0))
    keep = _row_keep(e / tl.sum(e, axis=0), inside, threshold, low, high, ONE, CAP_HIGH, RAISE_LOW) & inside
    if HAS_STA:
        keep = keep | (tl.load(sta_ptr + (row % n) * n + offs, mask=inside, other=0) != 0)
    tl.store(keep_ptr + row * n + offs, keep, mask=inside)
    return keep


@triton.jit
def _nabla_indices_kernel(
    logits_ptr, empty_ptr, sta_ptr, partial_ptr, keep_ptr,
    partial_counts_ptr, partial_indices_ptr, full_counts_ptr, full_indices_ptr,
    n, n_q, threshold, low, high, partial_width, full_width,
    BLOCK: tl.constexpr, ONE: tl.constexpr, CAP_HIGH: tl.constexpr, RAISE_LOW: tl.constexpr, HAS_STA: tl.constexpr,
    MERGE: tl.constexpr,
):
    q_row = tl.program_id(0).to(tl.int64)  # a kernel query block: MERGE consecutive rows of the mask
    first = (q_row // n_q) * n + (q_row % n_q) * MERGE
    offs = tl.arange(0, BLOCK)
    inside = offs < n
    empty = tl.load(empty_ptr + offs, mask=inside, other=1) != 0  # key blocks without a real token
    keep = _nabla_row(logits_ptr, sta_ptr, keep_ptr, first, n, offs, inside, empty, threshold, low, high,
                      ONE, CAP_HIGH, RAISE_LOW, HAS_STA)
    partial = tl.load(partial_ptr + offs, mask=inside, other=0) != 0  # key blocks holding padding
    if MERGE == 2:
        # the second row; an odd last kernel block repeats the first (its rows past the end hold padding)
        second = tl.minimum(first + 1, (q_row // n_q) * n + n - 1)
        other = _nabla_row(logits_ptr, sta_ptr, keep_ptr, second, n, offs, inside, empty, threshold, low, high,
                           ONE, CAP_HIGH, RAISE_LOW, HAS_STA)
        keep = keep | other  # both rows attend the union
    _store_compacted(keep & partial, offs, inside, partial_counts_ptr, partial_indices_ptr, q_row, partial_width)
    _store_compacted(keep & ~partial, offs, inside, full_counts_ptr, full_indices_ptr, q_row, full_width)


@torch.library.triton_op("nabla::cdf_keep", mutates_args=())
def cdf_keep(probs: torch.Tensor, threshold: float, low: int, high: int) -> torch.Tensor:
    """Boolean mask of the entries NABLA keeps in each row of `probs` [..., n] (float32, rows sum to 1).

    A torch custom op, so torch.compile keeps the kernel inside the compiled mask builder.
    """
    probs = probs.contiguous()
    n = probs.shape[-1]
    keep = torch.empty_like(probs, dtype=torch.bool)
    torch.library.wrap_triton(_cdf_keep_kernel)[(probs.numel() // n,)](
        probs, keep, n, _threshold(threshold), low, high, **_meta(n, low, high)
    )
    return keep


@torch.library.triton_op("nabla::nabla_block_indices", mutates_args=())
def nabla_block_indices(
    logits: torch.Tensor,
    empty: torch.Tensor,
    threshold: float,
    low: int,
    high: int,
    partial: torch.Tensor,
    sta: Optional[torch.Tensor],  # noqa: UP045 (torch.library reads the annotation at runtime)
    merge: int = 1,
    widths: Optional[list[int]] = None,  # noqa: UP045
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """NABLA's block mask and its FlexAttention indices from the pooled logits, in one kernel.

    `logits` [B, H, nb, nb] float32 (scaled pooled q @ k^T), `empty` [nb] bool (key blocks without a
    real token: probability 0), `partial` [nb] bool (key blocks holding padding), `sta` [nb, nb] bool
    or None (kept as well). Returns keep [B, H, nb, nb] bool and, per kernel query block (`merge`
    consecutive mask rows, 1 or 2, which attend the union of their key blocks), the count and indices
    of the kept key blocks that hold padding, then of the full ones (int32; indices beyond the count
    hold the other blocks). `widths`: the (partial, full) index columns to keep, each at least the most
    blocks such a row can hold (FlexAttention reads only the first `count`); nb each by default.
    """
    if merge not in (1, 2):
        raise ValueError(f"nabla_block_indices: merge={merge!r}; allowed: 1 or 2")
    logits = logits.contiguous()
    n = logits.shape[-1]
    n_q = -(-n // merge)
    widths = list(widths) if widths is not None else [n, n]
    if len(widths) != 2 or not all(1 <= w <= n for w in widths):
        raise ValueError(f"nabla_block_indices: widths={widths!r}; allowed: two ints in [1, {n}]")
    keep = torch.empty_like(logits, dtype=torch.bool)
    rows = (*logits.shape[:-2], n_q)
    outputs = [keep]
    for width in widths:
        outputs += [logits.new_empty(rows, dtype=torch.int32), logits.new_empty((*rows, width), dtype=torch.int32)]
    torch.library.wrap_triton(_nabla_indices_kernel)[(logits.numel() // n // n * n_q,)](
        logits, empty, sta if sta is not None else empty, partial, *outputs, n, n_q, _threshold(threshold), low,
        high, *widths, HAS_STA=sta is not None, MERGE=merge, **_meta(n, low, high),
    )
    return tuple(outputs)


def _threshold(threshold: float) -> float:
    # threshold 1.0 keeps every entry: S(>b) <= 1 holds from b = 0, even with rounding in the sums
    return float("inf") if threshold >= 1.0 else float(threshold)


def _meta(n: int, low: int, high: int) -> dict:
    block = triton.next_power_of_2(n)
    # The bisections are chains of row-wide sums: fewer warps per row mean fewer cross-warp syncs per sum and
    # more rows in flight. Fastest on the H100 at both Wan shapes: one warp up to 1024 entries, two at 2048.
    return {"BLOCK": block, "ONE": ONE_BITS, "CAP_HIGH": high < n, "RAISE_LOW": low > 1,
            "num_warps": max(1, block // 1024)}
