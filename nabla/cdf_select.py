"""NABLA's CDF binarization as one Triton kernel: a row of the pooled map in registers, no sort.

For probabilities p >= 0 the int32 bit patterns order like the floats, so thresholds can be found
by bisection over bit patterns, exactly, in at most 31 steps a row (log2 of the range of the row's
bit patterns), fewer where a test lands on the answer or a peaked row's answer is checked first.
With S(>b) the mass of the entries above bit pattern b (non-increasing in b), an entry x is kept iff
S(>x) <= threshold (the mass of the larger entries does not yet reach the threshold) iff
bits(x) >= b*, the smallest b with S(>b) <= threshold. The density bounds clamp b* between the bit
patterns of the `high`-th and the `low`-th largest entries. Same result as sorting, except at exact ties.

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


# A row of n entries is held in two chunks of powers of two, A (the largest below n) and B (the rest, rounded
# up): n = 1260 takes 1024 + 256 lanes instead of 2048; lanes past the row would cost as much as entries.
# A row's fixed work (softmax, scans, stores) costs about as much as its bisections (docs/GPU-FACTS.md): the kernels below take one scan per chunk for both index lists and scan for ties only where a row
# has them; the count search stops once a test lands on exactly k entries (~10 steps instead of ~21 on random
# rows), and both searches check a peaked row's answer first (1 step instead of 29).


@triton.jit
def _sum(a, b):
    return tl.sum(a, axis=0) + tl.sum(b, axis=0)


@triton.jit
def _min2(a, b):
    return tl.minimum(tl.min(a, axis=0), tl.min(b, axis=0))


@triton.jit
def _smallest_bits_with_mass_at_most(pa, pb, bits_a, bits_b, threshold, lo, hi):
    # The answer lies in [lo, hi] and S(>hi) <= threshold. Where the entries at hi alone hold more than the
    # threshold (a peaked row's largest entry), hi is the answer.
    lo = tl.where(_sum(tl.where(bits_a >= hi, pa, 0.0), tl.where(bits_b >= hi, pb, 0.0)) > threshold, hi, lo)
    while lo < hi:
        mid = lo + (hi - lo) // 2
        ok = _sum(tl.where(bits_a > mid, pa, 0.0), tl.where(bits_b > mid, pb, 0.0)) <= threshold
        hi = tl.where(ok, mid, hi)
        lo = tl.where(ok, lo, mid + 1)
    return hi


@triton.jit
def _largest_bits_with_count_at_least(bits_a, bits_b, k, lo, hi):
    # lo, hi: count(>= lo) >= k > count(>= hi + 1), lo an entry. The answer is the k-th largest entry; it is lo
    # where fewer than k lie above lo (a peaked row whose small entries all underflow to 0).
    above_lo = _sum((bits_a > lo).to(tl.int32), (bits_b > lo).to(tl.int32))
    hi = tl.where(above_lo < k, lo, hi)
    while lo < hi:
        mid = lo + (hi - lo + 1) // 2
        count = _sum((bits_a >= mid).to(tl.int32), (bits_b >= mid).to(tl.int32))
        ok = count >= k
        lo = tl.where(ok, mid, lo)
        # exactly k at or above mid: the answer is the least of them (taken below)
        hi = tl.where(ok, tl.where(count == k, mid, hi), mid - 1)
    return _min2(tl.where(bits_a >= lo, bits_a, 0x7FFFFFFF), tl.where(bits_b >= lo, bits_b, 0x7FFFFFFF))


@triton.jit
def _row_keep(pa, pb, inside_a, inside_b, threshold, low, high,
              ONE: tl.constexpr, CAP_HIGH: tl.constexpr, RAISE_LOW: tl.constexpr):
    """The kept lanes of one row of probabilities in chunks `pa`, `pb` (0 past the row)."""
    bits_a = tl.where(inside_a, pa.to(tl.int32, bitcast=True), -1)  # lanes past the row: below every entry
    bits_b = tl.where(inside_b, pb.to(tl.int32, bitcast=True), -1)
    top = tl.maximum(tl.max(bits_a, axis=0), tl.max(bits_b, axis=0))
    bottom = tl.minimum(tl.min(tl.where(inside_a, bits_a, ONE), axis=0),
                        tl.min(tl.where(inside_b, bits_b, ONE), axis=0))
    # The cut is the mass cut clamped to [cap cut, floor cut]: the count bounds are searched first and the mass
    # cut only between them, and only where it does not lie beyond one of them (then that bound is the cut).
    bound = tl.full((), -1, tl.int32)  # the count that a binding density bound sets, else -1
    lo, hi = bottom, top
    if CAP_HIGH:
        lo = _largest_bits_with_count_at_least(bits_a, bits_b, high, bottom, top)  # keeps ~high
    if RAISE_LOW:
        hi = _largest_bits_with_count_at_least(bits_a, bits_b, low, lo, top)  # keeps ~low (count(>= lo) >= low)
    if CAP_HIGH:
        at_cap = _sum(tl.where(bits_a > lo, pa, 0.0), tl.where(bits_b > lo, pb, 0.0)) <= threshold
        bound = tl.where(at_cap, high, bound)
        hi = tl.where(at_cap, lo, hi)
        lo = tl.where(at_cap, lo, lo + 1)
    if RAISE_LOW:
        at_floor = _sum(tl.where(bits_a > hi, pa, 0.0), tl.where(bits_b > hi, pb, 0.0)) > threshold
        bound = tl.where(at_floor, low, bound)
        lo = tl.where(at_floor, hi, lo)
    # (the mass search always keeps the largest entry, so low <= 1 needs no floor)
    cut = _smallest_bits_with_mass_at_most(pa, pb, bits_a, bits_b, threshold, lo, hi)
    keep_a, keep_b = bits_a >= cut, bits_b >= cut
    if CAP_HIGH or RAISE_LOW:  # noqa: SIM102 (a constexpr branch, compiled out; the inner one runs per row)
        # A bound keeps exactly its count, as sorting does: of the entries tied at the cut (probabilities that
        # underflow to 0 in a peaked row, say), only the first ones, so that a tie cannot keep the whole row.
        # Only rows with such ties need the scans.
        if (bound >= 0) & (_sum(keep_a.to(tl.int32), keep_b.to(tl.int32)) != bound):
            tied_a, tied_b = (bits_a == cut).to(tl.int32), (bits_b == cut).to(tl.int32)
            room = bound - _sum((bits_a > cut).to(tl.int32), (bits_b > cut).to(tl.int32))
            keep_a = (bits_a > cut) | ((tied_a != 0) & (tl.cumsum(tied_a, axis=0) <= room))
            keep_b = (bits_b > cut) | ((tied_b != 0) & (tl.cumsum(tied_b, axis=0) + tl.sum(tied_a, axis=0) <= room))
    return keep_a, keep_b


@triton.jit
def _cdf_keep_kernel(
    probs_ptr, keep_ptr, n, threshold, low, high,
    BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, ONE: tl.constexpr, CAP_HIGH: tl.constexpr,
    RAISE_LOW: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs_a, offs_b = tl.arange(0, BLOCK_A), BLOCK_A + tl.arange(0, BLOCK_B)
    inside_a, inside_b = offs_a < n, offs_b < n
    pa = tl.load(probs_ptr + row * n + offs_a, mask=inside_a, other=0.0)
    pb = tl.load(probs_ptr + row * n + offs_b, mask=inside_b, other=0.0)
    keep_a, keep_b = _row_keep(pa, pb, inside_a, inside_b, threshold, low, high, ONE, CAP_HIGH, RAISE_LOW)
    tl.store(keep_ptr + row * n + offs_a, keep_a, mask=inside_a)
    tl.store(keep_ptr + row * n + offs_b, keep_b, mask=inside_b)


@triton.jit
def _store_list(sel_a, sel_b, running_a, running_b, count, offs_a, offs_b, inside_a, inside_b, counts_ptr,
                indices_ptr, row, width):
    """Row `row` of (count, indices [width]) from the running count of selected columns (inclusive): the selected
    columns ascending, then the others ascending up to `width`."""
    slot_a = tl.where(sel_a, running_a - 1, count + offs_a - running_a)
    slot_b = tl.where(sel_b, running_b - 1, count + offs_b - running_b)
    tl.store(indices_ptr + row * width + slot_a, offs_a, mask=inside_a & (slot_a < width))
    tl.store(indices_ptr + row * width + slot_b, offs_b, mask=inside_b & (slot_b < width))
    tl.store(counts_ptr + row, count)


@triton.jit
def _nabla_row(logits_ptr, sta_ptr, keep_ptr, row, n, offs_a, offs_b, inside_a, inside_b, empty_a, empty_b,
               threshold, low, high,
               ONE: tl.constexpr, CAP_HIGH: tl.constexpr, RAISE_LOW: tl.constexpr, HAS_STA: tl.constexpr):
    """One row of the block mask from its pooled logits (softmax, cut, STA union), stored and returned."""
    xa = tl.load(logits_ptr + row * n + offs_a, mask=inside_a & ~empty_a, other=float("-inf"))
    xb = tl.load(logits_ptr + row * n + offs_b, mask=inside_b & ~empty_b, other=float("-inf"))
    top = tl.maximum(tl.max(xa, axis=0), tl.max(xb, axis=0))
    ea, eb = tl.exp(xa - top), tl.exp(xb - top)
    total = _sum(ea, eb)
    keep_a, keep_b = _row_keep(ea / total, eb / total, inside_a, inside_b, threshold, low, high, ONE, CAP_HIGH,
                               RAISE_LOW)
    keep_a, keep_b = keep_a & inside_a, keep_b & inside_b
    if HAS_STA:
        keep_a = keep_a | (tl.load(sta_ptr + (row % n) * n + offs_a, mask=inside_a, other=0) != 0)
        keep_b = keep_b | (tl.load(sta_ptr + (row % n) * n + offs_b, mask=inside_b, other=0) != 0)
    tl.store(keep_ptr + row * n + offs_a, keep_a, mask=inside_a)
    tl.store(keep_ptr + row * n + offs_b, keep_b, mask=inside_b)
    return keep_a, keep_b


@triton.jit
def _nabla_indices_kernel(
    logits_ptr, empty_ptr, sta_ptr, partial_ptr, keep_ptr,
    partial_counts_ptr, partial_indices_ptr, full_counts_ptr, full_indices_ptr,
    n, n_q, threshold, low, high, partial_width, full_width,
    BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, ONE: tl.constexpr, CAP_HIGH: tl.constexpr,
    RAISE_LOW: tl.constexpr, HAS_STA: tl.constexpr, MERGE: tl.constexpr,
):
    q_row = tl.program_id(0).to(tl.int64)  # a kernel query block: MERGE consecutive rows of the mask
    first = (q_row // n_q) * n + (q_row % n_q) * MERGE
    offs_a, offs_b = tl.arange(0, BLOCK_A), BLOCK_A + tl.arange(0, BLOCK_B)
    inside_a, inside_b = offs_a < n, offs_b < n
    # key blocks without a real token
    empty_a = tl.load(empty_ptr + offs_a, mask=inside_a, other=1) != 0
    empty_b = tl.load(empty_ptr + offs_b, mask=inside_b, other=1) != 0
    keep_a, keep_b = _nabla_row(logits_ptr, sta_ptr, keep_ptr, first, n, offs_a, offs_b, inside_a, inside_b,
                                empty_a, empty_b, threshold, low, high, ONE, CAP_HIGH, RAISE_LOW, HAS_STA)
    # key blocks holding padding
    partial_a = tl.load(partial_ptr + offs_a, mask=inside_a, other=0) != 0
    partial_b = tl.load(partial_ptr + offs_b, mask=inside_b, other=0) != 0
    if MERGE == 2:
        # the second row; an odd last kernel block repeats the first (its rows past the end hold padding)
        second = tl.minimum(first + 1, (q_row // n_q) * n + n - 1)
        other_a, other_b = _nabla_row(logits_ptr, sta_ptr, keep_ptr, second, n, offs_a, offs_b, inside_a, inside_b,
                                      empty_a, empty_b, threshold, low, high, ONE, CAP_HIGH, RAISE_LOW, HAS_STA)
        keep_a, keep_b = keep_a | other_a, keep_b | other_b  # both rows attend the union
    part_a, part_b, full_a, full_b = keep_a & partial_a, keep_b & partial_b, keep_a & ~partial_a, keep_b & ~partial_b
    # one scan a chunk for both lists: the partial selection in the low 16 bits, the full one in the high (n < 2^16)
    packed_a = part_a.to(tl.int32) + (full_a.to(tl.int32) << 16)
    packed_b = part_b.to(tl.int32) + (full_b.to(tl.int32) << 16)
    total_a = tl.sum(packed_a, axis=0)
    running_a = tl.cumsum(packed_a, axis=0)
    running_b = tl.cumsum(packed_b, axis=0) + total_a
    total = total_a + tl.sum(packed_b, axis=0)
    _store_list(part_a, part_b, running_a & 0xFFFF, running_b & 0xFFFF, total & 0xFFFF, offs_a, offs_b, inside_a,
                inside_b, partial_counts_ptr, partial_indices_ptr, q_row, partial_width)
    _store_list(full_a, full_b, running_a >> 16, running_b >> 16, total >> 16, offs_a, offs_b, inside_a, inside_b,
                full_counts_ptr, full_indices_ptr, q_row, full_width)


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
    if n >= 1 << 16:  # the kernel counts both index lists in the two halves of an int32
        raise ValueError(f"nabla_block_indices: {n} key blocks; allowed: fewer than 65536")
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


def row_chunks(n: int) -> tuple[int, int]:
    """The two power-of-two chunks that hold a row of n entries: the largest power of two below n, and the
    rest rounded up to one (1260 -> 1024 + 256; 1024 -> 512 + 512)."""
    first = 1 << max(0, (n - 1).bit_length() - 1)
    return first, triton.next_power_of_2(max(1, n - first))


def _meta(n: int, low: int, high: int) -> dict:
    block_a, block_b = row_chunks(n)
    # The bisections are chains of row-wide sums: fewer warps per row mean fewer cross-warp syncs per sum and
    # more rows in flight: one warp up to 1024 entries, two at 2048 (the fastest at both Wan shapes,
    # docs/GPU-FACTS.md).
    return {"BLOCK_A": block_a, "BLOCK_B": block_b, "ONE": ONE_BITS, "CAP_HIGH": high < n, "RAISE_LOW": low > 1,
            "num_warps": max(1, triton.next_power_of_2(n) // 1024)}
