import warnings

import pytest
import torch
import torch.nn.functional as F

import nabla.backend
from nabla.attention import dense_attention, sparse_attention
from nabla.backend import DENSE_ABOVE, dense_above, kernel_options, resolve_backend
from nabla.block_mask import (
    _padding_mask_mod,
    _padding_pattern,
    attended_mask,
    build_block_mask,
    kernel_block_indices,
    make_block_mask,
    to_flex_block_mask,
)
from nabla.config import SparsityConfig
from nabla.layout import TileLayout


def tiled_qkv(layout, heads, dim, gen, batch=2):
    """Raster-ordered q, k, v [B, H, L, D] and their tile-ordered copies, with junk in padding slots."""
    raster = [torch.randn(batch, heads, layout.length, dim, generator=gen) for _ in range(3)]
    tiled = [layout.tile(x, dim=2) for x in raster]
    for x in tiled:
        x[:, :, ~layout.valid] = 5.0
    return raster, tiled


def token_mask(keep, layout, block_size):
    """Token-level reference mask from the block mask: test-only, S x S."""
    S = layout.padded_length
    dense = keep.repeat_interleave(block_size, -1).repeat_interleave(block_size, -2)[..., :S, :S]
    return dense & layout.valid


CONFIGS = [
    SparsityConfig(mode="nabla", threshold=0.5),
    SparsityConfig(mode="nabla", threshold=0.3, block_size=128),
    SparsityConfig(mode="sta", sta_window=(1, 3, 1)),
    SparsityConfig(mode="nabla+sta", threshold=0.2, sta_window=(3, 1, 1), block_size=128),
    SparsityConfig(mode="nabla", threshold=0.6, max_density=0.3),
]


@pytest.mark.parametrize("grid", [(2, 16, 16), (3, 10, 13), (2, 9, 20)])
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"{c.mode}-{c.threshold}-{c.block_size}")
def test_sparse_matches_masked_sdpa(grid, config, gen):
    layout = TileLayout(*grid)
    _, (q, k, v) = tiled_qkv(layout, 3, 16, gen)
    out, stats = sparse_attention(q, k, v, layout, config, return_stats=True)
    keep = stats["mask"]
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=token_mask(keep, layout, config.block_size))
    real = layout.valid
    torch.testing.assert_close(out[:, :, real], ref[:, :, real], atol=2e-5, rtol=1e-4)
    assert stats["density"].shape == (3,)
    torch.testing.assert_close(stats["density"], keep.float().mean((0, 2, 3)))
    assert 0 < stats["density"].min() and stats["density"].max() < 1
    assert stats["backend"] == "eager" and stats["dense"] is False


def test_dense_fallback_above_the_limit(gen):
    layout = TileLayout(2, 10, 13)
    (rq, rk, rv), (q, k, v) = tiled_qkv(layout, 2, 8, gen)
    config = SparsityConfig(mode="nabla", threshold=0.5)
    sparse, stats = sparse_attention(q, k, v, layout, config, return_stats=True)
    density = float(stats["density"].mean())
    below, low_stats = sparse_attention(q, k, v, layout, config.replace(dense_above=density * 0.9), return_stats=True)
    assert low_stats["dense"] is True
    torch.testing.assert_close(layout.untile(below, dim=2), F.scaled_dot_product_attention(rq, rk, rv),
                               atol=2e-5, rtol=1e-4)
    above, high_stats = sparse_attention(q, k, v, layout, config.replace(dense_above=min(1.0, density * 1.1)),
                                         return_stats=True)
    assert high_stats["dense"] is False and torch.equal(above, sparse)
    assert (sparse - below)[:, :, layout.valid].abs().max() > 1e-3


def test_dense_fallback_judges_what_merged_query_blocks_compute(gen):
    # 64-token rows in 128-row kernel blocks compute the union of two rows: a limit between the mask's
    # density and the union's must fall back, though the mask alone is under it
    layout = TileLayout(2, 16, 16)
    (rq, rk, rv), (q, k, v) = tiled_qkv(layout, 2, 8, gen)
    config = SparsityConfig(mode="nabla", threshold=0.3, query_block_size=128)
    _, stats = sparse_attention(q, k, v, layout, config, return_stats=True)
    mask, computed = float(stats["density"].mean()), float(stats["kernel_density"].mean())
    assert mask < computed
    out, stats = sparse_attention(q, k, v, layout, config.replace(dense_above=(mask + computed) / 2), return_stats=True)
    assert stats["dense"] is True
    torch.testing.assert_close(layout.untile(out, dim=2), F.scaled_dot_product_attention(rq, rk, rv),
                               atol=2e-5, rtol=1e-4)


