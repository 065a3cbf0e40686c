"""scripts/bench_train.py --smoke on the CPU: it runs a LoRA and a full fine-tuning step to the end and prints its
table (device time is short; a script that breaks there wastes it). The times mean nothing here."""

import sys

from scripts import bench_train


def test_bench_train_smoke(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["bench_train.py", "--smoke"])
    bench_train.main()
    lines = capsys.readouterr().out.splitlines()
    assert "skipping the NABLA rows: they run FLASH, on CUDA" in lines
    rows = lines[lines.index(bench_train.HEADER) + 2:]
    assert [row.split(" | ")[2:4] for row in rows] == [["lora", "dense"], ["full", "dense"]]
    assert all(float(row.split(" | ")[4]) > 0 for row in rows)
