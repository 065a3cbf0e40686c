"""generate.py end to end on the tiny checkpoint: videos, --compare, --prompts, and the one-line errors."""

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import generate
import wan.generate.run
import wan.io.video

ROOT = Path(__file__).resolve().parents[1]
# the generation configs; configs/finetune-*.yaml are finetune.py's (a `training:` section generate.py refuses)
CONFIGS = sorted(p for p in (ROOT / "configs").glob("*.yaml") if not p.name.startswith("finetune-"))
SMALL = ["--height", "64", "--width", "96", "--frames", "9", "--steps", "2"]


def run_cli(*args: str) -> int:
    return generate.main([str(a) for a in args])


def test_every_shipped_config_is_there():
    names = {p.name for p in CONFIGS}
    assert {"full.yaml", "nabla-0.7.yaml", "nabla-0.4.yaml", "nabla-0.6-sta-11-3-3.yaml", "nabla-0.5-sta-11-5-5.yaml",
            "sta-11-3-3.yaml", "nabla-0.7-fast.yaml", "nabla-0.7-q128.yaml", "fastest.yaml"} <= names


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_generate_writes_the_requested_video(tiny_model, tmp_path, config, capsys):
    out = tmp_path / "video.mp4"
    # FP8 needs a GPU of compute capability >= 8.9: on the CPU the flag takes it off, the config's other levers stay
    cpu = ["--precision", "bf16"] if "precision: fp8" in config.read_text() else []
    small = SMALL[:-2] if "sigmas:" in config.read_text() else SMALL  # a distilled schedule sets its steps
    assert run_cli("--prompt", "a dog runs", "--model", tiny_model, "--config", config, "--output", out, *small,
                   *cpu) == 0
    video = iio.imread(out)
    assert video.shape == (9, 64, 96, 3)
    assert f"wrote {out}" in capsys.readouterr().out
    assert [p.name for p in tmp_path.iterdir()] == ["video.mp4"]  # no temporary file left behind


def test_compare_writes_both_and_reports(tiny_model, tmp_path, capsys):
    out = tmp_path / "cmp.mp4"
    code = run_cli("--prompt", "a dog runs", "--model", tiny_model, "--config", ROOT / "configs/nabla-0.4.yaml",
                   "--output", out, *SMALL)
    assert code == 0
    out.unlink()
    code = run_cli("--prompt", "a dog runs", "--model", tiny_model, "--config", ROOT / "configs/nabla-0.4.yaml",
                   "--output", out, "--compare", *SMALL)
    assert code == 0
    printed = capsys.readouterr().out
    assert "| full |" in printed and "| nabla, threshold 0.4, 64-token blocks, eager kernel |" in printed
    assert "it is a GPU effect of the compiled FlexAttention kernels" in printed and "CPU path is for correctness" in printed
    assert "x |" in printed
    density = float(printed.strip().splitlines()[-1].split("|")[-2])
    assert 0 < density < 1
    assert iio.imread(out).shape == iio.imread(tmp_path / "cmp.full.mp4").shape == (9, 64, 96, 3)


def test_merged_query_blocks_report_what_the_union_adds(tiny_model, tmp_path, capsys):
    config = ROOT / "configs/nabla-0.7-q128.yaml"
    assert run_cli("--prompt", "a dog runs", "--model", tiny_model, "--config", config, "--output",
                   tmp_path / "v.mp4", *SMALL) == 0
    printed = capsys.readouterr().out
    assert "nabla, threshold 0.7, 64-token blocks, 128-row kernel blocks, eager kernel" in printed
    line = next(line for line in printed.splitlines() if line.startswith("128-row kernel query blocks"))
    kernel, mask = (float(part.split()[-1]) for part in line.split(": ")[1].split(" of the blocks, "))
    assert 0 < mask <= kernel <= 1


