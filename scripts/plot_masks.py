"""Plot a `generate.py --stats` report: the density heat map and one block mask.

    python scripts/plot_masks.py stats.json --out plots/
    python scripts/plot_masks.py stats.json --out plots/ --layer 3 --head 7 --step 49

Writes into --out (created if missing):
- density.png: mean mask density (over heads and CFG passes) per layer (rows) and denoising step
  (columns); steps that ran dense have no records and stay blank.
- mask_l{L}_h{H}_s{S}.png: the block mask of layer L, head H, step S (first batch element), read from
  the `.masks.pt` beside the report; kept (query block, key block) pairs are dark. Only the steps
  saved by --stats are there (by default the first sparse step and the last step); --step defaults
  to the first saved one, --layer and --head to 0.
Exit code 2, with one line on stderr, for a missing file or a layer/head/step that was not saved.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display needed
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.ticker import MaxNLocator

from wan.generate.stats import load_masks, masks_path, unpack_mask


def density_grid(report: dict) -> tuple[np.ndarray, list[int], list[int]]:
    """Mean density [layers, steps] (NaN where no sparse call was recorded), the layer and step indices."""
    steps = list(range(int(report["settings"]["steps"])))
    records = report["records"]
    layers = list(range(max((r["layer"] for r in records), default=-1) + 1))
    grid = np.full((len(layers), len(steps)), np.nan)
    for r in records:
        grid[r["layer"], r["step"]] = float(np.mean(r["density"]))
    return grid, layers, steps


def plot_density(report: dict, path: Path) -> Path:
    grid, layers, steps = density_grid(report)
    fig, ax = plt.subplots(figsize=(max(4.0, 0.25 * len(steps) + 2), max(3.0, 0.2 * len(layers) + 1.5)))
    if grid.size:
        image = ax.imshow(np.ma.masked_invalid(grid), aspect="auto", origin="lower", cmap="viridis", vmin=0.0,
                          vmax=1.0, interpolation="nearest")
        fig.colorbar(image, ax=ax, label="mean mask density")
    else:
        ax.text(0.5, 0.5, "no sparse attention calls recorded\n(all steps dense)", ha="center", va="center",
                transform=ax.transAxes)
    ax.set_xlabel("denoising step")
    ax.set_ylabel("layer")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    totals = report["totals"]
    mean = "n/a" if totals["mean_density"] is None else f"{totals['mean_density']:.3f}"
    ax.set_title(f"{report['config']['mode']}: mean density {mean}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_mask(mask: np.ndarray, title: str, path: Path) -> Path:
    """One [nb, nb] bool block mask; dpi grows with nb so that blocks stay about a pixel or more."""
    nb = mask.shape[-1]
    fig, ax = plt.subplots(figsize=(6.0, 5.5))
    ax.imshow(mask, cmap="Greys", vmin=0, vmax=1, interpolation="nearest")
    ax.set_xlabel("key block")
    ax.set_ylabel("query block")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=int(min(300, max(100, nb // 4))))
    plt.close(fig)
    return path


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stats", type=Path, help="JSON written by generate.py --stats")
    p.add_argument("--out", type=Path, required=True, help="folder for the PNGs (created if missing)")
    p.add_argument("--layer", type=int, default=0, help="layer of the mask image (default: 0)")
    p.add_argument("--head", type=int, default=0, help="head of the mask image (default: 0)")
    p.add_argument("--step", type=int, help="denoising step of the mask image (default: the first saved step)")
    return p


def run(args: argparse.Namespace) -> list[Path]:
    if not args.stats.is_file():
        raise ValueError(f"stats: {args.stats} not found")
    report = json.loads(args.stats.read_text())
    args.out.mkdir(parents=True, exist_ok=True)
    written = [plot_density(report, args.out / "density.png")]

    mask_file = args.stats.parent / report["masks_file"] if report.get("masks_file") else masks_path(args.stats)
    entries = load_masks(mask_file) if mask_file.is_file() else []
    if not entries:
        if args.step is not None:
            raise ValueError(f"masks: no block masks saved in {mask_file} (all steps dense?)")
        print(f"no block masks in {mask_file}; wrote only the density map", file=sys.stderr)
        return written
    saved = sorted({(e["step"], e["layer"]) for e in entries})
    step = saved[0][0] if args.step is None else args.step
    entry = next((e for e in entries if e["step"] == step and e["layer"] == args.layer), None)
    if entry is None:
        pairs = ", ".join(f"step {s} layer {l}" for s, l in saved)
        raise ValueError(f"masks: step {step}, layer {args.layer} was not saved; saved: {pairs}")
    heads = entry["shape"][0]
    if not 0 <= args.head < heads:
        raise ValueError(f"masks: head {args.head} out of range; the model has {heads} heads (0..{heads - 1})")
    mask = unpack_mask(entry)[args.head].numpy()
    title = f"layer {args.layer}, head {args.head}, step {step}: density {mask.mean():.3f}"
    written.append(plot_mask(mask, title, args.out / f"mask_l{args.layer}_h{args.head}_s{step}.png"))
    return written


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        written = run(args)
    except (ValueError, OSError, KeyError, json.JSONDecodeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for path in written:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