def test_backend_resolution_on_the_cpu():
    assert resolve_backend("auto", "cpu") == resolve_backend("triton", "cpu") == "eager"
    with pytest.raises(ValueError, match="backend 'flash' cannot run here: it needs a CUDA GPU, not cpu") as err:
        resolve_backend("flash", "cpu")
    assert "\n" not in str(err.value)


def test_float32_takes_triton_with_tiles_that_fit(monkeypatch):
    monkeypatch.setattr(nabla.backend, "flash_unavailable_reason", lambda device: None)  # as on an H100 with FA4
    assert resolve_backend("auto", "cuda:0", torch.bfloat16) == resolve_backend("auto", "cuda:0") == "flash"
    assert resolve_backend("auto", "cuda:0", torch.float32) == "triton"
    with pytest.raises(ValueError, match="backend 'flash' cannot run here: FlashAttention-4 takes bfloat16 or "
                       "float16, not float32; use backend: auto or triton"):
        resolve_backend("flash", "cuda:0", torch.float32)
    # float32 128 x 128 tiles in three stages need more shared memory than an H100 has
    options = kernel_options("triton", (128, 128), torch.device("cuda", 0), torch.float32)
    assert options["BLOCK_M"] == options["BLOCK_N"] == 64 and options["num_stages"] == 2


def test_mask_changes_the_output(gen):
    layout = TileLayout(2, 16, 16)
    _, (q, k, v) = tiled_qkv(layout, 2, 16, gen)
    sparse = sparse_attention(q, k, v, layout, SparsityConfig(mode="nabla", threshold=0.2))
    dense = sparse_attention(q, k, v, layout, SparsityConfig(mode="nabla", threshold=1.0))
    assert (sparse - dense).abs().max() > 1e-2


@pytest.mark.parametrize("grid", [(2, 16, 16), (3, 10, 13), (1, 45, 20)])
@pytest.mark.parametrize("block_size", [64, 128])
def test_threshold_one_equals_dense_raster_attention(grid, block_size, gen):
    layout = TileLayout(*grid)
    (rq, rk, rv), (q, k, v) = tiled_qkv(layout, 2, 8, gen)
    out = sparse_attention(q, k, v, layout, SparsityConfig(mode="nabla", threshold=1.0, block_size=block_size))
    torch.testing.assert_close(layout.untile(out, dim=2), F.scaled_dot_product_attention(rq, rk, rv), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("grid", [(2, 16, 16), (3, 10, 13)])
def test_dense_attention_ignores_padding(grid, gen):
    layout = TileLayout(*grid)
    (rq, rk, rv), (q, k, v) = tiled_qkv(layout, 2, 8, gen)
    out = dense_attention(q, k, v, layout)
    torch.testing.assert_close(layout.untile(out, dim=2), F.scaled_dot_product_attention(rq, rk, rv), atol=2e-5, rtol=1e-4)


def test_block_mask_indices_match_the_boolean_mask(gen):
    layout = TileLayout(3, 10, 13)
    keep = torch.rand(2, 3, 12, 12, generator=gen) < 0.3
    block_mask = to_flex_block_mask(keep, layout, 64, exact_mask_mod=False)
    assert torch.equal(block_mask.to_dense().bool(), keep)
    # key blocks holding padding are "partial" (mask_mod runs), the others "full"
    partial = ~layout.valid.view(-1, 64).all(-1)
    assert partial.any() and not partial.all()
    full_dense = torch.zeros_like(keep)
    for b, h, r in torch.cartesian_prod(torch.arange(2), torch.arange(3), torch.arange(12)).tolist():
        n = int(block_mask.full_kv_num_blocks[b, h, r])
        full_dense[b, h, r, block_mask.full_kv_indices[b, h, r, :n].long()] = True
        assert block_mask.kv_indices[b, h, r, : int(block_mask.kv_num_blocks[b, h, r])].tolist() == sorted(
            (keep[b, h, r] & partial).nonzero().flatten().tolist()
        )
    assert torch.equal(full_dense, keep & ~partial)


@pytest.mark.parametrize("grid", [(2, 10, 13), (2, 10, 16), (2, 16, 13)], ids=["lookup", "rows-cut", "columns-cut"])
def test_compiled_block_sparse_path(grid, gen):
    """The kernel path used on GPUs (block indices + padding-only mask_mod), compiled on the CPU: with the
    mask_mod that looks `valid` up and with the two arithmetic ones."""
    layout = TileLayout(*grid)
    _, (q, k, v) = tiled_qkv(layout, 2, 16, gen, batch=1)
    config = SparsityConfig(mode="nabla+sta", threshold=0.4, sta_window=(1, 1, 1))
    out, stats = sparse_attention(q, k, v, layout, config, compiled=True, return_stats=True)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=token_mask(stats["mask"], layout, 64))
    torch.testing.assert_close(out[:, :, layout.valid], ref[:, :, layout.valid], atol=2e-5, rtol=1e-4)
    assert stats["density"].max() < 1


