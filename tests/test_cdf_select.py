"""The CUDA Triton kernel for NABLA's CDF binarization, run by Triton's interpreter on the CPU."""

import pytest

from tests.triton_helpers import make_hopper_ir

CHECK = r"""
import math, torch
from nabla.cdf_select import cdf_keep
from nabla.masks import cdf_keep_sorted
torch.manual_seed(int.from_bytes(__import__("os").urandom(4), "little"))
checked = 0
for n in (1, 37, 130):
    bounds = ((1, n), (max(1, n // 3), n), (1, max(1, n // 4)), (max(1, n // 2), max(1, n // 2)))
    for i, threshold in enumerate((0.1, 0.5, 0.95, 1.0)):
        for low, high in bounds[i % 2::2]:  # each threshold two of the bounds, each bound two thresholds
            probs = (torch.randn(1, 3, n) * 2.5).softmax(-1)
            fast, ref = cdf_keep(probs, threshold, low, high), cdf_keep_sorted(probs, threshold, low, high)
            if not torch.equal(fast, ref):
                # only near-ties at the cut may differ: float sums in another order
                vals = probs.sort(-1, descending=True).values
                gap = ((vals.cumsum(-1) - vals) - threshold).abs().min()
                assert gap < 1e-6, (n, threshold, low, high, (fast != ref).sum().item(), gap.item())
            counts = fast.sum(-1)
            assert counts.min() >= low and counts.max() <= high, (n, threshold, low, high)
            checked += 1
# Peaked rows: most probabilities underflow to exactly 0, all tied at a count bound's cut. A bound keeps
# exactly its count (sorting's), of those tied the first ones, never the whole row.
for low, high in ((1, 10), (40, 40), (30, 130)):
    probs = (torch.randn(2, 3, 130) * 300).softmax(-1)
    assert (probs == 0).sum(-1).min() > 40
    for threshold in (0.5, 1.0):
        fast, ref = cdf_keep(probs, threshold, low, high), cdf_keep_sorted(probs, threshold, low, high)
        assert torch.equal(fast.sum(-1), ref.sum(-1)), (low, high, threshold, fast.sum(-1), ref.sum(-1))
        assert torch.equal(fast & (probs > 0), ref & (probs > 0)), (low, high, threshold)
        zero = probs == 0
        first = zero & (zero.cumsum(-1) <= (fast & zero).sum(-1, keepdim=True))  # the first zeros in row order
        assert torch.equal(fast & zero, first), (low, high, threshold)
        checked += 1
print("checked", checked)
"""


def test_triton_kernel_matches_sorting(interpreted):
    assert "checked 30" in interpreted("cdf-cut")


