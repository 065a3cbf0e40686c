"""finetune.py on the CPU: the tiny model, a few 9-frame 32x32 clips written here, dense attention (mode full).

The runs share one latent cache (module fixture) and one uninterrupted reference run, which the resume test
and the two-process test compare against.
"""

import json
import os
import shutil
import signal
from pathlib import Path

import imageio.v2 as imageio
import numpy as np
import pytest
import torch
from diffusers import WanPipeline
from safetensors.torch import load_file

import finetune
import wan.train.run_folder
import wan.train.trainer
from scripts.plot_training import plot
from tests import forked
from wan.models.lora import load_lora
from wan.train.run_folder import read_log

EMA = 0.9  # the reference run's ema_decay
LORA = "pytorch_lora_weights.safetensors"
TRAINING = {"height": 32, "width": 32, "frames": 9, "fps": 8, "rank": 4, "alpha": 4, "learning_rate": 1e-2,
            "steps": 6, "checkpoint_every": 2, "keep_last": 2, "batch_size": 2, "gradient_accumulation": 2,
            "warmup_steps": 2, "lr_scheduler": "cosine", "target_modules": ["to_q", "to_k", "to_v", "to_out.0"]}


def write_clip(path: Path, frames: int, seed: int, size=(40, 48)) -> None:
    """A moving gradient (so that frames differ), 8 fps."""
    y, x = np.mgrid[:size[0], :size[1]]
    video = [np.stack([(x * 5 + t * 20 * (seed + 1)) % 256, (y * 6 + seed * 60) % 256, (x + y + t * 9) % 256], -1)
             for t in range(frames)]
    imageio.mimwrite(path, [v.astype(np.uint8) for v in video], fps=8, macro_block_size=8)


def write_config(folder: Path, name: str = "cfg", sparsity: dict | None = None, **training) -> Path:
    path = folder / f"{name}.yaml"
    path.write_text(json.dumps({"sparsity": sparsity or {"mode": "full"}, "training": {**TRAINING, **training}}))
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """Three usable clips (captions by .txt and by metadata.jsonl), one too short, one without a caption."""
    folder = tmp_path_factory.mktemp("clips")
    for i in range(3):
        write_clip(folder / f"clip{i}.mp4", 12, i)
    (folder / "clip0.txt").write_text("a cat plays piano")
    (folder / "clip1.txt").write_text("a dog runs quickly")
    (folder / "metadata.jsonl").write_text(json.dumps({"file_name": "clip2.mp4", "text": "two birds fly slowly"}))
    write_clip(folder / "short.mp4", 3, 0)
    (folder / "short.txt").write_text("a red car")
    write_clip(folder / "silent.mp4", 12, 1)
    return folder


def train_args(model, data, config, output, *extra):
    return ["train", "--model", str(model), "--data", str(data), "--config", str(config), "--output", str(output),
            *extra]


@pytest.fixture(scope="module")
def reference(tiny_model, data, tmp_path_factory):
    """An uninterrupted 6-step LoRA run (global batch 4: batch 2 x accumulation 2) with EMA weights, and its log."""
    folder = tmp_path_factory.mktemp("reference")
    assert finetune.main(train_args(tiny_model, data, write_config(folder, ema_decay=EMA), folder / "run")) == 0
    return folder / "run", read_log(folder / "run")


def test_precompute_reuses_and_invalidates(tiny_model, data, tmp_path, capsys):
    cache = tmp_path / "cache"
    args = ["precompute", "--model", str(tiny_model), "--data", str(data), "--config", str(write_config(tmp_path)),
            "--cache", str(cache)]
    assert finetune.main(args) == 0
    out, err = capsys.readouterr()
    assert "3 clips usable (3 encoded now, 0 reused), 2 skipped" in out
    assert f"skipped {data / 'short.mp4'}: too short: 3 frames at 8 fps; needs 9 frames at 8 fps" in err
    assert f"skipped {data / 'silent.mp4'}: no caption" in err
    entry = next(cache.glob("clip0-*.safetensors"))
    from safetensors.torch import load_file
    tensors = load_file(entry)
    assert tensors["latents"].shape == (16, 3, 4, 4) and tensors["prompt_embeds"].shape == (512, 32)
    assert finetune.main(args) == 0
    assert "3 clips usable (0 encoded now, 3 reused), 2 skipped" in capsys.readouterr().out
    copy = tmp_path / "data"  # a changed caption and a touched clip get new entries; the third is reused
    copy.mkdir()
    for name in ("clip0.mp4", "clip0.txt", "clip1.mp4", "clip1.txt", "clip2.mp4", "metadata.jsonl"):
        (copy / name).write_bytes((data / name).read_bytes())
        os.utime(copy / name, ns=((data / name).stat().st_atime_ns, (data / name).stat().st_mtime_ns))
    args[4] = str(copy)
    assert finetune.main(args) == 0 and "(3 encoded now" in capsys.readouterr().out  # another path: another key
    (copy / "clip0.txt").write_text("a cat plays the drums")
    os.utime(copy / "clip1.mp4", ns=(0, 10**18))
    assert finetune.main(args) == 0
    assert "3 clips usable (2 encoded now, 1 reused)" in capsys.readouterr().out
    args[6] = str(write_config(tmp_path, "wide", width=48))  # another size: every entry again
    assert finetune.main(args) == 0
    assert "(3 encoded now, 0 reused)" in capsys.readouterr().out


