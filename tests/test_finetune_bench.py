"""scripts/bench_train.py --smoke on the CPU: it runs a LoRA and a full fine-tuning step to the end and prints its
table (device time is short; a script that breaks there wastes it). The times mean nothing here."""

import os
import subprocess
import sys
from pathlib import Path

from scripts.bench_train import HEADER

ROOT = Path(__file__).resolve().parents[1]


def test_bench_train_smoke():
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "scripts/bench_train.py", "--smoke"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert "skipping the NABLA rows: FlexAttention has no backward on the CPU" in lines
    rows = lines[lines.index(HEADER) + 2:]
    assert [row.split(" | ")[2:4] for row in rows] == [["lora", "dense"], ["full", "dense"]]
    assert all(float(row.split(" | ")[4]) > 0 for row in rows)
