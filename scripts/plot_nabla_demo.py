"""The README's picture (docs/mask.png): NABLA's block mask, the STA window and their union, for one head of a small
video's tiles, from q and k that a smooth field over the token positions makes (a trained model's attention is
mostly local; random weights would give a meaningless mask).

    python scripts/plot_nabla_demo.py docs/mask.png [--threshold 0.7] [--window 3 3 3] [--seed 0]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display needed
import matplotlib.pyplot as plt
import torch

from nabla import TileLayout
from nabla.masks import nabla_block_mask, sta_block_mask

GRID = (5, 32, 48)  # latent frames, token rows, token columns: 5 x 4 x 6 tiles of 8 x 8 tokens
DIM = 64


def smooth_qk(layout: TileLayout, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """q, k [1, 1, S, D] in tile order: random Fourier features of each token's (t, h, w), so that tokens close in
    space and time have similar q and k, plus a little noise."""
    g = torch.Generator().manual_seed(seed)
    t, h, w = torch.meshgrid(*(torch.arange(n, dtype=torch.float32) for n in layout.shape), indexing="ij")
    position = torch.stack([t / 3, h / 16, w / 16], dim=-1).reshape(-1, 3)
    freqs = torch.randn(3, DIM // 2, generator=g)
    features = torch.cat([torch.sin(position @ freqs), torch.cos(position @ freqs)], dim=-1) * 1.6
    q = features + 0.3 * torch.randn(features.shape, generator=g)
    k = features + 0.3 * torch.randn(features.shape, generator=g)
    return tuple(layout.tile(x[None], dim=1)[None] for x in (q, k))


def masks(threshold: float, window: tuple[int, int, int], seed: int) -> dict[str, torch.Tensor]:
    layout = TileLayout(*GRID)
    q, k = smooth_qk(layout, seed)
    nabla = nabla_block_mask(q, k, threshold)[0, 0]
    sta = sta_block_mask(layout.grid, window)
    return {f"NABLA, threshold {threshold}": nabla, "STA, window {}x{}x{} tiles".format(*window): sta,
            "NABLA + STA": nabla | sta}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="the PNG to write")
    parser.add_argument("--threshold", type=float, default=0.7, help="NABLA's threshold (default: 0.7)")
    parser.add_argument("--window", type=int, nargs=3, default=(3, 3, 3), help="STA's window in tiles (default: 3 3 3)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the q, k field (default: 0)")
    args = parser.parse_args(argv)
    shown = masks(args.threshold, tuple(args.window), args.seed)
    fig, axes = plt.subplots(1, len(shown), figsize=(4 * len(shown), 4.4))
    for ax, (title, mask) in zip(axes, shown.items()):
        ax.imshow(mask.numpy(), cmap="Greys", interpolation="nearest")
        ax.set_title(f"{title}\n{mask.float().mean():.0%} of the blocks", fontsize=10)
        ax.set_xlabel("key tile")
        ax.set_ylabel("query tile")
    fig.suptitle("Block masks of one head: {} frames x {} x {} tiles, 64 tokens a tile".format(
        *TileLayout(*GRID).grid), fontsize=11)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
