"""Wan VACE under NABLA on the tiny Wan2.1 VACE checkpoint (2 main blocks, 1 VACE block; CPU, float32): every
self-attention patched, cross-attention stock, threshold 1.0 the stock output, a sparse VACE block against dense
attention under its mask, and `generate` with a control video and mask, whose bad input is refused before loading."""

import json

import numpy as np
import pytest
import torch
from diffusers import WanVACEPipeline
from diffusers.models.transformers.transformer_wan import WanAttnProcessor
from PIL import Image

import wan.attention.processor
import wan.generate.cli
import wan.models.loading
from nabla import SparsityConfig
from wan import disable_nabla, enable_nabla
from wan.attention.patch import patch_transformer, unpatch
from wan.attention.processor import NablaWanAttnProcessor
from wan.io.video import write_video
from wan.models.loading import load_pipeline
from wan.models.random import ARCHS, build_random_pipeline
from wan.models.spec import ModelSpec

SMALL = ["--height", "32", "--width", "32", "--frames", "5", "--steps", "2"]


@pytest.fixture(scope="module")
def pipe(vace_model):
    return load_pipeline(str(vace_model), device="cpu")


def inputs(gen: torch.Generator) -> dict:
    """A transformer forward's inputs: latents of token grid (3, 8, 10) (padded to whole tiles), the control latents
    (96 channels), a timestep and text."""
    return {"hidden_states": torch.randn(1, 16, 3, 16, 20, generator=gen),
            "control_hidden_states": torch.randn(1, 96, 3, 16, 20, generator=gen),
            "timestep": torch.tensor([700.0]), "encoder_hidden_states": torch.randn(1, 9, 32, generator=gen)}


def forward(transformer, args: dict) -> torch.Tensor:
    with torch.no_grad():
        return transformer(**args, return_dict=False)[0]


def self_attentions(transformer) -> list:
    return [block.attn1 for block in [*transformer.blocks, *transformer.vace_blocks]]


def test_the_tiny_checkpoint_is_a_vace_pipeline(vace_model, pipe):
    index = json.loads((vace_model / "model_index.json").read_text())
    config = json.loads((vace_model / "transformer/config.json").read_text())
    assert index["_class_name"] == "WanVACEPipeline" and isinstance(pipe, WanVACEPipeline)
    assert (config["_class_name"], config["num_layers"], config["vace_layers"], config["vace_in_channels"]) == (
        "WanVACETransformer3DModel", 2, [0], 96)
    spec = ModelSpec.from_folder(str(vace_model))
    assert spec.vace and spec.name == "Wan2.1 VACE" and spec.image_frames == 0


def test_threshold_one_and_mode_full_give_the_stock_output(pipe, gen):
    transformer, args = pipe.transformer, inputs(gen)
    stock = forward(transformer, args)
    handle = patch_transformer(transformer, SparsityConfig(mode="nabla", threshold=1.0))
    try:
        patched = forward(transformer, args)
    finally:
        unpatch(transformer)
    # every self-attention built a full mask: layers 0 and 1 are the main blocks, 2 the VACE block
    assert sorted(layer for _, layer, _ in handle.state.records.densities) == [0, 1, 2]
    assert handle.state.mean_density() == 1.0 and handle.state.records.passes == [[0, 3]]
    torch.testing.assert_close(patched, stock, atol=1e-5, rtol=1e-5)
    handle = patch_transformer(transformer, SparsityConfig(mode="full"), always=True)  # raster order: stock, exactly
    try:
        assert torch.equal(forward(transformer, args), stock) and handle.state.records.passes == [[0, 3]]
    finally:
        unpatch(transformer)