@pytest.mark.parametrize("grid", [(21, 45, 80), (21, 30, 52), (2, 10, 16), (2, 16, 13), (3, 8, 8), (1, 9, 20)])
@pytest.mark.parametrize("block_size", [64, 128])
def test_padding_mask_mod_is_valid_on_partial_key_blocks(grid, block_size):
    """The mask_mod runs only on key blocks that hold padding; there it must be exactly `valid` (arithmetic form
    or lookup), at the Wan shapes (720p: rows cut; 480p: rows and columns cut) and others."""
    layout = TileLayout(*grid)
    valid = F.pad(layout.valid, (0, -layout.padded_length % block_size), value=False).view(-1, block_size)
    partial = ~valid.all(-1)
    kv_idx = torch.arange(valid.numel()).view(-1, block_size)[partial]
    mask_mod = _padding_mask_mod(layout, block_size, torch.device("cpu"))
    zero = torch.zeros((), dtype=torch.long)
    assert torch.equal(mask_mod(zero, zero, zero, kv_idx), valid[partial])
    arithmetic = {((21, 45, 80), 64), ((21, 45, 80), 128), ((2, 10, 16), 64), ((2, 10, 16), 128), ((2, 16, 13), 64),
                  ((3, 8, 8), 128)}  # (3, 8, 8) in 128-token blocks: the last block's second half is past the end
    assert (_padding_pattern(layout, block_size) != (0, 0)) == ((grid, block_size) in arithmetic)


def test_compiled_path_past_dynamos_recompile_limit(gen):
    """Each new shape compiles flex_attention again; past dynamo's recompile limit it would run eagerly with the
    padding-only mask_mod, i.e. dense. Both shapes here must still give the block-sparse result."""
    config = SparsityConfig(mode="nabla", threshold=0.3)
    for grid in ((1, 10, 13), (1, 9, 20)):
        layout = TileLayout(*grid)
        _, (q, k, v) = tiled_qkv(layout, 2, 16, gen, batch=1)
        with torch._dynamo.config.patch(recompile_limit=1):
            out, stats = sparse_attention(q, k, v, layout, config, compiled=True, return_stats=True)
        ref = F.scaled_dot_product_attention(q, k, v, attn_mask=token_mask(stats["mask"], layout, 64))
        torch.testing.assert_close(out[:, :, layout.valid], ref[:, :, layout.valid], atol=2e-5, rtol=1e-4)
        assert stats["density"].max() < 1


def test_compiled_mask_build_past_dynamos_recompile_limit(gen):
    """Each threshold compiles the mask build again (dynamo specialises on it); past dynamo's recompile limit it
    would run eagerly, several times slower: a benchmark of several configs in one process, or a user's session."""
    from torch._dynamo.utils import counters

    layout = TileLayout(1, 10, 13)
    _, (q, k, _) = tiled_qkv(layout, 2, 16, gen, batch=1)
    with torch._dynamo.config.patch(recompile_limit=1):
        for threshold in (0.31, 0.52, 0.73):  # thresholds no other test compiles
            graphs = counters["stats"]["unique_graphs"]
            make_block_mask(q, k, layout, SparsityConfig(mode="nabla", threshold=threshold), compiled=True)
            assert counters["stats"]["unique_graphs"] == graphs + 1, threshold


