"""Wan2.2 Animate under NABLA through the API (`enable_nabla` on a WanAnimatePipeline): a tiny random checkpoint
saved in diffusers' layout and loaded as a user loads theirs; every block's self-attention patched, the face adapter
and cross-attention stock; threshold 1.0 the stock video; a sparse mask changes it. CPU, float32."""

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline, UniPCMultistepScheduler, WanAnimatePipeline, WanAnimateTransformer3DModel
from PIL import Image
from transformers import UMT5Config, UMT5EncoderModel

import wan.generate.cli
from nabla import SparsityConfig
from wan import disable_nabla, enable_nabla
from wan.attention.processor import NablaWanAttnProcessor
from wan.models import tiny

FRAMES, SIDE, FACE = 9, 32, 16  # one segment of 9 frames: 3 latent frames and the character's


def tiny_animate_pipeline() -> WanAnimatePipeline:
    """Wan2.2 Animate's layout at tiny size: the tiny Wan's text encoder, VAE and CLIP tower, 2 blocks, each followed
    by a face adapter, and a motion encoder of 16-pixel faces."""
    tokenizer = tiny.build_tokenizer()
    with torch.random.fork_rng():
        torch.manual_seed(0)
        text_encoder = UMT5EncoderModel(UMT5Config(
            vocab_size=len(tokenizer), d_model=tiny.TEXT_DIM, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
            relative_attention_num_buckets=8, pad_token_id=tokenizer.pad_token_id))
        transformer = WanAnimateTransformer3DModel(
            num_attention_heads=2, attention_head_dim=12, text_dim=tiny.TEXT_DIM, freq_dim=32, ffn_dim=32,
            num_layers=2, image_dim=tiny.IMAGE_DIM, added_kv_proj_dim=24, rope_max_seq_len=1024,
            motion_encoder_channel_sizes={"16": 8, "8": 8, "4": 8}, motion_encoder_size=FACE, motion_style_dim=8,
            motion_dim=4, motion_encoder_dim=8, face_encoder_hidden_dim=8, face_encoder_num_heads=2,
            inject_face_latents_blocks=1)
        vae = tiny._tiny_vae(tiny.TINY["wan2.1-t2v"])
        images = tiny._tiny_image_encoder()
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    return WanAnimatePipeline(tokenizer=tokenizer, text_encoder=text_encoder.eval(), vae=vae.eval(),
                              scheduler=scheduler, transformer=transformer.eval(), **images)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("animate")
    tiny_animate_pipeline().save_pretrained(path)
    return path


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


def test_generate_points_an_animate_checkpoint_to_the_api(folder, tmp_path, capsys):
    """Its pose, face and background videos are not generate's inputs: one line, exit 2, nothing written."""
    out = tmp_path / "v.npy"
    assert wan.generate.cli.main(["--model", str(folder), "--prompt", "a cat", "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is a WanAnimatePipeline" in err and "through wan.enable_nabla" in err
    assert not out.exists()
