"""Offline loading of a tiny Wan2.1 pipeline, and the errors for missing models."""


import numpy as np
import pytest
import torch
from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel
from transformers import T5TokenizerFast, UMT5EncoderModel

from wan.models.loading import ModelNotFoundError, load_pipeline
from wan.models.tiny import save_tiny_model


def test_tiny_model_is_deterministic(tiny_model, tmp_path):
    other = save_tiny_model(tmp_path / "again", seed=0)
    for part in ("transformer/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
                 "text_encoder/model.safetensors", "tokenizer/tokenizer.json"):
        assert (tiny_model / part).read_bytes() == (other / part).read_bytes(), part


def test_load_and_generate(tiny_model):
    pipe = load_pipeline(str(tiny_model), device="cpu")
    assert isinstance(pipe, WanPipeline)
    assert isinstance(pipe.tokenizer, T5TokenizerFast)
    assert pipe.tokenizer.pad_token == "<pad>" and pipe.tokenizer.eos_token == "</s>"
    assert isinstance(pipe.text_encoder, UMT5EncoderModel)
    assert pipe.text_encoder.config.vocab_size == len(pipe.tokenizer)
    assert isinstance(pipe.vae, AutoencoderKLWan)
    assert isinstance(pipe.transformer, WanTransformer3DModel)
    assert isinstance(pipe.scheduler, UniPCMultistepScheduler)
    for part in (pipe.text_encoder, pipe.vae, pipe.transformer):
        assert part.dtype == torch.float32  # CPU default

    frames = pipe(prompt="a cat", num_inference_steps=2, height=64, width=64, num_frames=9,
                  guidance_scale=5.0, output_type="np").frames
    assert frames.shape == (1, 9, 64, 64, 3)
    assert np.isfinite(frames).all()


def test_vae_stays_float32(tiny_model):
    pipe = load_pipeline(str(tiny_model), device="cpu", dtype=torch.bfloat16)
    assert pipe.transformer.dtype == torch.bfloat16 and pipe.text_encoder.dtype == torch.bfloat16
    assert pipe.vae.dtype == torch.float32


@pytest.mark.parametrize("kind", ["missing", "not_a_pipeline"])
def test_bad_local_folder(tmp_path, kind):
    path = tmp_path / "nope"
    if kind == "not_a_pipeline":
        path.mkdir()
    with pytest.raises(ModelNotFoundError) as info:
        load_pipeline(str(path), device="cpu")
    msg = str(info.value)
    assert str(path) in msg and "\n" not in msg
    assert isinstance(info.value, ValueError)


def test_unknown_hub_id():
    with pytest.raises(ModelNotFoundError) as info:
        load_pipeline("nobody/does-not-exist", device="cpu")
    msg = str(info.value)
    assert msg.startswith("could not load hub model 'nobody/does-not-exist': HF_HUB_OFFLINE is set and the model "
                          "is not in the local Hugging Face cache; get weights with `hf download ") and "\n" not in msg
    assert isinstance(info.value.__cause__, OSError)  # the hub error is kept as the cause