# The fused kernel: softmax, cut, STA union and FlexAttention's (count, indices), against the torch path.
CHECK_INDICES = r"""
import torch
from nabla.block_mask import _index_widths, _padded_valid, _partial_cols, _sta_blocks, kernel_block_indices
from nabla.cdf_select import nabla_block_indices
from nabla.config import SparsityConfig
from nabla.layout import TileLayout
from nabla.masks import cdf_keep_sorted, density_bounds, pooled_logits
torch.manual_seed(int.from_bytes(__import__("os").urandom(4), "little"))
checked = 0
CONFIGS = (SparsityConfig(mode="nabla", threshold=0.5), SparsityConfig(mode="nabla", threshold=1.0),
           SparsityConfig(mode="nabla", threshold=0.9, max_density=0.3, block_size=128),
           SparsityConfig(mode="nabla", threshold=0.05, min_density=0.4),
           SparsityConfig(mode="nabla+sta", threshold=0.3, sta_window=(1, 3, 3)))
# 8 tiles with padding: every config; 4 without: a plain cut and the STA union (the interpreter is slow)
for grid, configs in (((2, 10, 13), CONFIGS), ((1, 16, 16), CONFIGS[::4])):
    layout = TileLayout(*grid)
    for config in configs:
        bs = config.block_size
        q, k = (torch.randn(1, 2, layout.padded_length, 16) * 3 for _ in range(2))  # the kernel runs B x H alike
        logits, empty = pooled_logits(q, k, bs, layout.valid)
        nb = logits.shape[-1]
        low, high = density_bounds(nb, config.min_density, config.max_density)
        partial = _partial_cols(_padded_valid(layout, bs, "cpu"), bs)
        sta = _sta_blocks(layout, config, torch.device("cpu")) if config.uses_sta else None
        probs = logits.masked_fill(empty, float("-inf")).softmax(-1)
        ref = cdf_keep_sorted(probs, config.threshold, low, high)
        if sta is not None:
            ref = ref | sta
        # kernel query blocks of one mask row, and for 64-token blocks of two (attending their union)
        for merge in (1, 2) if bs == 64 else (1,):
            # every other call with index rows only as wide as a row's count can get (what FLASH runs)
            widths = _index_widths(layout, config.replace(query_block_size=bs * merge)) if checked % 2 else None
            keep, *indices = nabla_block_indices(logits, empty, config.threshold, low, high, partial, sta, merge, widths)
            differ = keep != ref
            if differ.any():  # only near-ties at the cut: float sums in another order
                vals = probs.sort(-1, descending=True).values
                gap = ((vals.cumsum(-1) - vals) - config.threshold).abs().min()
                assert gap < 1e-6 and differ.sum() <= 2, (grid, config, int(differ.sum()), float(gap))
            expected = kernel_block_indices(keep, partial, merge)
            for count, idx, ref_count, ref_idx in zip(indices[::2], indices[1::2], expected[::2], expected[1::2]):
                assert torch.equal(count, ref_count), (grid, config, merge)
                taken = torch.arange(idx.shape[-1]) < count.unsqueeze(-1)
                assert torch.equal(idx[taken], ref_idx[..., : idx.shape[-1]][taken]), (grid, config, merge)
                if widths is None:
                    assert torch.equal(idx.sort(-1).values, torch.arange(nb, dtype=torch.int32).expand_as(idx)), "not a permutation"
            if widths is not None:
                assert [t.shape[-1] for t in indices[1::2]] == list(widths) and sum(widths) <= nb + 1, (grid, config, widths)
            if merge == 1:
                assert int(indices[0].sum() + indices[2].sum()) == int(keep.sum())
            checked += 1
print("checked", checked)
"""


def test_fused_mask_kernel_matches_the_torch_path(interpreted):
    assert "checked 13" in interpreted("cdf-indices")


def test_kernels_compile_for_hopper():
    """Triton's CUDA front end on the CPU (no GPU): what the interpreter runs must also compile to Triton IR,
    for every branch the constexprs select (the interpreter accepts code that the compiler refuses)."""
    import itertools

    from nabla.cdf_select import ONE_BITS, _cdf_keep_kernel, _nabla_indices_kernel

    pointers = {"logits_ptr": "*fp32", "probs_ptr": "*fp32"} | dict.fromkeys(
        ("empty_ptr", "sta_ptr", "partial_ptr", "keep_ptr"), "*i1") | dict.fromkeys(
        ("partial_counts_ptr", "partial_indices_ptr", "full_counts_ptr", "full_indices_ptr"), "*i32")
    scalars = dict.fromkeys(("n", "n_q", "low", "high", "partial_width", "full_width"), "i32") | {"threshold": "fp32"}
    compiled = 0
    for kernel in (_cdf_keep_kernel, _nabla_indices_kernel):
        flags = [name for name in ("CAP_HIGH", "RAISE_LOW", "HAS_STA") if name in kernel.arg_names]
        for values in itertools.product((False, True), repeat=len(flags)):
            for merge in (1, 2) if "MERGE" in kernel.arg_names else (None,):
                constants = {"BLOCK_A": 1024, "BLOCK_B": 256, "ONE": ONE_BITS, **dict(zip(flags, values))}
                if merge is not None:
                    constants["MERGE"] = merge
                make_hopper_ir(kernel, constants, pointers | scalars)
                compiled += 1
    assert compiled == 4 + 8 * 2


def test_fused_mask_kernel_refuses_rows_its_counts_cannot_hold():
    """Both index lists are counted in the halves of one int32: 2^16 key blocks a row must be refused, not wrapped."""
    import torch

    from nabla.cdf_select import nabla_block_indices

    n = 1 << 16
    logits, cols = torch.zeros(1, 1, 1, n), torch.zeros(n, dtype=torch.bool)
    with pytest.raises(ValueError, match="65536 key blocks; allowed: fewer than 65536"):
        nabla_block_indices(logits, cols, 0.5, 1, n, cols, None)
