"""What tripped a user on the second day, each refused in one line with exit code 2 (or 130 for Ctrl-C) before any
model loads, and the words that misled: argparse's refusals, unwritable cache and run folders, a file given for a
folder and a folder for a file, a truncated LoRA, shipped finetune configs by name, `1e-4` in YAML, the configs each
command offers, "1 frames", a prompt longer than the text encoder reads."""

import pytest
import torch
from test_finetune_inputs import clip_folder, no_weights  # noqa: F401 - fixtures

import finetune
import generate
import wan.generate.run
from wan.cli import console
from wan.generate.cli import build_parser


def call(main, *args) -> int:
    try:
        return main([str(a) for a in args])
    except SystemExit as exit_:
        return exit_.code


@pytest.mark.parametrize("main, args, message", [
    (generate.main, ["--prompt", "a", "--steps", "x"], "error: argument --steps: invalid int value: 'x' (see "),
    (generate.main, ["--prompt", "a", "--bogus"], "error: unrecognized arguments: --bogus (see "),
    (finetune.main, ["train", "--data", "d"], "error: the following arguments are required: --output (see "),
    (finetune.main, ["fly"], "error: argument command: invalid choice: 'fly' (choose from "),
])
def test_argparse_refusals_are_one_line(capsys, main, args, message):
    assert call(main, *args) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1, err