def test_resume_after_sigint_equals_uninterrupted(tiny_model, data, reference, tmp_path, monkeypatch, capsys):
    run, expected = reference
    assert [e["step"] for e in expected] == list(range(1, 7))
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-00000004", "step-00000006"]
    assert (run / "lora" / "pytorch_lora_weights.safetensors").is_file()
    config, output = write_config(tmp_path), tmp_path / "run"
    append = wan.train.run_folder.append_log

    def interrupt_at_3(folder, entry):  # Ctrl-C during step 3: the step ends, a checkpoint is saved
        append(folder, entry)
        if entry["step"] == 3:
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(wan.train.trainer, "append_log", interrupt_at_3)
    assert finetune.main(train_args(tiny_model, data, config, output)) == wan.train.trainer.EXIT_INTERRUPTED
    err = capsys.readouterr().err  # the last line, after the progress bar's (not inside it)
    assert err.endswith("\n") and err.splitlines()[-1].startswith("interrupted: checkpoint"), err[-300:]
    assert sorted(p.name for p in (output / "checkpoints").iterdir()) == ["step-00000002", "step-00000003"]
    monkeypatch.undo()
    assert finetune.main(train_args(tiny_model, data, config, output)) == 2  # another run there: refused
    assert "holds another run; pass --resume" in capsys.readouterr().err
    other = write_config(tmp_path, "other", learning_rate=5e-4)  # resumed under other settings: refused
    assert finetune.main(train_args(tiny_model, data, other, output, "--resume")) == 2
    assert "(training.learning_rate: 0.01 -> 0.0005); resume with its config" in capsys.readouterr().err
    assert finetune.main(train_args(tiny_model, data, config, output, "--resume")) == 0
    resumed = read_log(output)
    assert [e["step"] for e in resumed] == list(range(1, 7))
    for got, want in zip(resumed, expected):
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-5) and got["lr"] == pytest.approx(want["lr"])
    assert plot(output, output / "loss.png", smooth=2).stat().st_size > 0


def test_resume_from_a_named_checkpoint_equals_uninterrupted(tiny_model, data, reference, tmp_path, capsys):
    """--resume step-00000004 on a copy of the finished reference run: steps 5 and 6 again, the newer checkpoint
    dropped first, the same losses, the same LoRA and the same EMA of it (which differs from the raw LoRA); a name the
    run lacks is one line."""
    run, expected = reference
    output = tmp_path / "run"
    shutil.copytree(run, output)
    config = write_config(tmp_path, ema_decay=EMA)
    assert finetune.main(train_args(tiny_model, data, config, output, "--resume", "step-00000009")) == 2
    assert capsys.readouterr().err == ("error: resume: step-00000009 is not a checkpoint of this run; it has: "
                                       "step-00000004, step-00000006 (or give --resume alone for the latest)\n")
    assert finetune.main(train_args(tiny_model, data, config, output, "--resume",
                                    str(output / "checkpoints" / "step-00000004"))) == 0
    resumed = read_log(output)
    assert [e["step"] for e in resumed] == list(range(1, 7))
    for got, want in zip(resumed[4:], expected[4:]):
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-5)
    for result in ("lora", "lora_ema"):
        for key, value in load_file(str(run / result / LORA)).items():
            torch.testing.assert_close(load_file(str(output / result / LORA))[key], value, rtol=1e-5, atol=1e-7)
    assert_ema_is_not_raw(output)


def assert_near(got: dict, want: dict, other: dict) -> None:
    """`got` is `want` up to the float noise of another reduction order (which AdamW makes larger than the loss's):
    their distance is a small part of the distance from `want` to `other` (the raw weights for an average, the average
    for raw weights), which a missing shard or an average lost on resume would be near."""
    assert got.keys() == want.keys()
    error, spread = (sum((a[k] - want[k]).square().sum() for k in want).sqrt() for a in (got, other))
    assert error < 0.05 * spread, (error, spread)


