import pytest
import torch

from nabla.layout import TileLayout, gather_tiles

GRIDS = [(1, 8, 8), (1, 1, 1), (3, 10, 13), (2, 45, 80), (1, 30, 52), (5, 7, 9), (2, 16, 24), (1, 9, 8)]


@pytest.mark.parametrize("grid", GRIDS)
def test_untile_inverts_tile(grid, gen):
    layout = TileLayout(*grid)
    x = torch.randn(2, layout.length, 3, generator=gen)
    y = layout.tile(x, dim=1)
    assert y.shape == (2, layout.padded_length, 3)
    assert torch.equal(layout.untile(y, dim=1), x)
    # also along another dim, negative index
    x2 = torch.randn(4, 2, layout.length, generator=gen)
    assert torch.equal(layout.untile(layout.tile(x2, dim=-1), dim=-1), x2)


@pytest.mark.parametrize("grid", GRIDS)
def test_tile_order_matches_spec(grid):
    """Slot s holds token (t, h, w) with tiles frame-major, tile row, tile col; row-major inside."""
    T, H, W = grid
    layout = TileLayout(T, H, W)
    Ht, Wt = -(-H // 8), -(-W // 8)
    assert layout.grid == (T, Ht, Wt)
    assert layout.padded_length == T * Ht * Wt * 64
    raster = torch.arange(layout.length)
    tiled = layout.tile(raster.view(1, -1).float(), dim=1)[0]
    for s in range(0, layout.padded_length, max(1, layout.padded_length // 97)):
        tile, inside = divmod(s, 64)
        t, rest = divmod(tile, Ht * Wt)
        th, tw = divmod(rest, Wt)
        h, w = th * 8 + inside // 8, tw * 8 + inside % 8
        real = h < H and w < W
        assert bool(layout.valid[s]) == real
        assert tiled[s] == ((t * H + h) * W + w if real else 0)


def test_padding_is_zero_and_counts():
    layout = TileLayout(2, 45, 80)
    assert layout.has_padding and layout.grid == (2, 6, 10)
    x = torch.ones(1, layout.length, 1)
    y = layout.tile(x)
    assert y.sum() == layout.length == int(layout.valid.sum())
    assert torch.all(y[0, ~layout.valid] == 0)
    assert not TileLayout(3, 16, 8).has_padding


@pytest.mark.parametrize("bad", [(0, 8, 8), (1, -1, 8), (1, 8, 2.5)])
def test_bad_grid(bad):
    with pytest.raises(ValueError, match="must be a positive int"):
        TileLayout(*bad)


def test_wrong_length_is_rejected():
    layout = TileLayout(1, 10, 10)
    with pytest.raises(ValueError, match="100 tokens"):
        layout.tile(torch.zeros(1, 99, 2))
    with pytest.raises(ValueError, match="256 slots"):
        layout.untile(torch.zeros(1, 100, 2))


@pytest.mark.parametrize("grid", [(2, 9, 20), (1, 16, 16)])
def test_gather_tiles_equals_tile(grid, gen):
    layout = TileLayout(*grid)
    x = torch.randn(2, layout.length, 3, 5, generator=gen)
    gathered = gather_tiles(x, layout.on("cpu", "raster_index"), dim=1)
    assert torch.equal(gathered, layout.tile(x, dim=1))
    compiled = torch.compile(lambda x, i: gather_tiles(x * 2 + 1, i), dynamic=False)
    assert torch.equal(compiled(x, layout.on("cpu", "raster_index")), layout.tile(x * 2 + 1, dim=1))
