"""NABLA's CDF binarization as one Triton kernel: a row of the pooled map in registers, no sort.

For probabilities p >= 0 the int32 bit patterns order like the floats, so thresholds can be found
by bisection over bit patterns, exactly, in 31 steps a row. With S(>b) the mass of the entries
above bit pattern b (non-increasing in b), an entry x is kept iff S(>x) <= threshold (the mass of
the larger entries does not yet reach the threshold) iff bits(x) >= b*, the smallest b with
S(>b) <= threshold. The density bounds clamp b* between the bit patterns of the `high`-th and the
`low`-th largest entries. Same result as sorting, except at exact ties.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

ONE_BITS = 0x3F800000  # bit pattern of 1.0f: no probability lies above it


@triton.jit
def _smallest_bits_with_mass_at_most(p, bits, threshold, ONE: tl.constexpr):
    lo, hi = 0, ONE  # S(>hi) = 0 <= threshold always holds: the answer lies in [lo, hi]
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
def _cdf_keep_kernel(
    probs_ptr, keep_ptr, n, threshold, low, high,
    BLOCK: tl.constexpr, ONE: tl.constexpr, CAP_HIGH: tl.constexpr, RAISE_LOW: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    inside = offs < n
    p = tl.load(probs_ptr + row * n + offs, mask=inside, other=0.0)
    bits = tl.where(inside, p.to(tl.int32, bitcast=True), -1)  # lanes past the row: below every entry
    cut = _smallest_bits_with_mass_at_most(p, bits, threshold, ONE)
    # The bounds cost a bisection each: skip those that cannot bind (the mass search always keeps the
    # largest entry, so low <= 1 holds by itself; high >= n never caps).
    if CAP_HIGH:
        cut = tl.maximum(cut, _largest_bits_with_count_at_least(bits, high, ONE))  # at most ~high kept
    if RAISE_LOW:
        cut = tl.minimum(cut, _largest_bits_with_count_at_least(bits, low, ONE))  # at least low kept
    tl.store(keep_ptr + row * n + offs, bits >= cut, mask=inside)


@torch.library.triton_op("nabla::cdf_keep", mutates_args=())
def cdf_keep(probs: torch.Tensor, threshold: float, low: int, high: int) -> torch.Tensor:
    """Boolean mask of the entries NABLA keeps in each row of `probs` [..., n] (float32, rows sum to 1).

    A torch custom op, so torch.compile keeps the kernel inside the compiled mask builder.
    """
    probs = probs.contiguous()
    n = probs.shape[-1]
    keep = torch.empty_like(probs, dtype=torch.bool)
    rows = probs.numel() // n
    # threshold 1.0 keeps every entry: S(>b) <= 1 holds from b = 0, even with rounding in the sums
    thr = float("inf") if threshold >= 1.0 else float(threshold)
    torch.library.wrap_triton(_cdf_keep_kernel)[(rows,)](
        probs, keep, n, thr, low, high, BLOCK=triton.next_power_of_2(n), ONE=ONE_BITS, CAP_HIGH=high < n,
        RAISE_LOW=low > 1,
    )
    return keep