def assert_ema_is_not_raw(run: Path) -> None:
    raw, ema = (load_file(str(run / name / LORA)) for name in ("lora", "lora_ema"))
    assert raw.keys() == ema.keys() and all(not torch.equal(raw[k], ema[k]) for k in raw if "lora_B" in k)


def test_two_processes_equal_one(tiny_model, data, reference, tmp_path):
    """torchrun's 2 gloo processes (tests.forked), FSDP2, resuming a copy of the reference run from its step-4
    checkpoint (written by one process; the weights, their EMA and the AdamW state read back into each rank's shards):
    batch 1 each (the same global batch of 4) gives the reference's losses, its step-6 checkpoint (gathered from the
    shards, written by rank 0) and its EMA weights (each rank averaging its shards); steps 1-4 stay as logged, not run
    again."""
    run = tmp_path / "run"
    shutil.copytree(reference[0], run)
    for newer in ("checkpoints/step-00000006", "lora", "lora_ema"):
        shutil.rmtree(run / newer)
    settings = json.loads((run / "run.json").read_text())
    settings["training"]["batch_size"] = 1  # per rank: the global batch is the reference's
    (run / "run.json").write_text(json.dumps(settings))
    config = write_config(tmp_path, batch_size=1, ema_decay=EMA)
    result = forked.run("finetune.py", [*train_args(tiny_model, data, config, run), "--resume"], tmp_path / "ranks",
                        procs=2, env={"OMP_NUM_THREADS": "1"}, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("wrote ") == 1  # rank 0 alone reports and logs
    got, want = read_log(run), reference[1]
    assert got[:4] == want[:4]
    np.testing.assert_allclose([e["loss"] for e in got], [e["loss"] for e in want], rtol=1e-4)
    written, expected = ([load_file(str(folder / "checkpoints" / "step-00000006" / name))
                          for name in ("model.safetensors", "ema.safetensors")] for folder in (run, reference[0]))
    assert_near(written[0], expected[0], expected[1])
    assert_near(written[1], expected[1], expected[0])
    assert_ema_is_not_raw(run)
    raw, average = (load_file(str(reference[0] / name / LORA)) for name in ("lora", "lora_ema"))
    assert_near(load_file(str(run / "lora_ema" / LORA)), average, raw)


def test_overfitting_one_clip_lowers_the_loss(tiny_model, data, tmp_path):
    """Full fine-tuning (the tiny model's LoRA learns too slowly to show it in 30 steps); the result is a diffusers
    transformer folder that generate.py --transformer loads, and validation videos are written on the way."""
    from wan.models.loading import load_transformer

    one = tmp_path / "one"
    one.mkdir()
    for name in ("clip0.mp4", "clip0.txt"):
        (one / name).write_bytes((data / name).read_bytes())
    config = write_config(tmp_path, method="full", steps=30, learning_rate=1e-2, batch_size=1,
                          gradient_accumulation=1, warmup_steps=0, lr_scheduler="constant", checkpoint_every=30,
                          validation={"prompts": ["a cat plays piano"], "every": 30, "steps": 2})
    assert finetune.main(train_args(tiny_model, one, config, tmp_path / "run")) == 0
    losses = [e["loss"] for e in read_log(tmp_path / "run")]
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:3]), losses
    tuned = load_transformer(tmp_path / "run" / "transformer", str(tiny_model), torch.float32)
    base = load_transformer(tiny_model / "transformer", str(tiny_model), torch.float32)
    assert any(not torch.equal(a, b) for a, b in zip(tuned.state_dict().values(), base.state_dict().values()))
    assert imageio.mimread(tmp_path / "run" / "validation" / "step-00000030-0.mp4")[0].shape == (32, 32, 3)


def test_lora_overfitting_one_clip_lowers_the_loss(tiny_model, data, tmp_path):
    """LoRA on every Linear of the blocks and the output: the loss of one clip falls by a third in 30 steps. (The
    tiny model's LoRA levels off there, near the variance of the flow target, at 0.66-0.72 of the first steps' mean
    over seeds 0-3; full fine-tuning, above, goes on below 0.7.)"""
    one = tmp_path / "one"
    one.mkdir()
    for name in ("clip0.mp4", "clip0.txt"):
        (one / name).write_bytes((data / name).read_bytes())
    targets = ["to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2", "proj_out"]
    config = write_config(tmp_path, rank=8, alpha=32, learning_rate=3e-3, target_modules=targets, steps=30,
                          batch_size=1, gradient_accumulation=1, warmup_steps=0, lr_scheduler="constant",
                          checkpoint_every=30)
    assert finetune.main(train_args(tiny_model, one, config, tmp_path / "run")) == 0
    losses = [e["loss"] for e in read_log(tmp_path / "run")]
    assert np.mean(losses[-5:]) < 0.75 * np.mean(losses[:3]), losses


