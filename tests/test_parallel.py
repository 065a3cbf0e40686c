"""Multi-process sampling on the CPU (gloo): Ulysses 2 and CFG parallel 2 against one process."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "torchrun_generate.py"
CONFIGS = {
    "full": "sparsity: {mode: full}\n",
    "nabla": "sparsity: {mode: nabla, threshold: 0.5}\n",
    # of the 2 steps, step 1 comes from the cache
    "cached": "sparsity: {mode: nabla, threshold: 0.5}\ncache: {type: taylorseer, cache_interval: 2, "
              "disable_cache_before_step: 1}\n",
}


def run(tmp_path, model, config, out, *extra, procs=1, size=("64", "96")):
    config_path = tmp_path / f"{config}.yaml"
    config_path.write_text(CONFIGS[config])
    args = ["--prompt", "a cat plays piano", "--model", str(model), "--config", str(config_path), "--output", str(out),
            "--height", size[0], "--width", size[1], "--frames", "9", "--steps", "2", *extra]
    launcher = [sys.executable, str(WORKER)]
    if procs > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}", str(WORKER)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([*launcher, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("config, mode", [("full", "ulysses"), ("full", "cfg"), ("nabla", "ulysses"), ("nabla", "cfg"),
                                          ("cached", "ulysses")])
def test_two_processes_match_one(tiny_model, tmp_path, config, mode):
    single = run(tmp_path, tiny_model, config, tmp_path / "one.mp4")
    assert single.returncode == 0, single.stderr[-2000:]
    flags = ["--ulysses", "2"] if mode == "ulysses" else ["--cfg-parallel"]
    multi = run(tmp_path, tiny_model, config, tmp_path / "two.mp4", *flags, procs=2)
    assert multi.returncode == 0, multi.stderr[-3000:]
    one, two = np.load(tmp_path / "one.mp4"), np.load(tmp_path / "two.mp4")
    assert one.shape == two.shape == (9, 64, 96, 3)
    np.testing.assert_allclose(two, one, atol=1e-4)
    assert multi.stdout.count("wrote ") == 1  # rank 0 alone reports
    if config == "cached":  # the cache did skip a step, on every rank alike (else the all-to-alls would hang)
        assert all("denoising steps computed: 1 of 2" in r.stdout for r in (single, multi))
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".mp4") == ["one.mp4", "two.mp4"]


def test_ulysses_and_cfg_parallel_together(tiny_model, tmp_path):
    """4 processes: two CFG groups of two Ulysses ranks, NABLA, equal to one process."""
    single = run(tmp_path, tiny_model, "nabla", tmp_path / "one.mp4")
    multi = run(tmp_path, tiny_model, "nabla", tmp_path / "four.mp4", "--ulysses", "2", "--cfg-parallel", procs=4)
    assert single.returncode == 0 and multi.returncode == 0, multi.stderr[-3000:]
    np.testing.assert_allclose(np.load(tmp_path / "four.mp4"), np.load(tmp_path / "one.mp4"), atol=1e-4)
    assert multi.stdout.count("wrote ") == 1


def test_odd_sequence_full_attention(tiny_model, tmp_path):
    """27 tokens do not split over 2 ranks: diffusers' "anything" Ulysses mode takes them."""
    single = run(tmp_path, tiny_model, "full", tmp_path / "one.mp4", size=("48", "48"))
    multi = run(tmp_path, tiny_model, "full", tmp_path / "two.mp4", "--ulysses", "2", procs=2, size=("48", "48"))
    assert single.returncode == 0 and multi.returncode == 0, multi.stderr[-3000:]
    np.testing.assert_allclose(np.load(tmp_path / "two.mp4"), np.load(tmp_path / "one.mp4"), atol=1e-4)


def test_bad_degree_names_allowed_ones(tiny_model, tmp_path):
    """The tiny model has 2 heads: a degree of 4 (4 processes would be needed) is refused with the allowed ones."""
    from wan.parallel import allowed_degrees, check_degree

    assert allowed_degrees(12) == [1, 2, 3, 4, 6, 12] and allowed_degrees(40) == [1, 2, 4, 5, 8, 10, 20, 40]
    with pytest.raises(ValueError, match="--ulysses 3 does not divide the model's 40 attention heads; allowed degrees: 1, 2, 4, 5, 8, 10, 20, 40"):
        check_degree(40, 3)
    result = run(tmp_path, tiny_model, "nabla", tmp_path / "v.mp4", "--ulysses", "2")  # one process, degree 2
    assert result.returncode == 2
    assert "--ulysses 2 needs 2 processes (torchrun --nproc_per_node=2" in result.stderr
    assert not (tmp_path / "v.mp4").exists()
