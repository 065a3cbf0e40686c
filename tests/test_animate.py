"""Wan2.2 Animate under NABLA on the tiny checkpoint (`make-tiny-model --family wan2.2-animate`, loaded as a user
loads theirs; CPU, float32): through the API, every block's self-attention patched, the face adapter and
cross-attention stock, threshold 1.0 the stock video, a sparse mask another; through `generate`, its character
image, pose and face videos (and a background and mask to replace), whose bad input is refused before loading."""

import json

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline, WanAnimatePipeline
from PIL import Image

import wan.generate.cli
import wan.models.loading
from nabla import SparsityConfig
from wan import disable_nabla, enable_nabla
from wan.attention.processor import NablaWanAttnProcessor
from wan.io.video import write_video
from wan.models import tiny

FRAMES, SIDE, FACE = 9, 32, 16  # one segment of 9 frames: 3 latent frames and the character's


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny.save_tiny_model(tmp_path_factory.mktemp("animate") / "model", family="wan2.2-animate")


@pytest.fixture(scope="module")
def pipe(folder):
    loaded = DiffusionPipeline.from_pretrained(folder)
    loaded.set_progress_bar_config(disable=True)
    return loaded


def run(pipe) -> np.ndarray:
    rng = np.random.default_rng(0)
    frames = [Image.fromarray(rng.integers(0, 255, (SIDE, SIDE, 3), dtype=np.uint8)) for _ in range(FRAMES)]
    faces = [Image.fromarray(rng.integers(0, 255, (FACE, FACE, 3), dtype=np.uint8)) for _ in range(FRAMES)]
    return pipe(image=frames[0], pose_video=frames, face_video=faces, prompt="a cat dances", height=SIDE, width=SIDE,
                segment_frame_length=FRAMES, num_inference_steps=2, guidance_scale=1.0, output_type="np",
                generator=torch.Generator().manual_seed(0)).frames[0]


def test_every_block_self_attention_is_patched_and_nothing_else(pipe):
    assert isinstance(pipe, WanAnimatePipeline)
    transformer = pipe.transformer
    before = {name: module.processor for name, module in transformer.named_modules() if hasattr(module, "processor")}
    handle = enable_nabla(pipe, SparsityConfig(mode="nabla", threshold=0.5))
    try:
        after = {name: module.processor for name, module in transformer.named_modules() if hasattr(module, "processor")}
        changed = sorted(name for name in before if after[name] is not before[name])
        assert changed == ["blocks.0.attn1", "blocks.1.attn1"]
        assert all(isinstance(after[name], NablaWanAttnProcessor) for name in changed)
        assert handle.family.name == "Wan2.2 Animate"
    finally:
        disable_nabla(pipe)
    assert all(module.processor is before[name] for name, module in transformer.named_modules() if name in before)


def test_threshold_one_is_the_stock_video_and_a_sparse_mask_is_not(pipe):
    stock = run(pipe)
    for threshold in (1.0, 0.3):
        handle = enable_nabla(pipe, SparsityConfig(mode="nabla", threshold=threshold))
        try:
            frames = run(pipe)
            calls, density = len(handle.state.records.densities), handle.state.mean_density()
        finally:
            disable_nabla(pipe)
        assert frames.shape == stock.shape == (FRAMES, SIDE, SIDE, 3)
        assert calls == 2 * 2  # 2 steps x 2 blocks, one segment
        if threshold == 1.0:
            assert np.abs(frames - stock).max() < 1e-4
        else:
            assert density < 0.9 and np.abs(frames - stock).max() > 1e-3


@pytest.fixture
def controls(tmp_path):
    """The character (first.png) and 9-frame pose, face, background and mask videos as .npy frames written by the
    project's own writer (what `--output NAME.npy` writes); a config with a step cache."""
    rng = np.random.RandomState(0)
    video = rng.rand(FRAMES, 40, 48, 3).astype(np.float32)
    mask = np.zeros_like(video)
    mask[:, 10:30, 12:36] = 1
    Image.fromarray((video[0] * 255).astype(np.uint8)).save(tmp_path / "first.png")
    paths = {name: write_video(frames, tmp_path / f"{name}.npy") for name, frames in (
        ("pose", video[::-1].copy()), ("face", rng.rand(FRAMES, 24, 24, 3).astype(np.float32)), ("background", video),
        ("mask", mask), ("short", video[:5]))}
    (tmp_path / "cache.yaml").write_text("sparsity: {mode: nabla, threshold: 0.7}\ncache: {type: taylorseer}\n")
    return {**paths, "image": tmp_path / "first.png", "cache": tmp_path / "cache.yaml"}


