import itertools
import math

import pytest
import torch

from nabla.layout import TileLayout
from nabla.masks import coarsen_block_mask, nabla_block_mask, pool_blocks, sta_block_mask


def reference_pooled_probs(q, k, block_size, valid):
    """float64 pooled softmax map, block by block with explicit loops over blocks."""
    B, H, S, D = q.shape
    nb = math.ceil(S / block_size)
    qa = torch.zeros(B, H, nb, D, dtype=torch.float64)
    ka = torch.zeros_like(qa)
    for b in range(nb):
        idx = [i for i in range(b * block_size, min(S, (b + 1) * block_size)) if valid[i]]
        qa[:, :, b] = q[:, :, idx].double().mean(2)
        ka[:, :, b] = k[:, :, idx].double().mean(2)
    return torch.softmax(qa @ ka.transpose(-1, -2) / math.sqrt(D), -1)


def reference_nabla(probs, threshold):
    """The spec literally: sort ascending, running sum c, keep entries with c >= 1 - threshold."""
    vals, order = probs.sort(-1)
    c = vals.cumsum(-1)
    keep = torch.zeros_like(probs, dtype=torch.bool).scatter(-1, order, c >= 1 - threshold)
    margin = torch.zeros_like(probs).scatter(-1, order, (c - (1 - threshold)).abs())
    return keep, margin


def random_qk(layout, heads, dim, gen, scale=1.0):
    """Token noise plus a per-tile signal of size `scale`, so pooled maps are neither flat nor one-hot."""

    def draw():
        tiles = torch.randn(2, heads, layout.num_tiles, 1, dim, generator=gen, dtype=torch.float64)
        tokens = torch.randn(2, heads, layout.num_tiles, layout.tile_size, dim, generator=gen, dtype=torch.float64)
        return (tokens + scale * tiles).flatten(2, 3)

    q, k = draw(), draw()
    # padding slots hold non-zero junk in a real model (biases), which must not leak into the means
    q[:, :, ~layout.valid] = 100.0
    k[:, :, ~layout.valid] = -100.0
    return q.float(), k.float()


@pytest.mark.parametrize("grid", [(2, 16, 16), (3, 10, 13), (2, 20, 9), (1, 45, 24)])
@pytest.mark.parametrize("threshold", [0.2, 0.5, 0.7, 0.9])
@pytest.mark.parametrize("block_size", [64, 128])
def test_nabla_matches_float64_reference(grid, threshold, block_size, gen):
    layout = TileLayout(*grid)
    q, k = random_qk(layout, 3, 16, gen)
    keep = nabla_block_mask(q, k, threshold, block_size, valid=layout.valid)
    probs = reference_pooled_probs(q, k, block_size, layout.valid)
    ref, margin = reference_nabla(probs, threshold)
    nb = math.ceil(layout.padded_length / block_size)
    assert keep.shape == ref.shape == (2, 3, nb, nb)
    differ = keep != ref
    assert torch.all(margin[differ] < 1e-5), "mismatch away from a tie"
    assert differ.float().mean() < 0.01
    # the kept set is the smallest top set whose mass exceeds the threshold
    kept_mass = (probs * keep).sum(-1)
    smallest_kept = torch.where(keep, probs, torch.inf).min(-1).values
    assert torch.all(kept_mass >= threshold - 1e-6)
    assert torch.all(kept_mass - smallest_kept <= threshold + 1e-6)
    if threshold <= 0.7:
        assert 0 < keep.float().mean() < 1


def test_threshold_one_keeps_everything(gen):
    layout = TileLayout(2, 24, 16)
    q, k = random_qk(layout, 2, 8, gen, scale=10.0)
    assert nabla_block_mask(q, k, 1.0, 64, valid=layout.valid).all()


@pytest.mark.parametrize("threshold", [0.0, -0.1, 1.5])
def test_bad_threshold(threshold):
    q = torch.randn(1, 1, 64, 4)
    with pytest.raises(ValueError, match="threshold"):
        nabla_block_mask(q, q, threshold)