def test_saved_lora_loads_changes_the_video_and_scale_0_is_the_base(tiny_model, reference):
    def video(pipe):
        pipe.set_progress_bar_config(disable=True)
        return pipe("a cat plays piano", num_frames=9, height=32, width=32, num_inference_steps=2,
                    generator=torch.Generator().manual_seed(0), output_type="np").frames[0]

    base = video(WanPipeline.from_pretrained(tiny_model))
    lora = reference[0] / "lora"
    pipe = WanPipeline.from_pretrained(tiny_model)
    pipe.load_lora_weights(lora)  # anyone's diffusers code
    tuned = video(pipe)
    assert np.abs(tuned - base).max() > 1e-3  # float noise is 1e-6
    for scale, want in ((0.0, base), (1.0, tuned)):
        pipe = WanPipeline.from_pretrained(tiny_model)
        load_lora(pipe, lora, scale)
        np.testing.assert_allclose(video(pipe), want, atol=1e-5)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tiny_model, data, tmp_path, monkeypatch, capsys):
    losses, calls = wan.train.trainer.sample_losses, []

    def nan_at_step_3(transformer, batch):
        calls.append(1)
        loss = losses(transformer, batch)
        return loss * float("nan") if len(calls) > 2 else loss

    monkeypatch.setattr(wan.train.trainer, "sample_losses", nan_at_step_3)
    config = write_config(tmp_path, batch_size=1, gradient_accumulation=1)
    assert finetune.main(train_args(tiny_model, data, config, tmp_path / "run")) == wan.train.trainer.EXIT_NAN
    err = capsys.readouterr().err
    assert "error: loss is nan at step 3; stopped before updating the weights (last good checkpoint: " in err
    assert [p.name for p in (tmp_path / "run" / "checkpoints").iterdir()] == ["step-00000002"]
    assert len(read_log(tmp_path / "run")) == 2


def test_sparsity_schedule_trains_dense_then_ramps_nabla(tiny_model, data, tmp_path):
    """One dense step, then NABLA with max_density 0.75 and 0.5: the log shows the attention and density per step."""
    config = write_config(tmp_path, sparsity={"mode": "nabla", "threshold": 0.7, "max_density": 0.5},
                          steps=3, batch_size=1, gradient_accumulation=1,
                          sparsity_schedule={"dense_steps": 1, "ramp_steps": 2})
    assert finetune.main(train_args(tiny_model, data, config, tmp_path / "run")) == 0
    log = read_log(tmp_path / "run")
    assert [(e["attention"], e["max_density"]) for e in log] == [("full", None), ("nabla", 0.75), ("nabla", 0.5)]
    assert log[0]["density"] == 1.0 and 0 < log[2]["density"] <= 0.5 and all(e["grad_norm"] > 0 for e in log)


def test_generate_applies_the_trained_lora_under_nabla(tiny_model, reference, tmp_path, raw_frames, capsys):
    from wan.generate.cli import main as generate

    common = ["--model", str(tiny_model), "--prompt", "a cat plays piano", "--height", "32", "--width", "32",
              "--frames", "9", "--steps", "2", "--config", "nabla-0.7"]
    videos = {}
    for name, extra in (("base", []), ("tuned", ["--lora", str(reference[0] / "lora")]),
                        ("scale0", ["--lora", str(reference[0] / "lora" / "pytorch_lora_weights.safetensors"),
                                    "--lora-scale", "0"])):
        assert generate([*common, *extra, "--output", str(tmp_path / f"{name}.mp4")]) == 0
        videos[name] = np.load(tmp_path / f"{name}.mp4")
    assert np.abs(videos["tuned"] - videos["base"]).max() > 1e-3
    np.testing.assert_allclose(videos["scale0"], videos["base"], atol=1e-5)
    scale_alone = "--lora-scale 2.0 is not allowed; it must be a finite number, given with --lora"
    for bad, message in ((["--lora", str(tmp_path)], "is neither a LoRA .safetensors file nor a folder holding"),
                         (["--lora-scale", "2"], scale_alone)):
        capsys.readouterr()
        assert generate([*common, *bad, "--output", str(tmp_path / "bad.mp4")]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1