def run_cli(*args) -> int:
    return wan.generate.cli.main([str(a) for a in args])


@pytest.mark.parametrize("replace", [False, True], ids=["animate", "replace"])
def test_generate_animates_the_character(folder, controls, replace, tmp_path):
    """--image, --pose-video and --face-video (and --video with --mask: its replacement mode) reach the pipeline; NABLA
    on both blocks' self-attention, --stats counting them."""
    out, stats = tmp_path / "v.npy", tmp_path / "s.json"
    background = ["--video", controls["background"], "--mask", controls["mask"]] if replace else []
    assert run_cli("--model", folder, "--prompt", "a cat dances", "--image", controls["image"], "--pose-video",
                   controls["pose"], "--face-video", controls["face"], *background, "--height", SIDE, "--width", SIDE,
                   "--frames", FRAMES, "--steps", 2, "--config", "nabla-0.7", "--output", out, "--stats", stats) == 0
    assert np.load(out).shape == (FRAMES, SIDE, SIDE, 3)
    report = json.loads(stats.read_text())
    assert (report["blocks"], report["computed_steps"], report["layers"]) == (2, [0, 1], [0, 1])


@pytest.mark.parametrize("model, flags, error", [
    ("animate", [], ("--pose-video: {animate} is a Wan2.2 Animate model; give the pose and the face video that move "
                     "--image's character: --pose-video PATH --face-video PATH")),
    ("animate", ["--pose-video", "{pose}"], ("pose_video: Wan2.2 Animate moves the character by a pose and a face "
                                             "video together; give --face-video PATH too")),
    ("animate", ["--pose-video", "{pose}", "--face-video", "{face}", "--video", "{background}"],
     ("--video: {animate} is a Wan2.2 Animate model, whose --video is the background of its replacement mode; give "
      "--mask PATH too, white where the character to replace is")),
    ("animate", ["--pose-video", "{pose}", "--face-video", "{face}", "--reference-image", "{image}"],
     "--reference-image: not supported for {animate}, a Wan2.2 Animate model; that control is Wan VACE's"),
    ("animate", ["--pose-video", "{short}", "--face-video", "{face}"],
     ("--pose-video: {short} has 5 frames and the video 9 (--frames); give a video of 9 frames, or as many --frames as "
      "it has (4k+1)")),
    ("tiny", ["--pose-video", "{pose}", "--face-video", "{face}"],
     ("--pose-video: {tiny} is a WanPipeline model and takes no pose or face video; they need a Wan2.2 Animate model "
      "(WanAnimatePipeline), such as Wan-AI/Wan2.2-Animate-14B-Diffusers")),
    ("animate without --image", ["--pose-video", "{pose}", "--face-video", "{face}"],
     ("--image: {animate} is an image-to-video model (WanAnimatePipeline); give the character to animate with "
      "--image PATH")),
    ("animate", ["--pose-video", "{pose}", "--face-video", "{face}", "--config", "{cache}"],
     "cache: not supported for {animate}, a Wan2.2 Animate model; drop the config's cache: section"),
], ids=["no controls", "pose alone", "video alone", "vace control", "short pose", "not animate", "no image", "cache"])
def test_bad_controls_are_refused_before_loading(model, flags, error, folder, tiny_model, controls, tmp_path,
                                                 monkeypatch, capsys):
    monkeypatch.setattr(wan.models.loading, "load_pipeline", lambda *a, **k: pytest.fail("the model loaded"))
    models = {"animate": folder, "tiny": tiny_model, "animate without --image": folder}
    image = ["--image", controls["image"]] if model == "animate" else []
    flags = [flag.format(**controls) for flag in flags]
    assert run_cli("--model", models[model], "--prompt", "a cat", *image, *flags, "--height", SIDE, "--width", SIDE,
                   "--frames", FRAMES, "--steps", 2, "--output", tmp_path / "v.npy") == 2
    assert capsys.readouterr().err == "error: " + error.format(**models, **controls) + "\n"
    assert not (tmp_path / "v.npy").exists()