def test_compare_cache_with_full_attention_and_stats(tiny_model, tmp_path, capsys):
    """A cache alone (mode full) against the stock model: the summary names the levers and counts the computed
    steps; --stats says which steps came from the cache."""
    config = write_config(tmp_path, "sparsity: {mode: full}\nprecision: bf16\n"
                                    "cache: {type: taylorseer, cache_interval: 2, disable_cache_before_step: 1}\n")
    out, stats = tmp_path / "c.mp4", tmp_path / "c.json"
    args = ["--prompt", "a dog runs", "--model", tiny_model, "--config", config, "--output", out, "--compare"]
    assert run_cli(*args, "--stats", stats, "--height", "64", "--width", "96", "--frames", "9", "--steps", "4") == 0
    printed = capsys.readouterr().out
    assert "levers: linear layers in the model's dtype, TaylorSeer (lite), interval 2, order 1, from step 1; " \
           "denoising steps computed: 2 of 4" in printed
    assert "reference: stock model, full attention, no FP8, no cache" in printed
    assert "| full attention + TaylorSeer (lite), interval 2, order 1, from step 1 |" in printed
    report = json.loads(stats.read_text())
    # step 0 warms up, then one computed step in 2: (step - 1 - 1) % 2 == 0
    assert report["computed_steps"] == [0, 2] and report["cached_steps"] == [1, 3]
    assert report["attention_calls"][1] == {"step": 1, "expert": 0, "per_pass": [0, 0]} and report["precision"] == "bf16"
    assert report["blocks"] == 2 and report["attention_calls"][0] == {"step": 0, "expert": 0, "per_pass": [2, 2]}
    assert iio.imread(out).shape == (9, 64, 96, 3)