def test_every_self_attention_is_nabla_and_cross_attention_stays_stock(pipe, gen):
    transformer, args = pipe.transformer, inputs(gen)
    before = [(block.attn1.processor, block.attn2.processor) for block in [*transformer.blocks, *transformer.vace_blocks]]
    stock = forward(transformer, args)
    handle = enable_nabla(pipe, SparsityConfig(mode="nabla", threshold=0.3))
    try:
        assert handle.family.name == "Wan VACE" and handle.state.layers == 3
        for attn, (_, cross) in zip(self_attentions(transformer), before):
            assert isinstance(attn.processor, NablaWanAttnProcessor)
        blocks = [*transformer.blocks, *transformer.vace_blocks]
        assert all(block.attn2.processor is cross and isinstance(cross, WanAttnProcessor)
                   for block, (_, cross) in zip(blocks, before))
        sparse = forward(transformer, args)
        assert handle.state.mean_density() < 1 and not torch.allclose(sparse, stock, atol=1e-4)
    finally:
        disable_nabla(pipe)
    assert [(block.attn1.processor, block.attn2.processor) for block in blocks] == before
    assert torch.equal(forward(transformer, args), stock)


def test_a_sparse_vace_block_is_dense_attention_under_its_mask(pipe, gen, monkeypatch):
    """The VACE block's processor (tile order, the op between) against diffusers' own processor given the blocks
    the mask kept as a raster-order token mask."""
    transformer, config = pipe.transformer, SparsityConfig(mode="nabla", threshold=0.4)
    attn = transformer.vace_blocks[0].attn1
    latents, hidden = torch.randn(1, 16, 3, 16, 20, generator=gen), torch.randn(1, 240, attn.inner_dim, generator=gen)
    masks, attend = [], wan.attention.processor.attend
    monkeypatch.setattr(wan.attention.processor, "attend",
                        lambda *a, **k: masks.append(result := attend(*a, **k)) or result)
    handle = patch_transformer(transformer, config)
    try:
        handle.state.start_forward(latents, (1, 2, 2), torch.tensor([700.0]))
        with torch.no_grad():
            out = attn(hidden, rotary_emb=transformer.rope(latents))  # tiled tables: the patched rope.forward's
            rotary = type(transformer.rope).forward(transformer.rope, latents)
            layout = handle.state.layout
            tiled = masks[0].mask.repeat_interleave(64, -1).repeat_interleave(64, -2)
            raster = layout.on("cpu", "tile_index")
            token = tiled[..., raster, :][..., raster]
            reference = handle.processors[2](attn, hidden, attention_mask=token, rotary_emb=rotary)
    finally:
        unpatch(transformer)
    assert len(masks) == 1 and 0.1 < token.float().mean() < 0.9
    assert handle.state.records.densities[0][1] == 2  # the VACE block's layer
    torch.testing.assert_close(out, reference, atol=2e-5, rtol=1e-4)


def run_cli(*args) -> int:
    return wan.generate.cli.main([str(a) for a in args])


@pytest.fixture
def controls(tmp_path):
    """A 5-frame control video, a mask that generates its centre, another mask and a 4-frame video, as .npy frames
    written by the project's own writer (what `--output NAME.npy` writes); and an image, first.png."""
    video = np.random.RandomState(0).rand(5, 40, 48, 3).astype(np.float32)
    centre, other = np.zeros((5, 40, 48, 3), np.float32), np.zeros((5, 40, 48, 3), np.float32)
    centre[:, 10:30, 12:36], other[:, :, :24] = 1, 1
    Image.fromarray((video[0] * 255).astype(np.uint8)).save(tmp_path / "first.png")
    return {name: write_video(frames, tmp_path / f"{name}.npy")
            for name, frames in (("video", video), ("mask", centre), ("other", other), ("short", video[:4]))}


