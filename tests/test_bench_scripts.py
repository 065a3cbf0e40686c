"""The GPU benchmark scripts, in their --smoke mode on the CPU: they run to the end and print their table.

Device time is short; a script that breaks there wastes it. These runs time nothing that matters.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


@pytest.mark.parametrize("command, header", [
    ([sys.executable, "scripts/bench_attention.py", "--smoke"],
     "| shape | kernel | density | kernel density | mask build ms | attention total ms | TFLOP/s | speedup |"),
    ([sys.executable, "scripts/bench_e2e.py", "--smoke", "--fp8", "--cache", "--video-steps", "5",
      "--cache-warmup-steps", "2", "--block-sizes", "128", "64/128"],
     ("| variant | steps computed | s/step | vs stock | vs dense compiled | density | attention share | mask share "
      "| mask / sparse call | first call s | peak GiB | s per video (5 steps) |")),
    ([*TORCHRUN, "scripts/bench_parallel.py", "--smoke"], "| GPUs | attention | s/step | speedup vs 1 GPU |"),
    ([sys.executable, "scripts/bench_backward.py", "--smoke"],
     "| shape | kernel | forward ms | forward + backward ms | vs dense SDPA | note |"),
    ([sys.executable, "scripts/bench_mask.py", "--smoke"],
     ("| shape | inputs | block | mask ms wall / GPU | sparse call ms wall / GPU | mask share wall / GPU "
      "| block means in kernels of their own ms |")),
], ids=["attention", "e2e", "parallel", "backward", "mask"])
def test_benchmark_runs_to_its_table(command, header, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "OUT": str(tmp_path)}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert header in lines
    rows = lines[lines.index(header) + 2:]
    assert len(rows) >= 3 and all(row.startswith("| ") for row in rows)
    if "--cache" in command:  # the cache row computes fewer steps than it runs; FP8 rows need a GPU of 8.9+
        # the whole 5-step schedule: step 0 computed, then interval 2 (steps 1 and 3 computed, 2 and 4 cached)
        assert any(row.startswith("| NABLA + cache") and "| 3/5 |" in row for row in rows)
        assert "skipping the NABLA + FP8 rows: precision fp8 needs a CUDA GPU" in result.stdout
        # 64-token rows in 128-row kernel blocks: the kernel computes more blocks than the mask keeps
        merged = next(row for row in rows if row.startswith("| NABLA auto, block 64/128, compiled"))
        density, kernel = merged.split(" | ")[5].replace("(kernel ", "").rstrip(")").split()
        assert float(kernel) > float(density)
