"""The GPU benchmark scripts, in their --smoke mode on the CPU: they run to the end and print their table.

GPU time is costly; a script that breaks there wastes it. These runs time nothing that matters.
"""

import ast
import itertools
import re
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

from scripts import bench_e2e
from tests import forked
from wan.models.random import ARCHS, build_random_pipeline
from wan.models.spec import ModelSpec

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = {  # name: (script, its arguments, torchrun's processes (0: python), the header of its table)
    "attention": ("scripts/bench_attention.py", ["--smoke"], 0,
                  "| shape | kernel | density | kernel density | mask build ms | attention total ms | TFLOP/s | speedup |"),
    "e2e": ("scripts/bench_e2e.py", ["--smoke", "--fp8", "--cache", "--video-steps", "5", "--cache-warmup-steps", "2",
                                     "--block-sizes", "128", "64/128"], 0,
            ("| variant | steps computed | s/step | vs stock | vs dense compiled | density | attention share | mask share "
             "| mask / sparse call | first call s | peak GiB | s per video (5 steps) |")),
    "parallel": ("scripts/bench_parallel.py", ["--smoke"], 2, "| GPUs | attention | s/step | speedup vs 1 GPU |"),
    "backward": ("scripts/bench_backward.py", ["--smoke", "--profile"], 0,
                 "| shape | kernel | forward ms | forward + backward ms, wall / GPU | vs dense SDPA, wall / GPU | note |"),
    "mask": ("scripts/bench_mask.py", ["--smoke"], 0,
             ("| shape | inputs | block | mask ms wall / GPU | sparse call ms wall / GPU | mask share wall / GPU "
              "| block means in kernels of their own ms |")),
}


_STARTED: dict[str, forked.Run] = {}


def start_early(items: list[pytest.Item]) -> None:
    """Called by the conftest once tests are collected: each selected benchmark's process starts now (tests.forked:
    as `python` or torchrun runs it, without paying the imports again), on one thread, at the lowest priority: on the
    CPU the in-process tests leave idle, and at full speed once a test waits for it."""
    names = [item.callspec.params["name"] for item in items if "benchmark_runs" in item.fixturenames]
    folder = Path(tempfile.mkdtemp(prefix="benchmarks-")) if names else None
    for name in names:
        script, args, procs, _ = BENCHMARKS[name]
        env = {"OMP_NUM_THREADS": "1", "OUT": str(folder / name)}
        _STARTED[name] = forked.start(script, args, folder / name / "output", procs, env, nice=19)


@pytest.fixture(scope="module")
def benchmark_runs():
    """The benchmarks' runs by name; those a test selection left unread are killed at the end."""
    yield _STARTED
    for run in _STARTED.values():
        run.kill()
    for run in _STARTED.values():
        shutil.rmtree(run.folder.parent.parent, ignore_errors=True)  # the benchmarks- folder