def test_union_contains_both_masks(gen):
    layout = TileLayout(3, 16, 24)
    _, (q, k, _) = tiled_qkv(layout, 2, 16, gen)
    base = {"threshold": 0.3, "sta_window": (1, 1, 3)}
    union = build_block_mask(q, k, layout, SparsityConfig(mode="nabla+sta", **base))
    nabla = build_block_mask(q, k, layout, SparsityConfig(mode="nabla", **base))
    sta = build_block_mask(q, k, layout, SparsityConfig(mode="sta", **base))
    assert torch.equal(union, nabla | sta)
    assert not torch.equal(union, nabla) and not torch.equal(union, sta.expand_as(union))


def test_wrong_length_rejected():
    layout = TileLayout(1, 8, 8)
    x = torch.randn(1, 1, 63, 4)
    with pytest.raises(ValueError, match="padded length 64"):
        sparse_attention(x, x, x, layout, SparsityConfig(mode="nabla"))


def test_eager_path_prints_no_compile_advice(gen, monkeypatch):
    """The CPU's eager flex_attention is deliberate: PyTorch's "called without torch.compile" warning is not shown."""
    import torch.nn.attention.flex_attention as flex

    monkeypatch.setattr(flex, "_WARNINGS_SHOWN", set())  # PyTorch warns once per process: as if for the first time
    layout = TileLayout(1, 8, 16)
    q, k, v = (torch.randn(1, 2, layout.padded_length, 16, generator=gen) for _ in range(3))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sparse_attention(q, k, v, layout, SparsityConfig(mode="nabla", threshold=0.5), compiled=False)
    assert [str(w.message) for w in caught] == []
    assert flex._WARNINGS_SHOWN  # the warning was raised, and filtered


def test_dense_above_resolution():
    auto = SparsityConfig(mode="nabla", block_size=128)
    assert dense_above(auto, "flash") == DENSE_ABOVE[("flash", 128, 128)] and dense_above(auto, "eager") == 1.0
    assert dense_above(auto.replace(dense_above=0.3), "eager") == 0.3
    # a density cap below the limit: no mask can exceed it, so no per-layer check (and no device sync)
    assert dense_above(auto.replace(max_density=0.1), "flash") == 1.0
    assert dense_above(auto.replace(mode="nabla+sta", max_density=0.1), "flash") == DENSE_ABOVE[("flash", 128, 128)]
    # 64-token rows in 128-row kernel blocks: the crossover of that kernel; the union can double a cap
    merged = SparsityConfig(mode="nabla", block_size=64, query_block_size=128)
    assert dense_above(merged, "flash") == DENSE_ABOVE[("flash", 64, 128)] != DENSE_ABOVE[("flash", 64, 64)]
    assert dense_above(merged.replace(max_density=0.25), "flash") == 1.0
    assert dense_above(merged.replace(max_density=0.4), "flash") == DENSE_ABOVE[("flash", 64, 128)]