def test_ctrl_c_in_generate_is_one_line_and_130(tiny_model, tmp_path, monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(wan.generate.run, "generate", interrupted)
    out = tmp_path / "v.mp4"
    assert call(generate.main, "--prompt", "a cat", "--model", tiny_model, "--output", out, "--steps", 1) == 130
    assert capsys.readouterr().err.splitlines()[-1] == "interrupted: the video being made was not written"
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("extra, message", [
    (["--cache", "/proc/nabla-cache"], "error: cache: folder /proc (to make /proc/nabla-cache in) is not writable"),
    (["--cache", "/proc/version"], "error: cache: /proc/version is a file; give a folder"),
])
def test_an_unwritable_cache_is_refused_before_loading(tiny_model, clip_folder, no_weights, capsys,  # noqa: F811
                                                       extra, message):
    assert call(finetune.main, "precompute", "--model", tiny_model, "--data", clip_folder, *extra) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1, err


def test_an_unwritable_run_folder_is_refused_first(tiny_model, tmp_path, no_weights, capsys):  # noqa: F811
    assert call(finetune.main, "train", "--model", tiny_model, "--data", tmp_path / "none", "--output",
                "/proc/nabla-run") == 2
    err = capsys.readouterr().err  # before the data folder (which does not exist either) is looked at
    assert err.startswith("error: output: folder /proc (to make /proc/nabla-run in) is not writable") and \
        err.count("\n") == 1, err


def test_a_file_for_the_data_folder_and_a_folder_for_the_config(tiny_model, clip_folder, tmp_path, no_weights,  # noqa: F811
                                                                capsys):
    assert call(finetune.main, "precompute", "--model", tiny_model, "--data", clip_folder / "a.mp4") == 2
    assert f"error: data: {clip_folder / 'a.mp4'} is a file; give the folder that holds the clips" in \
        capsys.readouterr().err
    assert call(finetune.main, "precompute", "--model", tiny_model, "--data", clip_folder, "--config", tmp_path) == 2
    assert capsys.readouterr().err == f"error: config: {tmp_path} is a folder; give a YAML file\n"
    assert call(generate.main, "--prompt", "a", "--config", tmp_path) == 2
    assert capsys.readouterr().err == f"error: config: {tmp_path} is a folder; give a YAML file\n"


def test_shipped_finetune_configs_by_name_and_yaml_1e_4(tiny_model, clip_folder, tmp_path, monkeypatch,  # noqa: F811
                                                        capsys):
    seen = []
    monkeypatch.setattr("wan.train.cli.check_model", lambda model, training: seen.append(training) or 1 / 0)
    with pytest.raises(ZeroDivisionError):  # the config was read and checked: the model check comes next
        finetune.main(["precompute", "--model", str(tiny_model), "--data", str(clip_folder), "--config",
                       "finetune-lora"])
    assert seen[-1].method == "lora"
    config = tmp_path / "lr.yaml"
    config.write_text("training:\n  learning_rate: 1e-4\n  height: 32\n  width: 32\n")
    with pytest.raises(ZeroDivisionError):
        finetune.main(["precompute", "--model", str(tiny_model), "--data", str(clip_folder), "--config",
                       str(config)])
    assert seen[-1].learning_rate == 1e-4


def test_each_command_offers_its_own_configs(capsys):
    help_text = build_parser("g").format_help()
    assert "fastest" in help_text and "finetune-lora" not in help_text
    assert call(finetune.main, "train", "--help") == 0
    out = capsys.readouterr().out
    assert "finetune-full,finetune-lora,finetune-tiny" in "".join(out.split()) and "fastest" not in out
    assert console(["--help"]) == 0
    out = capsys.readouterr().out
    assert "finetune" in out and "wan2.2-i2v-a14b" in out


def test_a_truncated_lora_is_one_line(tiny_model, tmp_path, capsys):
    from safetensors.torch import save_file

    whole = tmp_path / "whole.safetensors"
    save_file({"transformer.blocks.0.attn1.to_q.lora_A.weight": torch.zeros(4, 24)}, str(whole))
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(whole.read_bytes()[:100])
    assert call(generate.main, "--prompt", "a", "--model", tiny_model, "--lora", cut) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: lora: {cut} cannot be read as safetensors (") and err.count("\n") == 1, err


def test_one_frame_and_a_long_prompt(tiny_model, tmp_path, capsys):
    out = tmp_path / "v.npy"
    prompt = "a cat plays piano " * 300
    assert call(generate.main, "--prompt", prompt, "--model", tiny_model, "--output", out, "--frames", 1,
                "--steps", 1, "--height", 32, "--width", 32) == 0
    captured = capsys.readouterr()
    assert f"wrote {out} (1 frame, 32x32, 1 step," in captured.out
    assert "warning: prompt is " in captured.err and "the text encoder reads the first 512" in captured.err


def test_the_tiny_fine_tuning_recipe_runs_in_seconds(tiny_model, tmp_path, capsys):
    """The README's try-it recipe: make-tiny-model --clips, then finetune-tiny (a LoRA under NABLA, validated)."""
    import time

    from wan.models.tiny import write_demo_clips

    clips = write_demo_clips(tmp_path / "clips")
    start = time.perf_counter()
    assert finetune.main(["train", "--model", str(tiny_model), "--data", str(clips), "--config", "finetune-tiny",
                          "--output", str(tmp_path / "run")]) == 0
    assert time.perf_counter() - start < 60
    lora = tmp_path / "run" / "lora"
    assert {p.name for p in lora.iterdir()} == {"pytorch_lora_weights.safetensors", "wan_lora.safetensors"}
    assert list((tmp_path / "run" / "validation").rglob("*.mp4"))
    out = capsys.readouterr().out
    assert "4 clips usable" in out and "resolved config:\nsparsity:\n  mode: nabla\n" in out
    assert "  optimizer: adamw\n" in out and "trainable parameters: 3,072 of 26,024 (11.80%)" in out
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    assert {"train/loss", "train/lr", "train/grad_norm", "train/density", "train/s_per_step"} <= set(
        events.Tags()["scalars"])
    assert [e.step for e in events.Scalars("train/loss")] == list(range(1, 21))
    assert [e.step for e in events.Images("validation/0")] == [20]  # its first, middle and last frames


@pytest.mark.parametrize("optimizer, message", [
    ("adamw8bit", "'training.optimizer': 'adamw8bit'; allowed: "),
    ("lion", "'training.optimizer': 'lion'; allowed: adamw, adam, sgd, adamw8bit, prodigy"),
])
def test_optimizers_that_cannot_run_are_one_line(tiny_model, clip_folder, tmp_path, no_weights, capsys,  # noqa: F811
                                                optimizer, message):
    config = tmp_path / "opt.yaml"
    config.write_text(f"training: {{optimizer: {optimizer}, height: 32, width: 32}}\n")
    assert call(finetune.main, "precompute", "--model", tiny_model, "--data", clip_folder, "--config", config) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_torch_optimizers_train(tiny_model, tmp_path, optimizer):
    from wan.models.tiny import write_demo_clips
    from wan.train.run_folder import read_log

    clips = write_demo_clips(tmp_path / "clips", count=1)
    config = tmp_path / "opt.yaml"
    config.write_text(f"training: {{optimizer: {optimizer}, tracker: null, height: 32, width: 32, frames: 9, fps: 8, "
                      "rank: 4, alpha: 4, steps: 3, checkpoint_every: 3, learning_rate: 1.0e-3}\n")
    assert finetune.main(["train", "--model", str(tiny_model), "--data", str(clips), "--config", str(config),
                          "--output", str(tmp_path / "run")]) == 0
    log = read_log(tmp_path / "run")
    assert len(log) == 3 and all(e["grad_norm"] > 0 for e in log)
    assert not (tmp_path / "run" / "tensorboard").exists()


def test_images_train_as_one_frame_samples(tiny_model, i2v_model, tmp_path, capsys):
    from PIL import Image
    from safetensors.torch import load_file

    from wan.models.tiny import write_demo_clips

    data = write_demo_clips(tmp_path / "data", count=1)
    for index in range(2):
        Image.new("RGB", (40, 30), (60 * index, 120, 200)).save(data / f"image{index}.png")
        (data / f"image{index}.txt").write_text("a red car")
    config = tmp_path / "c.yaml"
    config.write_text("training: {height: 32, width: 32, frames: 9, fps: 8, rank: 4, alpha: 4, steps: 3, "
                      "checkpoint_every: 3, tracker: null, batch_size: 2}\n")
    args = ["train", "--model", str(tiny_model), "--data", str(data), "--config", str(config), "--output"]
    assert finetune.main([*args, str(tmp_path / "mixed")]) == 2  # a frame and 9 frames stack into no batch
    assert "'training.batch_size': 2; allowed: 1 for data of images and videos together (2 images, 1 videos" in \
        capsys.readouterr().err
    config.write_text(config.read_text().replace("batch_size: 2", "batch_size: 1"))
    assert finetune.main([*args, str(tmp_path / "run"), "--cache", str(tmp_path / "cache")]) == 0
    frames = sorted(load_file(str(e))["latents"].shape[1] for e in (tmp_path / "cache").glob("*.safetensors"))
    assert frames == [1, 1, 3]  # two images, one latent frame each; the clip's 9 frames in 3
    assert finetune.main(["precompute", "--model", str(i2v_model), "--data", str(data), "--config", str(config)]) == 2
    assert "holds images, which train text-to-video models only" in capsys.readouterr().err


def test_buckets_keep_each_batch_to_one_size(tiny_model, tmp_path):
    from PIL import Image
    from safetensors.torch import load_file

    from wan.models.tiny import write_demo_clips
    from wan.train.clips import nearest_bucket
    from wan.train.config import TrainingConfig
    from wan.train.trainer import sample_entry

    assert nearest_bucket((48, 64), [[32, 32], [32, 48]]) == (32, 48)
    assert nearest_bucket((64, 48), [[32, 32], [32, 48], [48, 32]]) == (48, 32)
    data = write_demo_clips(tmp_path / "data", count=3)  # 48x64 clips: the 32x48 bucket
    for index in range(3):
        Image.new("RGB", (40, 40), (60 * index, 120, 200)).save(data / f"image{index}.png")  # square: 32x32
        (data / f"image{index}.txt").write_text("a red car")
    config = tmp_path / "c.yaml"
    config.write_text("training: {buckets: [[32, 32], [32, 48]], height: 32, width: 32, frames: 9, fps: 8, rank: 4, "
                      "alpha: 4, steps: 3, checkpoint_every: 3, tracker: null, batch_size: 2}\n")
    assert finetune.main(["train", "--model", str(tiny_model), "--data", str(data), "--config", str(config),
                          "--output", str(tmp_path / "run"), "--cache", str(tmp_path / "cache")]) == 0
    shapes = sorted(tuple(load_file(str(e))["latents"].shape) for e in (tmp_path / "cache").glob("*.safetensors"))
    assert shapes == [(16, 1, 4, 4)] * 3 + [(16, 3, 4, 6)] * 3
    training = TrainingConfig(height=32, width=32, frames=9, buckets=[[32, 32], [32, 48]], batch_size=2)
    kinds = ((16, 1, 4, 4),) * 3 + ((16, 3, 4, 6),) * 3
    for epoch_start in (0, 8):
        batches = [[kinds[sample_entry(n, 6, kinds, training)] for n in range(b, b + 2)]
                   for b in range(epoch_start, epoch_start + 8, 2)]
        assert all(a == b for a, b in batches)  # one size a batch
