"""Image to video on the tiny Wan2.1 I2V and FLF2V checkpoints: generate.py --image / --last-image, the pipeline class
read from model_index.json (local folder and hub cache), NABLA on self-attention only, and the one-line refusals."""

import json
import shutil

import huggingface_hub.constants
import numpy as np
import pytest
import torch
from diffusers import WanImageToVideoPipeline
from diffusers.models.transformers.transformer_wan import WanAttnProcessor
from PIL import Image
from transformers import CLIPVisionModel

import wan.generate.cli
import wan.models.loading
from nabla import SparsityConfig
from wan import disable_nabla, enable_nabla
from wan.attention.processor import NablaWanAttnProcessor
from wan.models.loading import load_pipeline

SMALL = ["--height", "32", "--width", "32", "--frames", "5", "--steps", "2"]


def run_cli(*args) -> int:
    return wan.generate.cli.main([str(a) for a in args])


def write_image(path, seed: int):
    Image.fromarray(np.random.RandomState(seed).randint(0, 256, (40, 48, 3), np.uint8)).save(path)
    return path


@pytest.fixture
def images(tmp_path):
    return write_image(tmp_path / "first.png", 0), write_image(tmp_path / "last.png", 1)


def test_the_tiny_checkpoints_are_i2v_shaped(i2v_model, flf2v_model):
    for model, pos_embed in ((i2v_model, None), (flf2v_model, 10)):  # 2 images of 4 patches + CLS
        index = json.loads((model / "model_index.json").read_text())
        assert index["_class_name"] == "WanImageToVideoPipeline" and index["image_encoder"] == ["transformers",
                                                                                               "CLIPVisionModel"]
        config = json.loads((model / "transformer/config.json").read_text())
        assert (config["in_channels"], config["image_dim"], config["added_kv_proj_dim"]) == (36, 16, 24)
        assert config["pos_embed_seq_len"] == pos_embed


def test_generate_with_an_image_at_threshold_one_is_the_stock_video(i2v_model, images, tmp_path, capsys):
    """The image reaches the pipeline (another image, another video), and NABLA at threshold 1.0 keeps every block:
    the stock video."""
    config = tmp_path / "c.yaml"
    config.write_text("sparsity: {mode: nabla, threshold: 1.0}\n")
    outputs = {name: tmp_path / f"{name}.npy" for name in ("stock", "nabla", "other")}
    common = ["--model", i2v_model, "--prompt", "a cat", *SMALL]
    assert run_cli(*common, "--image", images[0], "--output", outputs["stock"]) == 0
    assert run_cli(*common, "--image", images[0], "--config", config, "--output", outputs["nabla"]) == 0
    assert run_cli(*common, "--image", images[1], "--output", outputs["other"]) == 0
    assert "mean mask density: 1.000" in capsys.readouterr().out
    stock, nabla, other = (np.load(path) for path in outputs.values())
    assert stock.shape == (5, 32, 32, 3)
    assert np.abs(nabla - stock).max() < 1e-4
    assert np.abs(other - stock).max() > 1e-2


def test_nabla_patches_self_attention_only(i2v_model, images):
    """attn2 (cross-attention to the text and the CLIP image tokens, through add_k_proj / add_v_proj) keeps its stock
    processor."""
    pipe = load_pipeline(str(i2v_model), device="cpu")
    assert isinstance(pipe, WanImageToVideoPipeline) and isinstance(pipe.image_encoder, CLIPVisionModel)
    assert pipe.image_encoder.dtype == torch.float32
    stock = [block.attn2.processor for block in pipe.transformer.blocks]
    enable_nabla(pipe, SparsityConfig(mode="nabla", threshold=0.5))
    try:
        for block, processor in zip(pipe.transformer.blocks, stock):
            assert isinstance(block.attn1.processor, NablaWanAttnProcessor)
            assert block.attn2.processor is processor and isinstance(processor, WanAttnProcessor)
            assert block.attn2.add_k_proj is not None
    finally:
        disable_nabla(pipe)


def test_first_and_last_frame_with_compare_and_stats(flf2v_model, images, tmp_path, capsys):
    stats = tmp_path / "s.json"
    assert run_cli("--model", flf2v_model, "--prompt", "a cat", *SMALL, "--image", images[0], "--last-image", images[1],
                   "--config", "nabla-0.7", "--compare", "--stats", stats, "--output", tmp_path / "v.npy") == 0
    assert "| full | " in capsys.readouterr().out
    settings = json.loads(stats.read_text())["settings"]
    assert (settings["image"], settings["last_image"]) == (str(images[0]), str(images[1]))
    assert np.load(tmp_path / "v.npy").shape == np.load(tmp_path / "v.full.npy").shape == (5, 32, 32, 3)


