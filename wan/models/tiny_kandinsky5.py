"""Tiny, randomly initialised Kandinsky 5 pipelines in diffusers layout (offline demo and tests), as wan/models/tiny.py
builds Wan's.

    nabla-wan make-tiny-model OUT_DIR --family kandinsky5-lite | kandinsky5-lite-i2v

The transformer has Lite 10s's layout in miniature (`visual_cond` on, `attention_type: nabla` with its trained P 0.9
and STA window 11x3x3); the text encoders are a tiny random Qwen2.5-VL and a tiny random CLIP text model, the VAE a
tiny HunyuanVideo VAE (8x spatial, 4x temporal). The weights are noise: the point is the full pipeline with real
shapes, loaded by the same code as a user's checkpoint.

The `tokenizer` is Qwen2.5-VL's tokenizer itself (a byte-level BPE trained here), not the Qwen2VLProcessor the
published checkpoints hold: the pipelines call it with text only, and that processor cannot be built without
torchvision (its video processor), which a CPU install of this project need not have.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from diffusers import (
    AutoencoderKLHunyuanVideo,
    FlowMatchEulerDiscreteScheduler,
    Kandinsky5I2VPipeline,
    Kandinsky5T2VPipeline,
    Kandinsky5Transformer3DModel,
)
from diffusers.models.transformers.transformer_kandinsky import Kandinsky5Modulation
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTokenizer,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2TokenizerFast,
)

from wan.models.tiny import SENTENCES

#: the tiny Qwen2.5-VL's and CLIP's widths (the transformer's in_text_dim and in_text_dim2)
QWEN_DIM, CLIP_DIM = 16, 32
#: Lite 10s's attention config (its transformer/config.json)
LITE_10S_ATTENTION = {"attention_type": "nabla", "attention_P": 0.9, "attention_wT": 11, "attention_wH": 3,
                      "attention_wW": 3, "attention_add_sta": True, "attention_method": "topcdf"}
#: --family name -> (what it stands for, the pipeline class)
TINY = {
    "kandinsky5-lite": ("Kandinsky 5 Lite T2V 10s-style (NABLA-trained: P 0.9, STA 11x3x3)", Kandinsky5T2VPipeline),
    "kandinsky5-lite-i2v": ("Kandinsky 5 I2V-style (NABLA-trained: P 0.9, STA 11x3x3)", Kandinsky5I2VPipeline),
}


def tiny_transformer(visual_cond: bool = False, attention: dict[str, Any] | None = None) -> Kandinsky5Transformer3DModel:
    """A tiny Kandinsky 5 transformer: 4 heads of 8 (rotary 4/2/2 over frames/rows/columns), 2 visual blocks.

    diffusers zero-initialises the modulations (every block's gates): they are drawn here instead, or attention
    would add nothing to the stream and any attention would give the stock output."""
    attention = LITE_10S_ATTENTION if attention is None else attention
    transformer = Kandinsky5Transformer3DModel(
        in_visual_dim=4, in_text_dim=QWEN_DIM, in_text_dim2=CLIP_DIM, time_dim=16, out_visual_dim=4,
        patch_size=(1, 2, 2), model_dim=32, ff_dim=64, num_text_blocks=1, num_visual_blocks=2, axes_dims=(4, 2, 2),
        visual_cond=visual_cond, **attention)
    draw_modulations(transformer)
    return transformer.eval()


def draw_modulations(transformer: Kandinsky5Transformer3DModel, std: float = 0.3) -> None:
    """Draw the modulations' weights, which diffusers zero-initialises (every block's shifts, scales and gates)."""
    with torch.no_grad():
        for module in transformer.modules():
            if isinstance(module, Kandinsky5Modulation):
                module.out_layer.weight.normal_(std=std / module.out_layer.in_features ** 0.5 * 4)
                module.out_layer.bias.normal_(std=std)


#: Qwen2's special tokens, the vision ones included (the encoder's config names their ids)
_QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>", "<|video_pad|>"]


def qwen_tokenizer() -> Qwen2TokenizerFast:
    """A byte-level BPE of few merges, trained here: the pipeline's prompt template (its first 128 tokens are
    dropped from the embeddings) stays hundreds of tokens long, as with the real vocabulary."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(SENTENCES, trainers.BpeTrainer(
        vocab_size=300, special_tokens=_QWEN_SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    return Qwen2TokenizerFast(tokenizer_object=tokenizer, unk_token=None, bos_token=None, eos_token="<|endoftext|>",
                              pad_token="<|endoftext|>")