# 64-token mask rows run two by two in 128-row kernel query blocks; (3, 17, 20) has an odd number of tiles.
@pytest.mark.parametrize("grid", [(2, 16, 16), (3, 17, 20)])
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_merged_query_blocks_attend_their_union(grid, compiled, gen):
    layout = TileLayout(*grid)
    _, (q, k, v) = tiled_qkv(layout, 2, 16, gen, batch=1)
    config = SparsityConfig(mode="nabla+sta", threshold=0.3, sta_window=(1, 1, 1), query_block_size=128)
    out, stats = sparse_attention(q, k, v, layout, config, compiled=compiled, return_stats=True)
    keep = stats["mask"]
    # each row attends the union of its pair of rows (the second row of an odd last pair is its own)
    pairs = torch.cat([keep, keep[..., -1:, :]], -2) if keep.shape[-2] % 2 else keep
    union = pairs.unflatten(-2, (-1, 2)).any(-2)
    attended = union.repeat_interleave(2, -2)[..., : keep.shape[-2], :]
    assert torch.equal(attended_mask(keep, 2), attended) and (attended & ~keep).any() and not (keep & ~attended).any()
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=token_mask(attended, layout, 64))
    torch.testing.assert_close(out[:, :, layout.valid], ref[:, :, layout.valid], atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(stats["kernel_density"], union.float().mean((0, 2, 3)))
    assert (stats["kernel_density"] > stats["density"]).all()


def test_merged_kernel_block_indices(gen):
    keep = torch.rand(2, 3, 11, 11, generator=gen) < 0.3
    partial = torch.zeros(11, dtype=torch.bool)
    partial[-1] = True
    partial_count, partial_idx, full_count, full_idx = kernel_block_indices(keep, partial, 2)
    assert partial_count.shape == (2, 3, 6) and full_idx.shape == (2, 3, 6, 11)
    for b, h, r in torch.cartesian_prod(torch.arange(2), torch.arange(3), torch.arange(6)).tolist():
        either = keep[b, h, 2 * r : 2 * r + 2].any(0)
        assert partial_idx[b, h, r, : partial_count[b, h, r]].tolist() == (either & partial).nonzero().flatten().tolist()
        assert full_idx[b, h, r, : full_count[b, h, r]].tolist() == (either & ~partial).nonzero().flatten().tolist()


def dense_rows(counts, indices, columns):
    """bool [..., rows, columns] from FlexAttention's (count, indices) per row (entries past count are junk)."""
    taken = torch.arange(indices.shape[-1]) < counts.unsqueeze(-1)
    return torch.zeros(*indices.shape[:-1], columns + 1, dtype=torch.bool).scatter_(
        -1, torch.where(taken, indices, columns).long(), True)[..., :columns]


@pytest.mark.parametrize("config", [SparsityConfig(mode="nabla", threshold=0.4, block_size=128),
                                    SparsityConfig(mode="nabla+sta", threshold=0.3, sta_window=(1, 1, 1)),
                                    SparsityConfig(mode="nabla", threshold=0.4, query_block_size=128)],
                         ids=["nabla-128", "nabla+sta-64", "64-in-128"])
def test_backward_q_indices_are_torchs_transpose_of_the_kv_indices(config, gen):
    from torch.nn.attention.flex_attention import BlockMask

    layout = TileLayout(3, 10, 24)  # full key blocks and partial ones
    q, k = (torch.randn(2, 3, layout.padded_length, 8, generator=gen) for _ in range(2))
    mask, keep = make_block_mask(q, k, layout, config, compiled=False, for_backward=True)
    reference = BlockMask.from_kv_blocks(mask.kv_num_blocks, mask.kv_indices, mask.full_kv_num_blocks,
                                         mask.full_kv_indices, BLOCK_SIZE=mask.BLOCK_SIZE,
                                         seq_lengths=mask.seq_lengths, compute_q_blocks=True)
    query_blocks, attended = mask.kv_indices.shape[-2], 0
    for side in ("", "full_"):
        counts, indices = getattr(mask, f"{side}q_num_blocks"), getattr(mask, f"{side}q_indices")
        assert indices.is_contiguous() and indices.dtype == counts.dtype == torch.int32
        ours = dense_rows(counts, indices, query_blocks)
        assert torch.equal(ours, dense_rows(getattr(reference, f"{side}q_num_blocks"),
                                            getattr(reference, f"{side}q_indices"), query_blocks))
        taken = torch.arange(indices.shape[-1]) < counts.unsqueeze(-1)  # ascending, as the kernels walk them
        assert (indices.diff(dim=-1)[taken[..., 1:]] > 0).all()
        attended += int(ours.sum())
    assert attended == int(attended_mask(keep, config.query_merge)[..., :: config.query_merge, :].sum())
    assert 0 < attended < mask.kv_indices.shape[-1] * query_blocks * 6
    no_q_side = make_block_mask(q, k, layout, config, compiled=False)[0]
    assert no_q_side.q_indices is None and torch.equal(no_q_side.kv_indices, mask.kv_indices)
