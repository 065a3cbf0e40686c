"""scripts/bench_train.py --smoke on the CPU: it runs a LoRA and a full fine-tuning step of Wan, and a Kandinsky 5
LoRA step dense and under its NABLA configs, to the end and prints its table (GPU time is costly; a script that breaks
there wastes it). The times mean nothing here."""

import math
import sys

import pytest

from scripts import bench_train

K5_CAPPED = ", max density 0.3"


@pytest.mark.parametrize("flags, rows", [
    ([], [["lora", "dense"], ["full", "dense"]]),
    (["--arch", "k5-lite", "--max-density", "0.3"],
     [["lora", "dense"], ["lora", "NABLA trained (P 0.9 + STA, block 64)" + K5_CAPPED],
      ["lora", "kandinsky5-fast (query block 128)" + K5_CAPPED]]),
], ids=["wan", "kandinsky5"])
def test_bench_train_smoke(flags, rows, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["bench_train.py", "--smoke", "--layers", "1", *flags])
    bench_train.main()
    lines = capsys.readouterr().out.splitlines()
    table = [row.split(" | ") for row in lines[lines.index(bench_train.HEADER) + 2:]]
    assert [row[2:4] for row in table] == rows
    assert all(float(row[4]) > 0 for row in table)
    if not flags:
        assert "skipping the NABLA rows: they run FLASH, on CUDA" in lines
        return
    # Kandinsky 5's batches through make_batch (channels-last, visual_cond, pooled CLIP): a LoRA step with finite
    # losses; its NABLA rows trained sparse, under the cap (uncapped, its trained P keeps 0.96 of the blocks here)
    assert table[0][1] == "512x256x5" and all(math.isfinite(float(x)) for row in table for x in row[11][:-2].split(", "))
    assert float(table[0][6]) == 1.0 and all(float(row[6]) < 0.9 for row in table[1:])


def test_bench_train_refuses_full_fine_tuning_of_kandinsky5(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["bench_train.py", "--arch", "k5-lite", "--methods", "lora", "full"])
    with pytest.raises(SystemExit):
        bench_train.main()
    assert "finetune trains a LoRA on Kandinsky 5" in capsys.readouterr().err


def test_bench_train_under_torchrun_gives_one_process_losses(monkeypatch, capsys, tmp_path):
    """Two gloo processes (FSDP2), the global batch of 2 split between them, against one process (here) accumulating
    it: the same losses (the two-GPU run of issue 27 is this command on NCCL)."""
    from tests import forked

    def table(lines: list[str]) -> list[list[str]]:
        return [row.split(" | ") for row in lines[lines.index(bench_train.HEADER) + 2:]]

    args = ["--smoke", "--batch", "2"]
    # torchrun's two ranks (tests.forked) go on while the one-process run goes on here: both cores busy
    ranks = forked.start("scripts/bench_train.py", args, tmp_path / "ranks", procs=2, env={"OMP_NUM_THREADS": "1"})
    try:
        monkeypatch.setattr(sys, "argv", ["bench_train.py", *args])
        bench_train.main()
        result = ranks.wait(timeout=300)
    finally:
        ranks.kill()
    out, err = result.stdout, result.stderr
    assert result.returncode == 0, err[-3000:]
    two, one = table(out.splitlines()), table(capsys.readouterr().out.splitlines())
    assert [row[9] for row in two] == ["2", "2"] and [row[9] for row in one] == ["1", "1"]
    for a, b in zip(two, one):
        assert [float(x) for x in a[11].strip(" |").split(", ")] == pytest.approx(
            [float(x) for x in b[11].strip(" |").split(", ")], rel=1e-4)


def test_memory_trace_lists_what_is_alive_at_the_peak():
    from wan.benchmarking import alive_at_peak, memory_report

    def event(action, addr, size):
        frames = [{"filename": "/torch/x.py", "line": 1, "name": "f"}, {"filename": "/w/wan/processor.py", "line": 9,
                                                                         "name": "attend"}]
        return {"action": action, "addr": addr, "size": size * 2**20, "frames": frames}

    events = [event("alloc", 1, 100), event("alloc", 2, 50), event("free_requested", 1, 100),
              event("free_completed", 1, 100), event("alloc", 3, 120), event("alloc", 4, 10),
              event("free_completed", 3, 120), event("alloc", 5, 170), event("free_completed", 2, 50)]
    snapshot = {"device_traces": [events]}
    # totals 100, 150, 50, 170, 180, 60, 230, 180: the peak is 230 with 2, 4 and 5 alive
    peak, alive = alive_at_peak(snapshot)
    assert peak == 230 * 2**20 and sorted(event["addr"] for event in alive) == [2, 4, 5]
    assert memory_report(snapshot, top=2).splitlines()[1:] == ["    1 x    170.00 MiB  processor.py:9 attend",
                                                               "    1 x     50.00 MiB  processor.py:9 attend"]


def test_kandinsky5_rows_train_on_cuda():
    """CUDA's flex_attention backward takes 128-token key blocks only: there the NABLA row keeps the trained P and
    window on 128-token blocks, and every row passes the check finetune makes before loading."""
    import torch

    from nabla.backend import check_trainable

    config = bench_train.build_config("k5-lite")
    on_cpu = bench_train.k5_variants(config, None, torch.device("cpu"))
    on_cuda = bench_train.k5_variants(config, 0.2, torch.device("cuda"))
    assert [s.block_size for _, s in on_cpu[1:]] == [64, 64]
    assert len(on_cuda) == 2 and on_cuda[1][1].block_size == 128 and on_cuda[1][1].max_density == 0.2
    assert (on_cuda[1][1].threshold, on_cuda[1][1].sta_window) == (on_cpu[1][1].threshold, on_cpu[1][1].sta_window)
    for _, sparsity in on_cuda:
        check_trainable(sparsity, "cuda")
    with pytest.raises(ValueError, match="block_size 64 cannot train on CUDA"):
        check_trainable(on_cpu[1][1], "cuda")
