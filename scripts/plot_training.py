"""Plot a fine-tuning run's loss (and learning rate) from its JSONL log.

    python scripts/plot_training.py runs/fox            # writes runs/fox/loss.png
    python scripts/plot_training.py runs/fox --output loss.png --smooth 50
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display needed
import matplotlib.pyplot as plt
import numpy as np

from wan.io.files import atomic_write
from wan.train.run_folder import read_log


def moving_average(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing mean over up to `window` values (the first points average what there is)."""
    sums = np.cumsum(np.insert(values, 0, 0.0))
    starts = np.maximum(np.arange(1, len(values) + 1) - window, 0)
    return (sums[1:] - sums[starts]) / (np.arange(1, len(values) + 1) - starts)


def plot(run: Path, output: Path, smooth: int) -> Path:
    log = read_log(run)
    if not log:
        raise ValueError(f"{run} has no log entries (log.jsonl)")
    steps = np.array([e["step"] for e in log])
    loss = np.array([e["loss"] for e in log], dtype=float)
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6), sharex=True, height_ratios=(3, 1))
    top.plot(steps, loss, alpha=0.3, label="loss")
    top.plot(steps, moving_average(loss, smooth), label=f"mean of {smooth}")
    top.set_ylabel("flow-matching loss")
    top.legend()
    bottom.plot(steps, [e["lr"] for e in log])
    bottom.set_ylabel("learning rate")
    bottom.set_xlabel("optimizer step")
    fig.tight_layout()
    atomic_write(output, lambda tmp: fig.savefig(tmp, dpi=100))
    plt.close(fig)
    return output


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="the run folder (finetune.py train --output)")
    parser.add_argument("--output", type=Path, help="image to write (default: RUN/loss.png)")
    parser.add_argument("--smooth", type=int, default=20, help="moving-average window in steps (default: 20)")
    args = parser.parse_args()
    print(f"wrote {plot(args.run, args.output or args.run / 'loss.png', max(1, args.smooth))}")


if __name__ == "__main__":
    main()