def test_pool_ignores_padding(gen):
    layout = TileLayout(1, 5, 3)  # one tile, 15 real tokens of 64
    x = layout.tile(torch.randn(1, 1, 15, 4, generator=gen), dim=2)
    x[:, :, ~layout.valid] = 7.0
    means, counts = pool_blocks(x, 64, layout.valid)
    assert counts.tolist() == [15.0]
    torch.testing.assert_close(means[0, 0, 0], x[0, 0, layout.valid].mean(0))


def test_density_budget(gen):
    layout = TileLayout(4, 16, 16)  # 16 blocks of 64
    q, k = random_qk(layout, 4, 16, gen, scale=0.05)  # flat maps: threshold alone keeps most blocks
    probs = reference_pooled_probs(q, k, 64, layout.valid).float()
    free = nabla_block_mask(q, k, 0.9, 64, valid=layout.valid)
    capped = nabla_block_mask(q, k, 0.9, 64, valid=layout.valid, max_density=0.25)
    assert free.sum(-1).min() > 4
    assert torch.all(capped.sum(-1) == 4)
    # the kept blocks are the 4 largest of the row
    top = probs.topk(4, -1).indices
    assert torch.all(capped.gather(-1, top))
    assert torch.all(capped <= free)

    q, k = random_qk(layout, 4, 16, gen, scale=3.0)  # peaked maps: threshold alone keeps few
    sharp = nabla_block_mask(q, k, 0.3, 64, valid=layout.valid)
    floored = nabla_block_mask(q, k, 0.3, 64, valid=layout.valid, min_density=0.5)
    assert sharp.sum(-1).min() < 8
    assert torch.all(floored.sum(-1) == torch.clamp(sharp.sum(-1), min=8))
    assert torch.all(sharp <= floored)


def brute_force_sta(grid, window, shift=False):
    T, Ht, Wt = grid
    tiles = list(itertools.product(range(T), range(Ht), range(Wt)))
    mask = torch.zeros(len(tiles), len(tiles), dtype=torch.bool)
    for i, a in enumerate(tiles):
        centre = a
        if shift:
            centre = tuple(min(max(c, w // 2), max(w // 2, g - 1 - w // 2)) for c, w, g in zip(a, window, grid))
        for j, b in enumerate(tiles):
            mask[i, j] = all(abs(x - y) <= w // 2 for x, y, w in zip(centre, b, window))
    return mask


@pytest.mark.parametrize("grid", [(1, 1, 1), (3, 4, 5), (5, 2, 7), (21, 2, 3)])
@pytest.mark.parametrize("window", [(1, 1, 1), (3, 3, 3), (11, 3, 3), (11, 5, 5), (3, 1, 5)])
@pytest.mark.parametrize("shift", [False, True])
def test_sta_matches_brute_force(grid, window, shift):
    assert torch.equal(sta_block_mask(grid, window, shift), brute_force_sta(grid, window, shift))


def test_sta_is_cached():
    assert sta_block_mask((3, 4, 5), (3, 3, 3)) is sta_block_mask((3, 4, 5), (3, 3, 3))


@pytest.mark.parametrize("window", [(2, 3, 3), (3, 0, 3), (3, 3), (3, -1, 3)])
def test_sta_bad_window(window):
    with pytest.raises(ValueError, match="odd positive"):
        sta_block_mask((2, 2, 2), window)


def test_coarsen_is_or_pool(gen):
    m = torch.rand(2, 7, 7, generator=gen) < 0.2
    c = coarsen_block_mask(m, 2)
    assert c.shape == (2, 4, 4)
    for i, j in itertools.product(range(4), range(4)):
        assert c[:, i, j].tolist() == m[:, 2 * i : 2 * i + 2, 2 * j : 2 * j + 2].flatten(1).any(1).tolist()
