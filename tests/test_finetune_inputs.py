"""finetune.py's refusals (one line, exit 2, before any model loads) and its pure parts: the sparsity schedule,
the data order, the flow-matching draws, the frame sampling."""

import json
from pathlib import Path

import imageio.v2 as imageio
import numpy as np
import pytest
import torch
from diffusers import WanTransformer3DModel

import finetune
from nabla.config import SparsityConfig
from wan.models.spec import scheduler_shift
from wan.train import flow_matching
from wan.train.clips import find_clips, frame_indices, read_clip
from wan.train.config import SparsitySchedule
from wan.train.sparsity_schedule import config_at
from wan.train.trainer import sample_clip

GOOD = {"height": 32, "width": 32, "frames": 9, "fps": 8}


@pytest.fixture
def clip_folder(tmp_path) -> Path:
    folder = tmp_path / "clips"
    folder.mkdir()
    imageio.mimwrite(folder / "a.mp4", [np.full((32, 32, 3), 9 * t, np.uint8) for t in range(12)], fps=8,
                     macro_block_size=8)
    (folder / "a.txt").write_text("a cat")
    return folder


@pytest.fixture
def no_weights(monkeypatch):
    """Refusals happen before any weights load: loading them fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError("a model loaded before the input was checked")

    monkeypatch.setattr(WanTransformer3DModel, "from_pretrained", refuse)


@pytest.mark.parametrize("training, message", [
    ({"height": 40}, "'training.height': 40; allowed: a multiple of 16 (e.g. 32)"),
    ({"width": 0}, "'training.width': 0; allowed: an integer in [16, 2048]"),
    ({"frames": 8}, "'training.frames': 8; allowed: 4k+1 frames"),
    ({"fps": 0}, "'training.fps': 0"),
    ({"rank": 0}, "'training.rank': 0"),
    ({"alpha": -1}, "'training.alpha': -1; allowed: a number > 0"),
    ({"learning_rate": 0}, "'training.learning_rate': 0"),
    ({"steps": 0}, "'training.steps': 0"),
    ({"batch_size": 0}, "'training.batch_size': 0"),
    ({"gradient_accumulation": 0}, "'training.gradient_accumulation': 0"),
    ({"method": "dora"}, "'training.method': 'dora'; allowed: lora or full"),
    ({"lr_scheduler": "wavy"}, "'training.lr_scheduler': 'wavy'; allowed: linear, cosine"),
    ({"target_modules": ["to_q", "attn9"]}, "'training.target_modules': 'attn9'; allowed: names of Linear layers"),
    ({"learning_rte": 1}, "unknown key 'training.learning_rte'"),
    ({"sparsity_schedule": {"ramp_steps": 10}}, "'training.sparsity_schedule.ramp_steps': 10; allowed: 0 unless"),
    ({"validation": {"every": 5}}, "'training.validation.every': 5; allowed: 0 unless validation.prompts"),
    ({"frame_sampling": "random"}, "'training.frame_sampling': 'random'; allowed: start, uniform, windows"),
    ({"samples_per_clip": 2}, "'training.samples_per_clip': 2; allowed: 1 with frame_sampling start"),
    ({"caption_dropout": 1}, "'training.caption_dropout': 1; allowed: a number in [0, 1)"),
    ({"ema_decay": 1.5}, "'training.ema_decay': 1.5; allowed: a number in (0, 1) or null"),
    ({"tracker": "wandb"}, "'training.tracker': 'wandb'; allowed: tensorboard or null"),
])
def test_bad_training_settings(tiny_model, clip_folder, tmp_path, no_weights, capsys, training, message):
    config = tmp_path / "c.yaml"
    config.write_text(json.dumps({"sparsity": {"mode": "nabla"}, "training": {**GOOD, **training}}))
    args = ["train", "--model", str(tiny_model), "--data", str(clip_folder), "--config", str(config),
            "--output", str(tmp_path / "run")]
    assert finetune.main(args) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert not (tmp_path / "run").exists()


def test_bad_paths(tiny_model, clip_folder, tmp_path, no_weights, capsys):
    def refused(model=tiny_model, data=clip_folder, output=tmp_path / "run", *extra):
        code = finetune.main(["train", "--model", str(model), "--data", str(data), "--output", str(output), *extra])
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1, err
        return err

    assert f"data: folder {tmp_path / 'nope'} does not exist" in refused(data=tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    assert "holds no video or image (allowed: .mp4, .mov" in refused(data=tmp_path / "empty")
    assert "is not a diffusers pipeline folder" in refused(model=tmp_path / "empty")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    assert "is not empty and holds no training run" in refused(output=tmp_path / "other")
    assert "--resume and --overwrite exclude each other" in refused(tiny_model, clip_folder, tmp_path / "run",
                                                                   "--resume", "--overwrite")
    (tmp_path / "c.yaml").write_text("sparsity: {mode: full}\ngeneration: {steps: 4}\n")
    assert "unknown section 'generation'" in refused(tiny_model, clip_folder, tmp_path / "run", "--config",
                                                     str(tmp_path / "c.yaml"))
    assert "--device 'gpu' is not allowed; allowed: cpu, cuda or cuda:N" in refused(
        tiny_model, clip_folder, tmp_path / "run", "--device", "gpu")
    assert "--dist-backend gloo needs several processes (torchrun" in refused(
        tiny_model, clip_folder, tmp_path / "run", "--dist-backend", "gloo")


def test_no_usable_clip_exits_2(tiny_model, tmp_path, capsys):
    folder = tmp_path / "clips"
    folder.mkdir()
    (folder / "broken.mp4").write_bytes(b"not a video")
    (folder / "broken.txt").write_text("a cat")
    config = tmp_path / "c.yaml"
    config.write_text(json.dumps({"training": GOOD}))
    args = ["precompute", "--model", str(tiny_model), "--data", str(folder), "--config", str(config)]
    assert finetune.main(args) == 2
    err = capsys.readouterr().err
    assert f"skipped {folder / 'broken.mp4'}: unreadable" in err
    assert f"error: data: no usable clip in {folder} (1 skipped)" in err


def test_sparsity_schedule():
    target = SparsityConfig(mode="nabla", threshold=0.7, max_density=0.1, block_size=128)
    schedule = SparsitySchedule(dense_steps=2, ramp_steps=4)
    assert [config_at(s, target, schedule).mode for s in range(3)] == ["full", "full", "nabla"]
    caps = [config_at(s, target, schedule).max_density for s in range(2, 8)]
    np.testing.assert_allclose(caps, [0.775, 0.55, 0.325, 0.1, 0.1, 0.1])
    assert caps[3:] == [0.1] * 3  # the target exactly once the ramp is done (not 0.09999999999999998)
    assert config_at(5, target, SparsitySchedule()) == target
    assert config_at(0, SparsityConfig(), schedule) == SparsityConfig()  # dense stays dense


def test_data_order_visits_each_clip_once_per_epoch():
    order = [sample_clip(n, 5, seed=3) for n in range(15)]
    assert all(sorted(order[i:i + 5]) == list(range(5)) for i in (0, 5, 10))
    assert order[:5] != order[5:10]
    assert order == [sample_clip(n, 5, seed=3) for n in range(15)]


def test_flow_matching():
    x0, noise = torch.randn(2, 16, 3, 4, 4), torch.randn(2, 16, 3, 4, 4)
    s = torch.tensor([0.0, 1.0])
    noisy = flow_matching.noisy_latents(x0, noise, s)
    assert torch.equal(noisy[0], x0[0]) and torch.equal(noisy[1], noise[1])
    assert torch.equal(flow_matching.flow_target(x0, noise), noise - x0)
    # Wan's shift (UniPC flow_shift 3): s' = 3 s / (1 + 2 s), which moves the mass to high noise
    torch.testing.assert_close(flow_matching.shift_sigmas(torch.tensor([0.0, 0.5, 1.0]), 3.0),
                               torch.tensor([0.0, 0.75, 1.0]))
    sigmas = flow_matching.sample_sigmas(1000, "logit_normal", 0.0, 1.0, 1.29, 3.0, torch.Generator().manual_seed(0))
    assert 0 < sigmas.min() and sigmas.max() < 1 and sigmas.median() > 0.6
    assert scheduler_shift({"flow_shift": 5.0}) == 5.0 and scheduler_shift({"shift": 3.0}) == 3.0
    assert scheduler_shift({}) == 1.0


def test_clip_reading(tmp_path):
    assert frame_indices(5, 8, 24) == [0, 3, 6, 9, 12]
    assert frame_indices(3, 16, 8) == [0, 0, 1]
    frames = [np.zeros((40, 64, 3), np.uint8) for _ in range(10)]
    for frame in frames:
        frame[:, 16:48] = 255  # a white centre band exactly as wide as the crop
    imageio.mimwrite(tmp_path / "v.mp4", frames, fps=8, macro_block_size=8)
    video = read_clip(tmp_path / "v.mp4", 32, 32, 9, 8)  # 40x64 -> 32x51 (cover), then the centre 32x32
    assert video.shape == (3, 9, 32, 32) and video.min() >= -1 and video.max() <= 1
    assert video[:, :, :, 8:24].mean() > 0.8
    (tmp_path / "v.txt").write_text("caption")
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "w.mp4", "text": "from jsonl"}\n')
    imageio.mimwrite(tmp_path / "w.mp4", frames, fps=8, macro_block_size=8)
    assert [(c.path.name, c.caption) for c in find_clips(tmp_path)] == [("v.mp4", "caption"), ("w.mp4", "from jsonl")]


@pytest.mark.parametrize("name", ["finetune-lora.yaml", "finetune-full.yaml"])
def test_shipped_configs_load(name):
    from wan.train.config import load_finetune_config

    sparsity, training = load_finetune_config(Path(__file__).resolve().parents[1] / "configs" / name)
    assert sparsity.mode == "nabla" and sparsity.block_size == 128 and training.method == name.split("-")[1][:-5]


def test_caption_dropout_replaces_the_caption_at_its_rate_and_nothing_else():
    from wan.train.config import TrainingConfig
    from wan.train.trainer import caption_dropped, make_batch

    training = TrainingConfig(height=32, width=32, frames=9, caption_dropout=0.25)
    dropped = [caption_dropped(n, training) for n in range(4000)]
    assert 0.22 < sum(dropped) / len(dropped) < 0.28
    entries = [{"latents": torch.randn(16, 3, 4, 4), "prompt_embeds": torch.full((8, 4), float(i))} for i in range(3)]
    empty = torch.full((8, 4), -1.0)
    args = (range(40), training, 3.0, torch.device("cpu"), torch.float32)
    with_dropout = make_batch(entries, *args, empty_prompt=empty)
    without = make_batch(entries, range(40), TrainingConfig(height=32, width=32, frames=9), 3.0,
                         torch.device("cpu"), torch.float32)
    prompts = with_dropout["encoder_hidden_states"]
    is_empty = (prompts == -1).all(dim=(1, 2))
    assert is_empty.tolist() == dropped[:40]
    assert torch.equal(prompts[~is_empty], without["encoder_hidden_states"][~is_empty])
    for key in ("hidden_states", "timestep", "target"):  # the noise and noise levels are the same draws
        assert torch.equal(with_dropout[key], without[key])


def test_window_offsets_draw_the_asked_samples():
    from wan.train.clips import window_offsets

    assert window_offsets(41, 9, "start", 1, None) == [0]
    assert window_offsets(41, 9, "uniform", 3, None) == [0, 16, 32]
    assert window_offsets(41, 9, "windows", 1, 8) == [0, 8, 16, 24, 32]
    assert window_offsets(41, 9, "windows", 2, 8) == [0, 8]
    assert window_offsets(41, 9, "windows", 1, None) == [0, 9, 18, 27]  # stride: a window's length
    assert window_offsets(9, 9, "uniform", 4, None) == [0] and window_offsets(5, 9, "uniform", 2, None) == []
    assert frame_indices(4, 8, 8, offset=3) == [3, 4, 5, 6] and frame_indices(2, 8, 24, offset=1) == [3, 6]


def test_uniform_frame_sampling_caches_several_samples_of_a_long_clip(tiny_model, tmp_path):
    from safetensors.torch import load_file

    from wan.train.clips import clip_length

    folder = tmp_path / "clips"
    folder.mkdir()
    imageio.mimwrite(folder / "long.mp4", [np.full((32, 32, 3), 6 * t, np.uint8) for t in range(41)], fps=8,
                     macro_block_size=8)
    (folder / "long.txt").write_text("a cat")
    assert clip_length(folder / "long.mp4", 8) == 41 and clip_length(folder / "long.mp4", 4) == 21
    config = tmp_path / "c.yaml"
    config.write_text("training: {height: 32, width: 32, frames: 9, fps: 8, frame_sampling: uniform, "
                      "samples_per_clip: 3}\n")
    cache = tmp_path / "cache"
    assert finetune.main(["precompute", "--model", str(tiny_model), "--data", str(folder), "--config", str(config),
                          "--cache", str(cache)]) == 0
    entries = sorted(cache.glob("long-*.safetensors"))
    assert len(entries) == 3
    latents = [load_file(str(e))["latents"] for e in entries]
    assert not torch.equal(latents[0], latents[1]) and not torch.equal(latents[1], latents[2])
    start = tmp_path / "start.yaml"  # the first window is the entry frame_sampling start makes: reused
    start.write_text("training: {height: 32, width: 32, frames: 9, fps: 8}\n")
    assert finetune.main(["precompute", "--model", str(tiny_model), "--data", str(folder), "--config", str(start),
                          "--cache", str(cache)]) == 0
    assert len(list(cache.glob("long-*.safetensors"))) == 3


def test_repeats_visit_each_sample_that_often_an_epoch():
    from wan.train.config import TrainingConfig
    from wan.train.trainer import make_batch

    entries = [{"latents": torch.zeros(16, 3, 4, 4), "prompt_embeds": torch.full((8, 4), float(i))} for i in range(3)]
    for repeats in (1, 3):
        training = TrainingConfig(height=32, width=32, frames=9, repeats=repeats)
        batch = make_batch(entries, range(3 * repeats), training, 3.0, torch.device("cpu"), torch.float32)
        seen = batch["encoder_hidden_states"][:, 0, 0].tolist()
        assert sorted(seen) == sorted([0.0, 1.0, 2.0] * repeats)
    once = make_batch(entries, range(6), TrainingConfig(height=32, width=32, frames=9), 3.0, torch.device("cpu"),
                      torch.float32)
    assert [sample_clip(n, 3, 0) for n in range(6)] == once["encoder_hidden_states"][:, 0, 0].int().tolist()