def test_prompts_share_the_image(i2v_model, images, tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\na dog\n")
    assert run_cli("--model", i2v_model, "--prompts", prompts, *SMALL, "--image", images[0], "--output",
                   tmp_path / "v.npy") == 0
    assert capsys.readouterr().out.endswith(f"made 2 of 2 videos from {prompts}\n")
    first, second = np.load(tmp_path / "v-1.npy"), np.load(tmp_path / "v-2.npy")
    assert first.shape == (5, 32, 32, 3) and not np.array_equal(first, second)


def test_a_hub_model_loads_the_class_its_index_names(i2v_model, images, tmp_path, monkeypatch, capsys):
    """A hub id (here from a Hugging Face cache, offline) loads as the class of its model_index.json; it is checked
    for its images once loaded."""
    snapshot = tmp_path / "hub/models--tiny--wan-i2v/snapshots" / ("0" * 40)
    shutil.copytree(i2v_model, snapshot)
    (tmp_path / "hub/models--tiny--wan-i2v/refs").mkdir()
    (tmp_path / "hub/models--tiny--wan-i2v/refs/main").write_text("0" * 40)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert isinstance(load_pipeline("tiny/wan-i2v", device="cpu"), WanImageToVideoPipeline)
    assert run_cli("--model", "tiny/wan-i2v", "--prompt", "a cat", *SMALL, "--output", tmp_path / "v.npy") == 2
    assert capsys.readouterr().err.endswith("\nerror: --image: tiny/wan-i2v is an image-to-video model "
                                            "(WanImageToVideoPipeline); give its first frame with --image PATH\n")


@pytest.mark.parametrize("model, flags, error", [
    ("tiny", ["--image", "{tmp}/first.png"], ("--image: {tiny} is a text-to-video model (WanPipeline) and takes no "
     "image; image to video needs a WanImageToVideoPipeline model, such as Wan-AI/Wan2.1-I2V-14B-480P-Diffusers, or a "
     "Wan2.2 TI2V one")),
    ("i2v", [], ("--image: {i2v} is an image-to-video model (WanImageToVideoPipeline); give its first frame with --image "
     "PATH")),
    ("i2v", ["--image", "{tmp}/first.png", "--last-image", "{tmp}/last.png"], ("--last-image: {i2v} takes one image, the "
     "first frame (Wan2.1 I2V); a first and a last frame need a FLF2V model, such as "
     "Wan-AI/Wan2.1-FLF2V-14B-720P-Diffusers, or a Wan2.2 I2V one")),
    ("flf2v", ["--last-image", "{tmp}/last.png"], "last_image: a last frame needs a first one; give --image PATH too"),
    ("flf2v", ["--image", "{tmp}/first.png", "--last-image", "{tmp}/last.png", "--frames", "1"], ("frames: 1 is not "
     "allowed with a last image; a first and a last frame need at least 5 frames")),
    ("i2v", ["--image", "{tmp}/missing.png"], ("--image: {tmp}/missing.png does not exist; give an image file (PNG, JPEG, "
     "WebP, ...)")),
    ("i2v", ["--image", "{tmp}"], "--image: {tmp} is not a file; give an image file (PNG, JPEG, WebP, ...)"),
    ("i2v", ["--image", "{tmp}/text.png"], ("--image: {tmp}/text.png cannot be read as an image (PIL: cannot identify "
     "image file '{tmp}/text.png'); give a PNG, JPEG, WebP, ... file")),
    ("flf2v", ["--image", "{tmp}/first.png", "--last-image", "{tmp}/cut.png"], ("--last-image: {tmp}/cut.png cannot be "
     "read as an image (PIL: image file is truncated); give a PNG, JPEG, WebP, ... file")),
    ("i2v", ["--image", "{tmp}/first.png", "--cfg-parallel"], ("--image runs on one process for now; drop "
     "--ulysses/--cfg-parallel")),
], ids=["text-model", "no-image", "last-for-i2v", "last-alone", "one-frame", "missing", "folder", "not-image",
        "truncated", "several-gpus"])
def test_bad_images_are_refused_before_loading(model, flags, error, tiny_model, i2v_model, flf2v_model, images,
                                                tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(wan.models.loading, "load_pipeline", lambda *a, **k: pytest.fail("the model loaded"))
    (tmp_path / "text.png").write_text("not an image")
    (tmp_path / "cut.png").write_bytes(images[0].read_bytes()[:300])
    models = {"tiny": tiny_model, "i2v": i2v_model, "flf2v": flf2v_model}
    flags = [flag.format(tmp=tmp_path) for flag in flags]
    assert run_cli("--model", models[model], "--prompt", "a cat", *SMALL, *flags, "--output", tmp_path / "v.npy") == 2
    assert capsys.readouterr().err == "error: " + error.format(tmp=tmp_path, **models) + "\n"
