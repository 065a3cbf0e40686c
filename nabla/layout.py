"""Token layout: the permutation between raster order (t, h, w) and tile order.

A (T, H, W) token grid is cut into tiles of (1, 8, 8) tokens; tiles are ordered frame-major, then
tile row, then tile column, and tokens inside a tile row-major. When H or W is not a multiple of the
tile, the grid is padded at the bottom and right up to whole tiles (1280x720 video: H = 45 -> 48).
Padding tokens are zero vectors in tiled tensors; `valid` marks the real ones so that attention and
the pooled means ignore the rest, and `untile` drops them again.
"""

from __future__ import annotations

import math
from functools import cached_property

import torch
import torch.nn.functional as F


class TileLayout:
    """Permutation (with padding) between a raster-ordered (T, H, W) token grid and tile order."""

    def __init__(self, T: int, H: int, W: int, tile: tuple[int, int, int] = (1, 8, 8)) -> None:
        for name, value in (("T", T), ("H", H), ("W", W)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"TileLayout: {name}={value!r} must be a positive int")
        if len(tile) != 3 or any(not isinstance(s, int) or s < 1 for s in tile):
            raise ValueError(f"TileLayout: tile={tile!r} must be three positive ints")
        self.shape = (T, H, W)
        self.tile_shape = tuple(tile)
        #: tile grid (Tt, Ht, Wt): number of tiles along each axis, after padding
        self.grid = tuple(math.ceil(n / s) for n, s in zip(self.shape, self.tile_shape))
        self.padded_shape = tuple(g * s for g, s in zip(self.grid, self.tile_shape))
        self.length = T * H * W
        self.padded_length = math.prod(self.padded_shape)
        self.tile_size = math.prod(self.tile_shape)
        self.num_tiles = math.prod(self.grid)

    def __repr__(self) -> str:
        return f"TileLayout(shape={self.shape}, tile={self.tile_shape}, grid={self.grid})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, TileLayout) and (self.shape, self.tile_shape) == (other.shape, other.tile_shape)

    def __hash__(self) -> int:
        return hash((self.shape, self.tile_shape))

    @property
    def has_padding(self) -> bool:
        return self.padded_length != self.length

    @cached_property
    def raster_index(self) -> torch.Tensor:
        """int64 [padded_length]: for each tile-order slot, its raster index, or `length` if padding."""
        T, H, W = self.shape
        pT, pH, pW = self.padded_shape
        t, h, w = torch.meshgrid(torch.arange(pT), torch.arange(pH), torch.arange(pW), indexing="ij")
        idx = torch.where((t < T) & (h < H) & (w < W), (t * H + h) * W + w, self.length)
        gT, gH, gW = self.grid
        sT, sH, sW = self.tile_shape
        # (gT sT, gH sH, gW sW) -> (gT, gH, gW, sT, sH, sW): tiles outer, tokens inside a tile inner.
        idx = idx.view(gT, sT, gH, sH, gW, sW).permute(0, 2, 4, 1, 3, 5)
        return idx.reshape(-1).contiguous()

    @cached_property
    def tile_index(self) -> torch.Tensor:
        """int64 [length]: for each raster token, its slot in tile order (the inverse of raster_index)."""
        inverse = torch.empty(self.length, dtype=torch.long)
        slots = torch.arange(self.padded_length)
        real = self.raster_index < self.length
        inverse[self.raster_index[real]] = slots[real]
        return inverse

    @cached_property
    def valid(self) -> torch.Tensor:
        """bool [padded_length]: True for real tokens, False for padding, in tile order."""
        return self.raster_index < self.length

    def valid_on(self, device: torch.device | str) -> torch.Tensor:
        return _on(self, "valid", device)

    def on(self, device: torch.device | str, name: str) -> torch.Tensor:
        """A cached copy on `device` of one of the index tensors ("raster_index", "tile_index", "valid")."""
        return _on(self, name, device)

    def tile(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """Reorder raster-ordered `x` (size `length` along `dim`) into tile order, zero-padded."""
        dim = dim % x.ndim
        if x.shape[dim] != self.length:
            raise ValueError(f"TileLayout.tile: size {x.shape[dim]} along dim {dim} != {self.length} tokens of {self}")
        if not self.has_padding:
            return x.index_select(dim, _on(self, "raster_index", x.device))
        # one scatter into zeros: no padded copy of x first
        shape = list(x.shape)
        shape[dim] = self.padded_length
        return x.new_zeros(shape).index_copy_(dim, _on(self, "tile_index", x.device), x)

    def untile(self, y: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """Exact inverse of `tile`: back to raster order, padding dropped."""
        dim = dim % y.ndim
        if y.shape[dim] != self.padded_length:
            raise ValueError(
                f"TileLayout.untile: size {y.shape[dim]} along dim {dim} != {self.padded_length} slots of {self}"
            )
        return y.index_select(dim, _on(self, "tile_index", y.device))


def gather_tiles(x: torch.Tensor, raster_index: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """`layout.tile(x, dim)` as one gather, given `raster_index = layout.on(x.device, "raster_index")`.

    Padding slots read a zero appended to `x`. Under torch.compile the pad and the gather fuse with
    the op that produced `x`, so x itself is never written; eagerly, `TileLayout.tile` copies less.
    """
    dim = dim % x.ndim
    return F.pad(x, [0, 0] * (x.ndim - 1 - dim) + [0, 1]).index_select(dim, raster_index)


def _on(layout: TileLayout, name: str, device: torch.device | str) -> torch.Tensor:
    """A cached copy of one of the layout's index tensors on `device` (no host-device copy per call)."""
    cache = layout.__dict__.setdefault("_device_cache", {})
    key = (name, str(torch.device(device)))
    if key not in cache:
        cache[key] = getattr(layout, name).to(device)
    return cache[key]