def test_yaml_generation_section_and_cli_override(tiny_model, tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(f"sparsity: {{mode: nabla, threshold: 0.5}}\ngeneration: {{prompt: a cat, height: 64, width: 64,"
                      f" frames: 5, steps: 1, model: {tiny_model}}}\n")
    out = tmp_path / "v.mp4"
    assert run_cli("--config", config, "--output", out, "--width", "80") == 0
    assert iio.imread(out).shape == (5, 64, 80, 3)


def write_config(tmp_path, text):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    return path


BAD_INPUTS = {
    "unknown-key": (lambda t: ["--config", write_config(t, "sparsity: {mode: nabla, thresh: 0.5}")], "unknown key 'sparsity.thresh'"),
    "threshold-0": (lambda t: ["--config", write_config(t, "sparsity: {mode: nabla, threshold: 0}")], "'threshold': 0"),
    "threshold-1.5": (lambda t: ["--config", write_config(t, "sparsity: {mode: nabla, threshold: 1.5}")], "'threshold': 1.5"),
    "even-window": (lambda t: ["--config", write_config(t, "sparsity: {mode: sta, sta_window: [10, 3, 3]}")], "'sta_window'"),
    "frames-10": (lambda t: ["--frames", "10"], "frames: 10 is not allowed; Wan needs 4k+1 frames"),
    "height-100": (lambda t: ["--height", "100"], "height: 100 is not allowed; Wan needs a multiple of 16"),
    "steps-0": (lambda t: ["--steps", "0"], "steps: 0 is not allowed"),
    "guidance": (lambda t: ["--guidance-scale", "-1"], "guidance_scale: -1.0"),
    "empty-prompt": (lambda t: ["--prompt", "  "], "prompt: must be a non-empty string"),
    "missing-model": (lambda t: ["--model", t / "no-such-model"], "no-such-model' does not exist"),
    "missing-config": (lambda t: ["--config", t / "nope.yaml"], "file not found"),
    "output-folder-missing": (lambda t: ["--output", t / "nowhere" / "v.mp4"], "does not exist"),
    "output-not-mp4": (lambda t: ["--output", t / "v.avi"], "must end in .mp4"),
    "max-density-0": (lambda t: ["--config", write_config(t, "sparsity: {mode: nabla, max_density: 0}")], "'max_density': 0"),
    "min-density-1.5": (lambda t: ["--config", write_config(t, "sparsity: {mode: nabla, min_density: 1.5}")],
                        "'min_density': 1.5; allowed: a number in (0, 1]"),
    "negative-window": (lambda t: ["--config", write_config(t, "sparsity: {mode: sta, sta_window: [11, -3, 3]}")],
                        "allowed: three odd positive integers"),
    "height-0": (lambda t: ["--height", "0"], "height: 0 is not allowed; it must be an integer in [16, 2048]"),
    "width-huge": (lambda t: ["--width", "8192"], "width: 8192 is not allowed; it must be an integer in [16, 2048]"),
    "frames-0": (lambda t: ["--frames", "0"], "frames: 0 is not allowed"),
    "flash-on-cpu": (lambda t: ["--device", "cpu", "--config", write_config(t, "sparsity: {mode: nabla, backend: flash}")],
                     "backend 'flash' cannot run here: it needs a CUDA GPU, not cpu"),
    "backend-unknown": (lambda t: ["--config", write_config(t, "sparsity: {mode: nabla, backend: cudnn}")],
                        "'backend': 'cudnn'; allowed: auto, triton, flash"),
    "dense-above-0": (lambda t: ["--config", write_config(t, "sparsity: {mode: nabla, dense_above: 0}")],
                      "'dense_above': 0"),
    "precision-fp16": (lambda t: ["--config", write_config(t, "precision: fp16")],
                       "bad value for 'precision': 'fp16'; allowed: bf16, fp8"),
    "fp8-on-cpu": (lambda t: ["--precision", "fp8", "--device", "cpu"],
                   "precision fp8 needs a CUDA GPU of compute capability >= 8.9"),
    "cache-unknown-key": (lambda t: ["--config", write_config(t, "cache: {type: first_block, thresh: 0.1}")],
                          "unknown key 'cache.thresh' for type first_block; allowed keys: type, threshold"),
    "cache-interval-0": (lambda t: ["--config", write_config(t, "cache: {type: taylorseer, cache_interval: 0}")],
                         "'cache.cache_interval': 0; allowed: an integer >= 1"),
    "first-block-ulysses": (lambda t: ["--config", write_config(t, "cache: {type: first_block}"), "--ulysses", "2"],
                            "cache type first_block decides per rank on its shard of the sequence"),
    "compare-nothing": (lambda t: ["--compare"], "--compare needs something to compare with the stock model"),
    "yaml-syntax": (lambda t: ["--config", write_config(t, "sparsity:\n  mode: nabla\n threshold: 0.5\n")],
                    "bad.yaml is not valid YAML at line 3, column 2: expected <block end>, but found"),
    "binary-config": (lambda t: ["--config", write_bytes(t, b"\x89PNG\r\n\x1a\n")],
                      "bad.yaml is not a text file (byte 0x89 at offset 0 is not UTF-8)"),
    "unknown-config-name": (lambda t: ["--config", "nabla-0.9"],
                            "'nabla-0.9' is neither a file nor a shipped config; shipped: fastest, fastest-60, fewstep-4, finetune-full, finetune-lora, finetune-tiny, full,"),
}


def write_bytes(tmp_path, data):
    path = tmp_path / "bad.yaml"
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_input_fails_cleanly(tiny_model, tmp_path, capsys, name):
    extra, message = BAD_INPUTS[name]
    work = tmp_path / "work"
    work.mkdir()
    args = ["--prompt", "a cat", "--model", tiny_model, "--output", work / "v.mp4", *SMALL, *extra(work)]
    assert run_cli(*args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err
    assert sorted(p.name for p in work.iterdir()) == sorted(p.name for p in work.iterdir() if p.suffix == ".yaml")


NO_GPU = "this machine has no CUDA GPU, so only cpu"
BAD_DEVICES = {  # with the GPUs this machine is made to have
    "gpu": (0, "--device 'gpu' is not allowed; allowed: cpu, cuda or cuda:N (" + NO_GPU + ")"),
    "CPU": (0, "--device 'CPU' is not allowed; allowed: cpu, cuda or cuda:N (" + NO_GPU + ")"),
    "mps": (0, "--device 'mps' is not allowed; allowed: cpu, cuda or cuda:N (" + NO_GPU + ")"),
    "cuda:x": (1, "--device 'cuda:x' is not allowed; allowed: cpu, cuda or cuda:N (this machine has 1 CUDA GPU: cuda, "
                  + "cuda:0)"),
    "cuda": (0, "--device 'cuda' is not available; " + NO_GPU),
    "cuda:1": (1, "--device 'cuda:1' is not available; this machine has 1 CUDA GPU: cuda, cuda:0"),
    "cuda:2": (2, "--device 'cuda:2' is not available; this machine has 2 CUDA GPUs: cuda, cuda:0, cuda:1"),
}


@pytest.mark.parametrize("device", list(BAD_DEVICES))
def test_bad_device_is_refused_before_loading(tmp_path, capsys, monkeypatch, device):
    gpus, message = BAD_DEVICES[device]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    # a model that does not exist: the device must be refused before any loading is tried
    args = ["--prompt", "a cat", "--model", tmp_path / "no-model", "--output", tmp_path / "v.npy", *SMALL]
    assert run_cli(*args, "--config", "nabla-0.7", "--device", device) == 2
    assert capsys.readouterr().err == f"error: {message}\n"
    assert list(tmp_path.iterdir()) == []


def test_existing_output_is_not_overwritten(tiny_model, tmp_path, capsys):
    out = tmp_path / "v.mp4"
    out.write_bytes(b"precious")
    assert run_cli("--prompt", "a cat", "--model", tiny_model, "--output", out, *SMALL) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err
    assert out.read_bytes() == b"precious"
    assert run_cli("--prompt", "a cat", "--model", tiny_model, "--output", out, "--overwrite", *SMALL) == 0
    assert iio.imread(out).shape == (9, 64, 96, 3)


def test_unwritable_output_folder(tiny_model, capsys):
    # /proc refuses new files even to root, where permission bits would not
    assert run_cli("--prompt", "a cat", "--model", tiny_model, "--output", "/proc/nabla-test.mp4", *SMALL) == 2
    assert "/proc is not writable" in capsys.readouterr().err


def test_cli_process_help_and_exit_code(tmp_path, capsys):
    """The real command line: a bad value exits 2 with one line, no traceback (a process: seconds of imports); --help
    documents the flags, with nothing on stderr a user cannot act on."""
    bad_run = subprocess.Popen([sys.executable, "generate.py", "--prompt", "x", "--frames", "10", "--output",
                                tmp_path / "v.mp4"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    with pytest.raises(SystemExit) as shown:
        generate.main(["--help"])
    shown_out, shown_err = capsys.readouterr()
    assert shown.value.code == 0 and shown_err == ""
    help_text = " ".join(shown_out.split())
    for flag in ("--prompt", "--negative-prompt", "--config", "--model", "--seed", "--height", "--width", "--frames",
                 "--steps", "--guidance-scale", "--output", "--device", "--dtype", "--compare", "--no-compile"):
        assert flag in help_text
    assert "NAME.npy (raw frames" in help_text and "no video encoder needed" in help_text
    _, bad_err = bad_run.communicate(timeout=300)
    assert bad_run.returncode == 2 and bad_err.count("\n") == 1 and "Traceback" not in bad_err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("users", [None, "0"], ids=["unset", "user-off"])
def test_commands_keep_flash_attention_kernels_on_disk_unless_the_user_said_no(tmp_path, monkeypatch, users):
    """FlashAttention-4 reads its cache switch when imported: both commands set it first thing, a user's own kept."""
    import wan.generate.cli
    import wan.train.cli
    from wan.speedups.kernel_cache import FA4_CACHE

    for main, argv in ((wan.generate.cli.main, ["--prompt", "x", "--frames", "10", "--output", str(tmp_path / "v.mp4")]),
                       (wan.train.cli.main, ["train", "--data", str(tmp_path / "none"), "--output", str(tmp_path / "r")])):
        monkeypatch.delenv(FA4_CACHE, raising=False)
        if users is not None:
            monkeypatch.setenv(FA4_CACHE, users)
        assert main(argv) == 2 and os.environ[FA4_CACHE] == (users or "1")


def test_same_seed_same_video_twice(tiny_model, tmp_path):
    """Raw frames (--output NAME.npy): exact, where MP4 encoding is lossy."""
    videos = []
    for name in ("a", "b"):
        out = tmp_path / f"{name}.npy"
        assert run_cli("--prompt", "a dog runs", "--model", tiny_model, "--config", ROOT / "configs/nabla-0.4.yaml",
                       "--seed", "3", "--output", out, *SMALL) == 0
        videos.append(np.load(out))
    assert videos[0].shape == (9, 64, 96, 3) and np.array_equal(videos[0], videos[1])
    assert videos[0].dtype == np.float32 and 0 <= videos[0].min() and videos[0].max() <= 1
    out = tmp_path / "c.npy"
    assert run_cli("--prompt", "a dog runs", "--model", tiny_model, "--config", ROOT / "configs/nabla-0.4.yaml",
                   "--seed", "4", "--output", out, *SMALL) == 0
    assert not np.allclose(np.load(out), videos[0], atol=1e-3)  # and the seed matters


def test_nan_latents_stop_the_run(tiny_model, tmp_path, capsys):
    """A transformer that outputs NaN: the run stops at step 1 with one line and writes no video."""
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model, broken)
    weights = broken / "transformer" / "diffusion_pytorch_model.safetensors"
    state = load_file(weights)
    state["proj_out.bias"][0] = float("nan")
    save_file(state, weights)
    out = tmp_path / "out" / "v.mp4"
    out.parent.mkdir()
    assert run_cli("--prompt", "a cat", "--model", broken, "--output", out, *SMALL) == 2
    err = capsys.readouterr().err  # the model loaded: its progress bars come first
    assert err.splitlines()[-1].startswith("error: NaN or Inf in the latents after denoising step 1 (timestep ")
    assert "Traceback" not in err
    assert list(out.parent.iterdir()) == []


def test_out_of_memory_names_what_to_lower(tiny_model, tmp_path, capsys, monkeypatch):
    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 80.00 GiB")

    monkeypatch.setattr(wan.generate.run, "generate", out_of_memory)
    out = tmp_path / "v.mp4"
    assert run_cli("--prompt", "a cat", "--model", tiny_model, "--output", out, *SMALL) == 2
    err = capsys.readouterr().err
    assert err.splitlines()[-1].startswith("error: out of GPU memory; lower --height/--width/--frames")
    assert "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def test_interrupted_write_leaves_no_file(tmp_path, monkeypatch):
    """Killed while encoding: neither a partial MP4 nor a temporary file remains; an old file is untouched."""
    def encode_then_die(frames, path, fps, quality):
        Path(path).write_bytes(b"half an mp4")
        raise KeyboardInterrupt

    monkeypatch.setattr(wan.io.video, "export_to_video", encode_then_die)
    frames = np.zeros((5, 16, 16, 3), dtype=np.float32)
    with pytest.raises(KeyboardInterrupt):
        wan.io.video.write_video(frames, tmp_path / "new.mp4")
    (tmp_path / "old.mp4").write_bytes(b"precious")
    with pytest.raises(KeyboardInterrupt):
        wan.io.video.write_video(frames, tmp_path / "old.mp4")
    assert [p.name for p in tmp_path.iterdir()] == ["old.mp4"] and (tmp_path / "old.mp4").read_bytes() == b"precious"


def test_written_video_has_the_usual_permissions(tmp_path, raw_frames):
    """The temporary file is created 0600; the renamed video gets what a new file gets under the umask."""
    umask = os.umask(0o022)
    try:
        path = wan.io.video.write_video(np.zeros((5, 16, 16, 3), dtype=np.float32), tmp_path / "v.mp4")
    finally:
        os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644 and [p.name for p in tmp_path.iterdir()] == ["v.mp4"]


def test_mp4_is_as_faithful_as_diffusers_export(tmp_path):
    """The faster writer keeps diffusers' 8-bit frames (x*255, truncated) and its quality setting: its decoded MP4 is
    as close to those frames as diffusers' export_to_video's, within half a decibel, with every frame kept."""
    from diffusers.utils import export_to_video

    t, y, x = np.meshgrid(np.linspace(0, 1, 9), np.linspace(0, 1, 48), np.linspace(0, 1, 64), indexing="ij")
    frames = np.stack([0.5 + 0.5 * np.sin(6 * x + k * y + 3 * t) for k in (2, 4, 6)], axis=-1).astype(np.float32)
    eight_bit = np.stack([(f * 255).astype(np.uint8) for f in frames]).astype(np.float64)

    def psnr(path):
        decoded = iio.imread(path).astype(np.float64)
        assert decoded.shape == frames.shape
        return 10 * np.log10(255**2 / ((decoded - eight_bit) ** 2).mean())

    ours = psnr(wan.io.video.write_video(frames, tmp_path / "ours.mp4"))
    assert ours > psnr(export_to_video(list(frames), str(tmp_path / "diffusers.mp4"), fps=16, quality=8)) - 0.5 > 25


@pytest.mark.parametrize("compare", [False, True], ids=["single", "compare"])
def test_missing_ffmpeg_is_refused_before_loading(tmp_path, capsys, monkeypatch, compare):
    monkeypatch.setitem(sys.modules, "imageio_ffmpeg", None)  # import imageio_ffmpeg now raises ImportError
    # a model that does not exist: the encoder must be checked before any loading is tried
    args = ["--prompt", "a cat", "--model", tmp_path / "no-model", "--output", tmp_path / "v.mp4", *SMALL]
    assert run_cli(*args, "--config", ROOT / "configs/nabla-0.7.yaml", *(["--compare"] if compare else [])) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: output: writing MP4 needs ffmpeg") and err.count("\n") == 1
    assert "pip install imageio-ffmpeg" in err and "--output NAME.npy" in err
    assert list(tmp_path.iterdir()) == []
    assert run_cli(*args[:-len(SMALL) - 2], "--output", tmp_path / "v.npy", *SMALL) == 2  # .npy needs no encoder:
    assert "no-model" in capsys.readouterr().err  # it gets as far as loading the model


def test_failed_encoding_saves_the_frames_of_both_runs(tiny_model, tmp_path, capsys, monkeypatch):
    def broken_encoder(frames, path, fps, quality):
        Path(path).write_bytes(b"half an mp4")
        raise RuntimeError("ffmpeg died\nwith details")

    monkeypatch.setattr(wan.io.video, "export_to_video", broken_encoder)
    out = tmp_path / "cmp.mp4"
    code = run_cli("--prompt", "a dog runs", "--model", tiny_model, "--config", ROOT / "configs/nabla-0.4.yaml",
                   "--output", out, "--compare", *SMALL)
    assert code == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cmp.full.npy", "cmp.npy"]
    assert np.load(tmp_path / "cmp.npy").shape == np.load(tmp_path / "cmp.full.npy").shape == (9, 64, 96, 3)
    assert not np.array_equal(np.load(tmp_path / "cmp.npy"), np.load(tmp_path / "cmp.full.npy"))
    captured = capsys.readouterr()
    errors = [line for line in captured.err.splitlines() if line.startswith("error: ")]
    assert errors == [
        f"error: could not write {tmp_path / name}.mp4 (RuntimeError: ffmpeg died); its frames are saved in "
        f"{tmp_path / name}.npy (numpy.load reads them)" for name in ("cmp.full", "cmp")]
    assert f"wrote {tmp_path / 'cmp.npy'} (" in captured.out and "| full |" in captured.out


def test_fallback_never_replaces_a_file(tmp_path, monkeypatch):
    monkeypatch.setattr(wan.io.video, "export_to_video", lambda *args, **kwargs: 1 / 0)
    (tmp_path / "v.npy").write_bytes(b"precious")
    frames = np.full((5, 16, 16, 3), 0.5, dtype=np.float32)
    written, reason = wan.io.video.write_video_or_frames(frames, tmp_path / "v.mp4")
    assert written == tmp_path / "v.1.npy" and reason == "ZeroDivisionError: division by zero"
    assert np.array_equal(np.load(written), frames) and (tmp_path / "v.npy").read_bytes() == b"precious"


TINY = ["--height", "32", "--width", "32", "--frames", "5", "--steps", "2"]


def test_prompts_file_goes_on_past_a_failed_entry(tiny_model, tmp_path, capsys, monkeypatch):
    """Loaded once, one video per entry (named, or numbered after --output); an entry whose run fails is reported
    in one line, the others are written, and the exit code is 1."""
    real_generate = wan.generate.run.generate
    loads = []

    def generate_or_fail(pipe, settings, **kwargs):
        loads.append(id(pipe))
        if settings.prompt == "a broken cat":
            raise wan.generate.run.NonFiniteLatentsError("NaN or Inf in the latents after denoising step 1")
        return real_generate(pipe, settings, **kwargs)

    monkeypatch.setattr(wan.generate.run, "generate", generate_or_fail)
    prompts = tmp_path / "p.jsonl"
    entries = [{"prompt": "a dog runs", "seed": 3, "output": str(tmp_path / "dog.npy")}, None,
               {"prompt": "a broken cat"}, {"prompt": "a dog runs"}]
    prompts.write_text("".join(f"{json.dumps(e) if e else ''}\n" for e in entries))  # a blank line 2
    code = run_cli("--prompts", prompts, "--model", tiny_model, "--config", "nabla-0.7", "--seed", "4",
                   "--output", tmp_path / "v.npy", *TINY)
    captured = capsys.readouterr()
    assert code == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dog.npy", "p.jsonl", "v-3.npy"]
    assert len(set(loads)) == 1  # one pipeline for all
    errors = [line for line in captured.err.splitlines() if line.startswith("error: ")]
    assert errors == [f"error: {prompts} line 3 ({tmp_path / 'v-2.npy'}): NaN or Inf in the latents after denoising step 1"]
    assert captured.out.splitlines()[-1] == f"made 2 of 3 videos from {prompts}; failed: {prompts} line 3"
    # the entry's seed (3) against --seed (4): the same prompt, other noise
    dog, numbered = np.load(tmp_path / "dog.npy"), np.load(tmp_path / "v-3.npy")
    assert dog.shape == numbered.shape == (5, 32, 32, 3) and not np.allclose(dog, numbered, atol=1e-3)


def bad_prompts(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return path


BAD_PROMPTS = {
    "bad-json": (lambda t: ["--prompts", bad_prompts(t, "p.jsonl", '{"prompt": "a cat"}\n{"prompt": "a dog"\n')],
                 "p.jsonl line 2 is not valid JSON: Expecting ',' delimiter at column 19"),
    "no-prompt": (lambda t: ["--prompts", bad_prompts(t, "p.jsonl", '{"prompt": "a cat"}\n{"seed": 1}\n')],
                  "p.jsonl line 2 has no \"prompt\""),
    "unknown-key": (lambda t: ["--prompts", bad_prompts(t, "p.jsonl", '{"prompt": "a cat", "steps": 9}\n')],
                    "p.jsonl line 1: unknown key 'steps'; allowed keys: prompt, negative_prompt, seed, output"),
    "bad-seed": (lambda t: ["--prompts", bad_prompts(t, "p.jsonl", '{"prompt": "a cat", "seed": "x"}\n')],
                 "p.jsonl line 1: seed: 'x' is not allowed"),
    "duplicate-output": (lambda t: ["--prompts", bad_prompts(t, "p.jsonl", json.dumps({"prompt": "a", "output": str(t / "x.npy")})
                                    + "\n" + json.dumps({"prompt": "b", "output": f"{t}/./x.npy"}) + "\n")],
                         "p.jsonl line 2: output {t}/x.npy is also line 1's; give each entry its own"),
    "existing-output": (lambda t: ["--prompts", bad_prompts(t, "p.txt", "a cat\na dog\n"), "--output", t / "v.npy"],
                        "p.txt line 2: output: {t}/v-2.npy exists; pass --overwrite"),
    "empty-file": (lambda t: ["--prompts", bad_prompts(t, "p.txt", "\n  \n")], "p.txt holds no prompt"),
    "with-prompt": (lambda t: ["--prompts", bad_prompts(t, "p.txt", "a cat\n"), "--prompt", "a dog"],
                    "--prompt and --prompts: give one"),
    "with-compare": (lambda t: ["--prompts", bad_prompts(t, "p.txt", "a cat\n"), "--compare"],
                     "--compare and --stats report on one video; run them with --prompt, not --prompts"),
}


@pytest.mark.parametrize("name", list(BAD_PROMPTS))
def test_bad_prompts_file_is_refused_before_loading(tmp_path, capsys, name):
    extra, message = BAD_PROMPTS[name]
    (tmp_path / "v-2.npy").write_bytes(b"precious")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    args = ["--model", tmp_path / "no-model", "--config", "nabla-0.7", "--output", tmp_path / "v.npy", *TINY, *extra(tmp_path)]
    assert run_cli(*args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message.format(t=tmp_path) in err and err.count("\n") == 1
    assert "no-model" not in err  # refused before loading
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.name in before} == before
    assert {p.name for p in tmp_path.iterdir()} - set(before) <= {"p.jsonl", "p.txt"}


def test_unknown_hub_model_offline_is_one_whole_line(capfd):
    """diffusers' own "Couldn't connect to the Hub" warning is dropped: the error line says it, whole."""
    assert run_cli("--prompt", "a cat", "--model", "nobody/does-not-exist", "--output", "/tmp/unused.npy") == 2
    err = capfd.readouterr().err
    assert err == ("error: could not load hub model 'nobody/does-not-exist': HF_HUB_OFFLINE is set and the model is "
                   "not in the local Hugging Face cache; get weights with `hf download Wan-AI/Wan2.1-T2V-1.3B-Diffusers "
                   "--local-dir DIR`, or build an offline demo model with `nabla-wan make-tiny-model DIR`\n")
