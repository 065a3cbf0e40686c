"""Multi-process sampling on the CPU (gloo): Ulysses 2 and CFG parallel 2 together against one process.

The one-process references run once per config and size, in this process; each multi-process case is one
torchrun-like launch of generate.py (tests.forked: ranks forked with torchrun's environment, imports paid once),
writing raw frames (--output NAME.npy: exact, where MP4 encoding is lossy).
"""

from pathlib import Path

import numpy as np
import pytest

import generate
from tests import forked

CONFIGS = {
    "full": "sparsity: {mode: full}\n",
    "nabla": "sparsity: {mode: nabla, threshold: 0.5}\n",
    # of the 2 steps, step 1 comes from the cache
    "cached": "sparsity: {mode: nabla, threshold: 0.5}\ncache: {type: taylorseer, cache_interval: 2, "
              "disable_cache_before_step: 1}\n",
}


def cli_args(folder: Path, model: Path, config: str, out: Path, size: tuple[str, str]) -> list[str]:
    config_path = folder / f"{config}.yaml"
    config_path.write_text(CONFIGS[config])
    return ["--prompt", "a cat plays piano", "--model", str(model), "--config", str(config_path), "--output", str(out),
            "--height", size[0], "--width", size[1], "--frames", "9", "--steps", "2"]


@pytest.fixture(scope="module")
def single(tiny_model, tmp_path_factory):
    """The one-process video for (config, size), computed on first use."""
    folder, videos = tmp_path_factory.mktemp("single"), {}

    def video(config: str, size: tuple[str, str] = ("64", "96")) -> np.ndarray:
        if (config, size) not in videos:
            out = folder / f"{config}-{'x'.join(size)}.npy"
            assert generate.main(cli_args(folder, tiny_model, config, out, size)) == 0
            videos[config, size] = np.load(out)
        return videos[config, size]

    return video


def torchrun(tmp_path, model, config, out, *extra, procs, size=("64", "96")):
    args = [*cli_args(tmp_path, model, config, out, size), *extra]
    return forked.run("generate.py", args, tmp_path / "ranks", procs=procs, env={"OMP_NUM_THREADS": "1"})


# Each torchrun is a slow test: one, the four-process mesh (two CFG groups of two Ulysses ranks) with NABLA, the
# step cache, and 48x48 frames of 27 tokens, which do not split over 2 ranks: the padded tile stream takes them. CFG
# parallel alone runs in scripts/bench_parallel.py's smoke (tests/test_bench_scripts.py) and, against one process, in
# tests/test_gpu_parallel.py.
def test_ulysses_and_cfg_parallel_together(tiny_model, tmp_path, single, capsys):
    """4 processes: two CFG groups of two Ulysses ranks, NABLA and the step cache, equal to one process."""
    size = ("48", "48")
    multi = torchrun(tmp_path, tiny_model, "cached", tmp_path / "four.npy", "--ulysses", "2", "--cfg-parallel",
                     procs=4, size=size)
    assert multi.returncode == 0, multi.stderr[-3000:]
    np.testing.assert_allclose(np.load(tmp_path / "four.npy"), single("cached", size), atol=1e-4)
    assert multi.stdout.count("wrote ") == 1  # rank 0 alone reports, and writes
    assert [p.name for p in tmp_path.iterdir() if p.suffix == ".npy"] == ["four.npy"]
    # the cache did skip a step, on every rank alike (else the all-to-alls would hang), as in one process
    assert "denoising steps computed: 1 of 2" in multi.stdout
    assert "denoising steps computed: 1 of 2" in capsys.readouterr().out


def test_bad_degree_names_allowed_ones(tiny_model, tmp_path, capsys):
    """The tiny model has 2 heads: a degree of 4 (4 processes would be needed) is refused with the allowed ones."""
    from wan.speedups.parallel import allowed_degrees, check_degree

    assert allowed_degrees(12) == [1, 2, 3, 4, 6, 12] and allowed_degrees(40) == [1, 2, 4, 5, 8, 10, 20, 40]
    with pytest.raises(ValueError, match="--ulysses 3 does not divide the model's 40 attention heads; allowed degrees: "
                                         "1, 2, 4, 5, 8, 10, 20, 40"):
        check_degree(40, 3)
    # one process (no torchrun), degree 2
    args = cli_args(tmp_path, tiny_model, "nabla", tmp_path / "v.npy", ("64", "96"))
    assert generate.main([*args, "--ulysses", "2"]) == 2
    assert "--ulysses 2 needs 2 processes (torchrun --nproc_per_node=2" in capsys.readouterr().err
    assert not (tmp_path / "v.npy").exists()
    assert generate.main([*args, "--dist-backend", "gloo"]) == 2  # a testing aid for several ranks only
    assert capsys.readouterr().err.strip() == ("error: --dist-backend gloo needs --ulysses N or --cfg-parallel under "
                                               "torchrun")
    assert generate.main([*args, "--cfg-parallel", "--dist-backend", "nccl"]) == 2
    assert "--dist-backend nccl needs CUDA GPUs; allowed here: gloo" in capsys.readouterr().err