def test_generate_with_a_control_video_and_mask(vace_model, controls, tmp_path, capsys):
    """NABLA on every self-attention, --stats counting the three of each pass; the controls reach the pipeline
    (another mask, another video: at threshold 1.0, NABLA's is the stock video, as tested above)."""
    config = tmp_path / "c.yaml"
    config.write_text("sparsity: {mode: nabla, threshold: 1.0}\n")
    out = {name: tmp_path / f"{name}-out.npy" for name in ("nabla", "other")}
    common = ["--model", vace_model, "--prompt", "a cat", *SMALL, "--video", controls["video"]]
    assert run_cli(*common, "--mask", controls["mask"], "--config", config, "--stats", tmp_path / "s.json",
                   "--output", out["nabla"]) == 0
    assert run_cli(*common, "--mask", controls["other"], "--output", out["other"]) == 0
    assert "mean mask density: 1.000" in capsys.readouterr().out
    nabla, other = (np.load(path) for path in out.values())
    assert nabla.shape == (5, 32, 32, 3) and np.abs(nabla - other).max() > 1e-2
    stats = json.loads((tmp_path / "s.json").read_text())
    assert (stats["blocks"], stats["computed_steps"], stats["layers"]) == (3, [0, 1], [0, 1, 2])


@pytest.mark.parametrize("model, flags, error", [
    ("vace", ["--video", "{tmp}/none.mp4"],
     ("--video: {tmp}/none.mp4 does not exist; give a video file (MP4, ...) or its frames in a .npy, [F, H, W, 3] "
     "or [F, H, W]")),
    ("vace", ["--video", "{tmp}/short.npy"],
     ("--video: {tmp}/short.npy has 4 frames and the video 5 (--frames); give a video of 5 frames, or as many "
     "--frames as it has (4k+1)")),
    ("vace", ["--video", "{tmp}/video.npy", "--mask", "{tmp}/short.npy"],
     ("--mask: {tmp}/short.npy has 4 frames and the video 5 (--frames); give a video of 5 frames, or as many "
     "--frames as it has (4k+1)")),
    ("vace", ["--mask", "{tmp}/mask.npy"], ("mask: a mask marks where to generate in a control video; give --video "
     "PATH too")),
    ("vace", ["--image", "{tmp}/first.png"], ("--image/--last-image: not supported for {vace}, a Wan VACE model; give "
     "the frames to keep as --video with a --mask, or the look as --reference-image")),
    ("tiny", ["--video", "{tmp}/video.npy"], ("--video: {tiny} is a WanPipeline model and takes no control inputs; "
     "they need a Wan VACE model (WanVACEPipeline), such as Wan-AI/Wan2.1-VACE-14B-diffusers")),
], ids=["missing", "video frames", "mask frames", "mask alone", "image", "not vace"])
def test_bad_controls_are_refused_before_loading(model, flags, error, vace_model, tiny_model, controls, tmp_path,
                                                 monkeypatch, capsys):
    monkeypatch.setattr(wan.models.loading, "load_pipeline", lambda *a, **k: pytest.fail("the model loaded"))
    models = {"vace": vace_model, "tiny": tiny_model}
    flags = [flag.format(tmp=tmp_path) for flag in flags]
    assert run_cli("--model", models[model], "--prompt", "a cat", *SMALL, *flags, "--output", tmp_path / "v.npy") == 2
    assert capsys.readouterr().err == "error: " + error.format(tmp=tmp_path, **models) + "\n"


def test_the_random_vace_14b_is_the_published_architecture():
    """On the meta device (shapes only): what bench_e2e --arch vace-14B builds at real size."""
    pipe = build_random_pipeline("vace-14B", device="meta")
    config = pipe.transformer.config
    assert (type(pipe).__name__, config.num_layers, config.vace_layers, config.vace_in_channels) == (
        "WanVACEPipeline", 40, [0, 5, 10, 15, 20, 25, 30, 35], 96)
    assert len(pipe.transformer.vace_blocks) == 8 and pipe.transformer.dtype == torch.bfloat16
    assert ModelSpec.from_pipeline(pipe, ARCHS["vace-14B"].title) == ARCHS["vace-14B"].spec
