"""Kandinsky 5 transformers at the published sizes with random weights (no download), for the GPU benchmarks
(scripts/bench_kandinsky5.py) and scripts/make_random_model.py (`--arch k5-lite | k5-pro`).

The transformer configs are the published ones (Lite: 2B, 32 visual blocks of width 1792; Pro: 19B, 60 of width
4096), as their 10s checkpoints set them: `attention_type: nabla` at their trained P with the STA window 11x3x3.
A saved pipeline keeps the text encoders' widths (Qwen2.5-VL's 3584, CLIP's 768: what the transformer reads) but
one layer each and the tiny offline tokenizers, and the HunyuanVideo VAE at its published size. Random weights give
random attention maps: a benchmark sets the density it measures at with `max_density`.
"""

from __future__ import annotations

import dataclasses

import torch
from diffusers import AutoencoderKLHunyuanVideo, FlowMatchEulerDiscreteScheduler, Kandinsky5Transformer3DModel
from transformers import CLIPTextConfig, CLIPTextModel

from wan.models import tiny_kandinsky5 as tiny

_COMMON = {"in_visual_dim": 16, "out_visual_dim": 16, "in_text_dim": 3584, "in_text_dim2": 768, "time_dim": 512,
           "patch_size": (1, 2, 2), "visual_cond": True}


@dataclasses.dataclass(frozen=True)
class Arch:
    """A published Kandinsky 5 model, as far as a random-weight copy of it needs."""

    title: str
    #: transformer/config.json beyond _COMMON
    transformer: dict
    #: the video its benchmark defaults to: height, width, frames
    size: tuple[int, int, int]


def _nabla(threshold: float) -> dict:
    return {**tiny.LITE_10S_ATTENTION, "attention_P": threshold}


ARCHS = {
    "k5-lite": Arch("Kandinsky 5 Lite T2V 10s (2B, NABLA P 0.9 + STA 11x3x3)",
                    {"model_dim": 1792, "ff_dim": 7168, "num_text_blocks": 2, "num_visual_blocks": 32,
                     "axes_dims": (16, 24, 24), **_nabla(0.9)}, (512, 768, 241)),
    "k5-pro": Arch("Kandinsky 5 Pro T2V 10s HD (19B, NABLA P 0.7 + STA 11x3x3)",
                   {"model_dim": 4096, "ff_dim": 16384, "num_text_blocks": 4, "num_visual_blocks": 60,
                    "axes_dims": (32, 48, 48), **_nabla(0.7)}, (768, 1280, 241)),
}


def transformer_config(arch: str) -> dict:
    """The transformer config of `arch` (ARCHS)."""
    return {**_COMMON, **ARCHS[arch].transformer}


def build_random_transformer(arch: str, device: str | torch.device, dtype: torch.dtype = torch.bfloat16,
                             seed: int = 0, layers: int | None = None) -> Kandinsky5Transformer3DModel:
    """The transformer of `arch` with random weights, built on `device` in `dtype` (Pro's 19B parameters would not
    fit a GPU in float32), its modulations drawn too (diffusers zero-initialises every gate); `layers`: that many
    visual blocks instead of the architecture's (a block's cost at the real widths)."""
    torch.manual_seed(seed)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    config = transformer_config(arch) if layers is None else {**transformer_config(arch), "num_visual_blocks": layers}
    try:
        with torch.device(device):
            transformer = Kandinsky5Transformer3DModel(**config)
    finally:
        torch.set_default_dtype(default)
    # as from_pretrained loads a checkpoint in `dtype` (its rule: a module named in _keep_in_fp32_modules stays
    # float32: the time embeddings and modulations), so that a benchmark runs the dtypes a user's model runs
    for name, module in transformer.named_modules():
        if any(part in name.split(".") for part in transformer._keep_in_fp32_modules):
            module.to(torch.float32)
    tiny.draw_modulations(transformer)
    return transformer.eval()


def build_random_pipeline(arch: str, device: str | torch.device, seed: int = 0) -> tiny.Kandinsky5T2VPipeline:
    """A Kandinsky5T2VPipeline around `build_random_transformer(arch)`: one-layer text encoders of the real widths
    with the tiny tokenizers, the HunyuanVideo VAE at its published size (float32)."""
    transformer = build_random_transformer(arch, device, seed=seed)
    qwen_tokenizer, clip_tokenizer = tiny.qwen_tokenizer(), tiny.clip_tokenizer()
    with torch.device(device):
        qwen = tiny.qwen_encoder(qwen_tokenizer, width=_COMMON["in_text_dim"])
        clip = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(clip_tokenizer), hidden_size=_COMMON["in_text_dim2"], intermediate_size=3072,
            num_attention_heads=12, num_hidden_layers=1, projection_dim=_COMMON["in_text_dim2"],
            bos_token_id=clip_tokenizer.bos_token_id, eos_token_id=clip_tokenizer.eos_token_id,
            pad_token_id=clip_tokenizer.pad_token_id)).eval()
        vae = AutoencoderKLHunyuanVideo(latent_channels=16).eval()  # the published VAE's config is diffusers' default
    return tiny.Kandinsky5T2VPipeline(transformer=transformer, vae=vae, text_encoder=qwen, tokenizer=qwen_tokenizer,
                                      text_encoder_2=clip, tokenizer_2=clip_tokenizer,
                                      scheduler=FlowMatchEulerDiscreteScheduler(shift=5.0))