@pytest.mark.parametrize("name", list(BENCHMARKS))
def test_benchmark_runs_to_its_table(name, benchmark_runs):
    (_, args, _, header) = BENCHMARKS[name]
    result = benchmark_runs[name].wait(timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert header in lines
    rows = list(itertools.takewhile(lambda line: line.startswith("| "), lines[lines.index(header) + 2:]))
    rest = lines[lines.index(header) + 2 + len(rows):]
    assert len(rows) >= 3
    if "--profile" in args:  # then where one lone call of each row went (on the CPU every row runs)
        assert rest[3:5] == ["| shape | kernel | kernels ms | idle ms | kernels by name, ms |", "|---|---|---:|---:|---|"]
        profiles = rest[5:]
        assert len(profiles) == len(rows) and all(float(row.split(" | ")[2]) > 0 for row in profiles)
    else:
        assert rest == []
    if "--cache" in args:  # the cache row computes fewer steps than it runs; FP8 rows need a GPU of 8.9+
        # the whole 5-step schedule: step 0 computed, then interval 2 (steps 1 and 3 computed, 2 and 4 cached)
        assert any(row.startswith("| NABLA + cache") and "| 3/5 |" in row for row in rows)
        assert "skipping the NABLA + FP8 rows: precision fp8 needs a CUDA GPU" in result.stdout
        # 64-token rows in 128-row kernel blocks: the kernel computes more blocks than the mask keeps
        merged = next(row for row in rows if row.startswith("| NABLA auto, block 64/128, compiled"))
        density, kernel = merged.split(" | ")[5].replace("(kernel ", "").rstrip(")").split()
        assert float(kernel) > float(density)


E2E_HEADER = ("| variant | steps computed | s/step | vs stock | vs dense compiled | density | attention share | mask share "
              "| mask / sparse call | first call s | peak GiB | s per video ({steps} steps) |")


@pytest.fixture
def one_thread():
    """Tiny ops run faster on one thread than on two that contend (the subprocesses' OMP_NUM_THREADS=1)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def keeps_tf32():
    """bench_e2e.main turns TF32 matmuls on for the process; put the setting back. Not by monkeypatch: from pytest
    9.2 it sees no `allow_tf32` attribute on torch's cuBLAS module (its __getattr__ serves it) and deletes it on undo."""
    before = torch.backends.cuda.matmul.allow_tf32
    yield
    torch.backends.cuda.matmul.allow_tf32 = before


@pytest.mark.parametrize("arch, flags, line", [
    ("a14b", ["--cache", "--video-steps", "6", "--cache-warmup-steps", "2"],
     "timed steps' experts (boundary_ratio 0.875): transformer, transformer_2; both patched on one step count"),
    ("ti2v-5b", [], ("per-token timesteps (expand_timesteps): the transformer takes a timestep per token, and NABLA its "
     "step from their maximum")),
    ("i2v-14b", [], ("image to video: a random first frame; the transformer reads 36 input channels (noise, frame mask, "
     "image latents) and the CLIP image tokens beside the text in cross-attention (untouched by NABLA)")),
], ids=["a14b", "ti2v-5b", "i2v-14b"])
def test_bench_e2e_runs_each_family(arch, flags, line, one_thread, keeps_tf32, capsys):
    """In this process (a subprocess would import torch and diffusers again, seconds each) and with eager blocks
    (CPU compilation takes seconds too): the tiny model of each family, 2 steps across A14B's boundary."""
    bench_e2e.main(["--smoke", "--arch", arch, "--no-compile", "--skip-dense", "--block-sizes", "128", "--steps", "2",
                    *flags])
    lines = capsys.readouterr().out.splitlines()
    assert line in lines
    bound = (r"self-attention \(dense SDPA, 4 calls a step\) takes [\d.]+% of the stock diffusers, dense, eager step: "
             r"sparse attention can make that step at most [\d.]+x faster \(the rest as it runs\)")
    assert any(re.fullmatch(bound, text) for text in lines)
    header = E2E_HEADER.format(steps=6 if flags else 2)
    rows = lines[lines.index(header) + 2:]
    assert [row.split(" | ")[0] for row in rows] == ["| stock diffusers, dense, eager", "| NABLA auto, block 128, eager"] \
        + (["| NABLA + cache (TaylorSeer (lite), interval 2, order 1, from step 1)"] if flags else [])
    if arch == "a14b":  # both experts patched: the NABLA row's 2 steps ran one on each; both cached every other step
        assert any(" experts by step 0 1, " in text for text in lines)
        assert "| 3/6 |" in rows[2]  # steps 0 and 1 on the high-noise expert, 2 to 5 on the low-noise one


def billions(module) -> float:
    return round(sum(p.numel() for p in module.parameters()) / 1e9, 2)


def test_random_models_are_the_published_architectures():
    """On the meta device (shapes only: no memory, no time): what the GPU benchmarks build at real size."""
    a14b, ti2v, i2v = (build_random_pipeline(arch, device="meta") for arch in ("a14b", "ti2v-5b", "i2v-14b"))
    assert (type(a14b).__name__, a14b.config.boundary_ratio, a14b.scheduler.config.flow_shift) == ("WanPipeline",
                                                                                                  0.875, 3.0)
    assert (billions(a14b.transformer), billions(a14b.transformer_2)) == (14.29, 14.29)
    assert a14b.transformer.dtype == a14b.transformer_2.dtype == torch.bfloat16
    config = ti2v.transformer.config
    assert (config.num_attention_heads, config.attention_head_dim, config.ffn_dim, config.num_layers,
            config.in_channels, config.out_channels) == (24, 128, 14336, 30, 48, 48)
    assert (ti2v.config.expand_timesteps, ti2v.scheduler.config.flow_shift, billions(ti2v.transformer)) == (True, 5.0,
                                                                                                           5.0)
    assert (ti2v.vae.config.z_dim, ti2v.vae.config.base_dim, ti2v.vae.config.decoder_base_dim,
            ti2v.vae_scale_factor_spatial, len(ti2v.vae.config.latents_std)) == (48, 160, 256, 16, 48)
    config = i2v.transformer.config
    assert (type(i2v).__name__, config.in_channels, config.image_dim, config.added_kv_proj_dim) == (
        "WanImageToVideoPipeline", 36, 1280, 5120)
    vision = i2v.image_encoder.config
    assert (type(i2v.image_encoder).__name__, vision.hidden_size, vision.num_hidden_layers, vision.patch_size,
            i2v.image_processor.crop_size["height"]) == ("CLIPVisionModelWithProjection", 1280, 32, 14, 224)
    assert i2v.image_encoder.dtype == torch.float32 and i2v.scheduler.config.flow_shift == 3.0
    for arch, pipe in (("a14b", a14b), ("ti2v-5b", ti2v), ("i2v-14b", i2v)):  # built from the spec it reads back
        assert ModelSpec.from_pipeline(pipe, ARCHS[arch].title) == ARCHS[arch].spec


def test_timeline_counts_idle_gaps_and_groups_kernels():
    from wan.benchmarking import kernel_groups, timeline

    spans = [("kernel_cutlass_flash_fwd_sm90_x", 50.0, 70.0), ("aten::add_", 0.0, 10.0), ("triton_red_fused_1", 15.0, 25.0),
             ("kernel_cutlass_flash_bwd_postprocess_y", 72.0, 73.0), ("triton_red_fused_2", 24.0, 40.0)]
    profile = timeline(spans)  # the marker is the earliest; gaps 10-15, 40-50, 70-72; 24-25 overlaps
    assert profile.idle_ms == pytest.approx(0.017)
    assert profile.kernel_ms == pytest.approx((73 - 10 - 17) / 1e3)
    assert profile.parts == pytest.approx({"triton_red_fused": 0.026, "FA4 forward": 0.020, "FA4 backward post": 0.001})
    assert list(profile.parts) == ["triton_red_fused", "FA4 forward", "FA4 backward post"]
    parts = {**profile.parts, "nvjet_tst_128x256_h_bz": 0.004, "sm90_xmma_gemm_bf16": 0.002}
    assert kernel_groups(parts) == pytest.approx({"other": 0.026, "attention": 0.021, "matmul": 0.006})


def test_scripts_import_only_the_installed_packages():
    """No script reaches into sys.path or imports another script: what they share is wan.benchmarking."""
    for script in sorted((ROOT / "scripts").glob("*.py")):
        tree = ast.parse(script.read_text())
        imported = [alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names]
        imported += ["scripts" if node.level else node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)]
        assert not [name for name in imported if name.split(".")[0] == "scripts"], script.name
        paths = [node for node in ast.walk(tree) if isinstance(node, ast.Attribute) and node.attr == "path"
                 and isinstance(node.value, ast.Name) and node.value.id == "sys"]
        assert not paths, f"{script.name} changes sys.path"