def clip_tokenizer() -> CLIPTokenizer:
    """CLIP's tokenizer over a character vocabulary (no merges): every byte-level character, alone and word-final."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    pieces = ["<|startoftext|>", "<|endoftext|>", *alphabet, *(c + "</w>" for c in alphabet)]
    return CLIPTokenizer(vocab={piece: i for i, piece in enumerate(pieces)}, merges=[])


def qwen_encoder(tokenizer: Qwen2TokenizerFast, width: int = QWEN_DIM) -> Qwen2_5_VLForConditionalGeneration:
    """A one-layer Qwen2.5-VL of hidden size `width` (the transformer's in_text_dim) for `tokenizer`: heads of 128
    channels where the width allows (the published model's), else two; its multimodal rotary sections split each
    head's half as the published [16, 24, 24] does (they must add up to it)."""
    ids = {name: tokenizer.convert_tokens_to_ids(f"<|{token}|>") for name, token in
           (("vision_start_token_id", "vision_start"), ("vision_end_token_id", "vision_end"),
            ("image_token_id", "image_pad"), ("video_token_id", "video_pad"))}
    heads = max(2, width // 128)
    half = width // heads // 2
    first = half // 4
    rest = half - first
    sections = [first, rest // 2, rest - rest // 2]
    ends = {"bos_token_id": tokenizer.convert_tokens_to_ids("<|endoftext|>"),
            "eos_token_id": tokenizer.convert_tokens_to_ids("<|im_end|>")}
    config = Qwen2_5_VLConfig(
        text_config={"hidden_size": width, "intermediate_size": 2 * width, "num_hidden_layers": 1,
                     "num_attention_heads": heads, "num_key_value_heads": heads, "vocab_size": len(tokenizer),
                     "rope_scaling": {"mrope_section": sections, "rope_type": "default", "type": "default"}, **ends},
        vision_config={"depth": 1, "hidden_size": 16, "intermediate_size": 16, "num_heads": 2,
                       "out_hidden_size": width},
        hidden_size=width, vocab_size=len(tokenizer), **ids, **ends)
    return Qwen2_5_VLForConditionalGeneration(config).eval()


def _clip_encoder(tokenizer: CLIPTokenizer) -> CLIPTextModel:
    return CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=CLIP_DIM, intermediate_size=37, num_attention_heads=4,
        num_hidden_layers=2, projection_dim=CLIP_DIM, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)).eval()


def _tiny_vae() -> AutoencoderKLHunyuanVideo:
    return AutoencoderKLHunyuanVideo(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8, 8, 8),
                                     layers_per_block=1, norm_num_groups=4, spatial_compression_ratio=8,
                                     temporal_compression_ratio=4).eval()


def build_tiny_pipeline(seed: int = 0, family: str = "kandinsky5-lite") -> Kandinsky5T2VPipeline:
    """A complete Kandinsky 5 pipeline of `family` (TINY) with tiny random weights; identical for identical seeds."""
    if family not in TINY:
        raise ValueError(f"family {family!r} is not allowed; allowed: {', '.join(TINY)}")
    tokenizer, tokenizer_2 = qwen_tokenizer(), clip_tokenizer()
    with torch.random.fork_rng():  # deterministic weights without disturbing the caller's RNG
        torch.manual_seed(seed)
        components = {"text_encoder": qwen_encoder(tokenizer), "text_encoder_2": _clip_encoder(tokenizer_2),
                      "transformer": tiny_transformer(visual_cond=True), "vae": _tiny_vae()}
    # Lite's scheduler: flow matching at shift 5
    return TINY[family][1](tokenizer=tokenizer, tokenizer_2=tokenizer_2,
                           scheduler=FlowMatchEulerDiscreteScheduler(shift=5.0), **components)


def save_tiny_model(out_dir: str | Path, seed: int = 0, family: str = "kandinsky5-lite") -> Path:
    """Save `build_tiny_pipeline(seed, family)` to `out_dir` in diffusers layout."""
    out = Path(out_dir)
    build_tiny_pipeline(seed, family).save_pretrained(out)
    return out
