"""Build a tiny, randomly initialised Wan pipeline in diffusers layout (offline demo/tests).

    nabla-wan make-tiny-model OUT_DIR [--seed 0] [--family wan2.1-t2v]   (the command: wan/models/make_tiny.py)

Families: `wan2.1-t2v` (one transformer), `wan2.2-a14b` (Wan2.2 A14B's layout: a high-noise `transformer` and a
low-noise `transformer_2` of their own random weights, switched at `boundary_ratio` 0.875 as the published model is),
`wan2.1-i2v` (Wan2.1 I2V-14B's layout: a WanImageToVideoPipeline with a CLIP image encoder, whose last-but-one hidden
states the transformer's cross-attention reads beside the text, and 16 noise + 20 condition input channels) and
`wan2.1-flf2v` (Wan2.1 FLF2V-14B's: the same with position embeddings for two images, the first and the last frame),
`wan2.2-i2v-a14b` (Wan2.2 I2V-A14B's: a WanImageToVideoPipeline of two 36-channel experts switched at 0.9, no image
encoder: its transformers read the VAE's latents of the frames only) and `wan2.2-ti2v` (Wan2.2 TI2V-5B's: a WanPipeline with `expand_timesteps`, so per-token timesteps, and a 48-channel
VAE that patchifies 2x2 pixels before 8x downsampling: 16x spatial compression, 32 pixels a token), and `wan2.1-vace`
(Wan2.1 VACE's: a WanVACEPipeline whose transformer runs one VACE block on the control latents, 96 channels: the
video's latents outside and inside the mask and the 8x8 pixels of the mask under each latent, and adds its hint after
main block 0), and `wan2.2-animate` (Wan2.2 Animate's: a WanAnimatePipeline with a CLIP image encoder, 2 blocks each
followed by a face adapter, and a motion encoder of 16-pixel faces).

The weights are noise, so videos are noise too; the point is exercising the full pipeline
(tokenizer -> UMT5 -> transformer -> UniPC -> VAE) with real shapes in well under a second on a CPU.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from diffusers import (
    AutoencoderKLWan,
    UniPCMultistepScheduler,
    WanAnimateTransformer3DModel,
    WanPipeline,
    WanTransformer3DModel,
    WanVACEPipeline,
    WanVACETransformer3DModel,
)
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import CLIPVisionConfig, CLIPVisionModel, T5TokenizerFast, UMT5Config, UMT5EncoderModel

from wan.models.spec import ANIMATE_PIPELINE, EXPERT_NAMES, I2V_PIPELINE, T2V_PIPELINE, VACE_PIPELINE, ModelSpec

if TYPE_CHECKING:
    from diffusers import WanImageToVideoPipeline

TEXT_DIM = 32
#: the tiny CLIP's width (Wan2.1 I2V's ViT-H: 1280) and its input side: 32-pixel images in 16-pixel patches, 4 + 1 tokens
IMAGE_DIM, IMAGE_SIDE, IMAGE_PATCH = 16, 32, 16
IMAGE_TOKENS = (IMAGE_SIDE // IMAGE_PATCH) ** 2 + 1

SENTENCES = [
    f"{who} {what} {where}"
    for who in ("a cat", "a dog", "two birds", "an old man", "a red car", "a small robot")
    for what in ("is playing piano", "runs quickly", "flies slowly", "jumps over a fence", "sleeps", "dances")
    for where in ("in a sunny room", "on the beach at sunset", "over a frozen lake", "in the city at night")
]


def build_tokenizer() -> T5TokenizerFast:
    """A T5-style Unigram tokenizer trained here (no hub): ids 0/1/2 are <pad>/</s>/<unk> as in T5."""
    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace()  # same "▁word" pieces the T5 tokenizer pipeline produces
    trainer = trainers.UnigramTrainer(
        vocab_size=256, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>", show_progress=False
    )
    tok.train_from_iterator(SENTENCES, trainer)
    trained = json.loads(tok.to_str())["model"]["vocab"]  # [[piece, log-prob]], the 3 specials first
    # The trainer's float sums (hence the order of ties) vary run to run: round and sort for stable ids.
    pieces = sorted(((p, round(s, 6)) for p, s in trained[3:]), key=lambda ps: (-ps[1], ps[0]))
    vocab = [(p, s) for p, s in trained[:3]] + pieces
    # extra_ids=0: no 100 <extra_id_*> sentinels, so the vocab (and the embedding table) stays tiny.
    return T5TokenizerFast(vocab=vocab, extra_ids=0)


#: Wan2.2 A14B's switch from the high-noise to the low-noise expert (its model_index.json), and I2V-A14B's
A14B_BOUNDARY_RATIO, I2V_A14B_BOUNDARY_RATIO = 0.875, 0.9
#: Wan2.2 TI2V-5B's latent channels (Wan2.1's VAE: 16)
TI2V_LATENT_CHANNELS = 48
#: the tiny families (the --family choices): the facts of the model each stands for, which the builder follows and
#: which a saved one reads back (its `model` is what the family is, for messages)
TINY = {
    "wan2.1-t2v": ModelSpec("Wan2.1 T2V", T2V_PIPELINE),
    "wan2.2-a14b": ModelSpec("Wan2.2 T2V-A14B-style two-expert", T2V_PIPELINE, EXPERT_NAMES, A14B_BOUNDARY_RATIO),
    "wan2.1-i2v": ModelSpec("Wan2.1 I2V", I2V_PIPELINE, clip_images=1),
    "wan2.1-flf2v": ModelSpec("Wan2.1 FLF2V (first and last frame)", I2V_PIPELINE, clip_images=2),
    "wan2.2-ti2v": ModelSpec("Wan2.2 TI2V-5B-style (48-channel 16x VAE, per-token timesteps)", T2V_PIPELINE,
                             ti2v=True, vae_scale=16),
    "wan2.2-i2v-a14b": ModelSpec("Wan2.2 I2V-A14B-style two-expert image-to-video", I2V_PIPELINE, EXPERT_NAMES,
                                 I2V_A14B_BOUNDARY_RATIO),
    "wan2.1-vace": ModelSpec("Wan2.1 VACE (video, mask and reference images as controls)", VACE_PIPELINE),
    "wan2.2-animate": ModelSpec("Wan2.2 Animate (a character image moved by pose and face videos)", ANIMATE_PIPELINE,
                                clip_images=1, face_size=16),
}
#: a VACE transformer's control channels over the VAE's 16: the latents outside and inside the mask (16 each) and
#: the mask's 8x8 pixels under each latent (64), as WanVACEPipeline stacks them
VACE_IN_CHANNELS = 96
#: name -> what it is
FAMILIES = {name: spec.model for name, spec in TINY.items()}


def _tiny_transformer(spec: ModelSpec = TINY["wan2.1-t2v"]) -> WanTransformer3DModel:
    # head_dim 12 splits into t/h/w RoPE dims of 4/4/4; rope_max_seq_len bounds each grid axis.
    extra = {}
    if spec.image_condition:  # the latents plus the frame mask and condition channels (4 + 16)
        extra = {"in_channels": 36}
    if spec.clip_images:  # as in Wan2.1 I2V: the CLIP tokens projected to the width (attn2's add_k_proj /
        # add_v_proj); FLF2V: position embeddings of 2 images
        extra.update(image_dim=IMAGE_DIM, added_kv_proj_dim=24,
                     pos_embed_seq_len=2 * IMAGE_TOKENS if spec.clip_images == 2 else None)
    if spec.ti2v:
        extra = {"in_channels": TI2V_LATENT_CHANNELS, "out_channels": TI2V_LATENT_CHANNELS}
    model = WanTransformer3DModel
    if spec.animate:  # 16 noise + 20 reference channels, as Wan2.1 I2V; a face adapter after every block; the motion
        # encoder's convolutions halve 16-pixel faces to 4
        model, extra = WanAnimateTransformer3DModel, {
            **extra, "in_channels": 36, "motion_encoder_size": spec.face_size,
            "motion_encoder_channel_sizes": {"16": 8, "8": 8, "4": 8}, "motion_style_dim": 8, "motion_dim": 4, "motion_encoder_dim": 8, "face_encoder_hidden_dim": 8,
            "face_encoder_num_heads": 2, "inject_face_latents_blocks": 1}
    if spec.vace:  # one VACE block (fewer than the main blocks, as in the real models), hinting main block 0
        model, extra = WanVACETransformer3DModel, {"vace_layers": [0], "vace_in_channels": VACE_IN_CHANNELS}
    return model(**{
        "patch_size": spec.patch_size, "num_attention_heads": 2, "attention_head_dim": 12, "in_channels": 16,
        "out_channels": 16, "text_dim": TEXT_DIM, "freq_dim": 32, "ffn_dim": 32, "num_layers": 2,
        "rope_max_seq_len": 1024, **extra}).eval()


def _tiny_image_encoder() -> dict:
    """A tiny CLIP vision tower and its processor (Wan2.1 I2V's image_encoder and image_processor)."""
    from transformers import CLIPImageProcessor  # here: see build_tiny_pipeline

    encoder = CLIPVisionModel(CLIPVisionConfig(
        hidden_size=IMAGE_DIM, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        image_size=IMAGE_SIDE, patch_size=IMAGE_PATCH, projection_dim=IMAGE_DIM)).eval()
    processor = CLIPImageProcessor(size={"shortest_edge": IMAGE_SIDE}, crop_size={"height": IMAGE_SIDE, "width": IMAGE_SIDE})
    return {"image_encoder": encoder, "image_processor": processor}


def _tiny_vae(spec: ModelSpec) -> AutoencoderKLWan:
    # 3 downsamples -> 8x spatial; two temporal ones -> 4x: 9 frames become 1 + 8 / 4 = 3 latent frames.
    if not spec.ti2v:
        return AutoencoderKLWan(
            base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]
        )
    # Wan2.2's VAE (diffusers' conversion of it): residual blocks, 2x2 pixel patches (12 channels in and out) before
    # the 8x downsampling, so 16x spatial; latents normalised by mean 0, std 1 here (the real ones are measured)
    return AutoencoderKLWan(
        base_dim=4, z_dim=TI2V_LATENT_CHANNELS, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
        temperal_downsample=[False, True, True], is_residual=True, in_channels=12, out_channels=12, patch_size=2,
        scale_factor_spatial=spec.vae_scale, latents_mean=[0.0] * TI2V_LATENT_CHANNELS, latents_std=[1.0] * TI2V_LATENT_CHANNELS,
    )


def build_tiny_pipeline(seed: int = 0, family: str = "wan2.1-t2v"
                        ) -> WanPipeline | WanImageToVideoPipeline | WanVACEPipeline:
    """A complete Wan pipeline of `family` (TINY) with tiny random weights; identical for identical seeds."""
    if family not in TINY:
        raise ValueError(f"family {family!r} is not allowed; allowed: {', '.join(TINY)}")
    spec = TINY[family]
    tokenizer = build_tokenizer()
    with torch.random.fork_rng():  # deterministic weights without disturbing the caller's RNG
        torch.manual_seed(seed)
        text_encoder = UMT5EncoderModel(
            UMT5Config(
                vocab_size=len(tokenizer), d_model=TEXT_DIM, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                relative_attention_num_buckets=8, pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=tokenizer.pad_token_id,
            )
        )
        transformer = _tiny_transformer(spec)
        vae = _tiny_vae(spec)
        extra = {}  # drawn last: the Wan2.1 T2V family's weights stay those of the same seed
        if len(spec.experts) > 1:
            extra = {"transformer_2": _tiny_transformer(spec), "boundary_ratio": spec.boundary_ratio}
        elif spec.clip_images:
            extra = _tiny_image_encoder()
    if spec.ti2v:  # as Wan2.2 TI2V-5B's model_index.json: per-token timesteps, one transformer
        extra["expand_timesteps"] = True
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    pipeline = WanVACEPipeline if spec.vace else WanPipeline
    if spec.animate:  # imported only here, as the I2V class below
        from diffusers import WanAnimatePipeline as pipeline
    if spec.pipeline == I2V_PIPELINE:
        # imported only here: without torchvision, transformers 5 warns (on importing CLIPImageProcessor, as diffusers'
        # I2V pipeline module does) that it falls back to its PIL processor, which text-to-video users need not read
        from diffusers import WanImageToVideoPipeline as pipeline
    return pipeline(
        tokenizer=tokenizer, text_encoder=text_encoder.eval(), vae=vae.eval(), scheduler=scheduler,
        transformer=transformer, **extra,
    )


def save_tiny_model(out_dir: str | Path, seed: int = 0, family: str = "wan2.1-t2v") -> Path:
    """Save `build_tiny_pipeline(seed, family)` to `out_dir` in diffusers layout (what `--model` and from_pretrained
    read)."""
    out = Path(out_dir)
    build_tiny_pipeline(seed, family).save_pretrained(out)
    return out


#: the demo clips' captions, from the tiny tokenizer's sentences
CLIP_CAPTIONS = ("a cat is playing piano in a sunny room", "a dog runs quickly on the beach at sunset",
                  "two birds flies slowly over a frozen lake", "a small robot dances in the city at night")


def write_demo_clips(folder: str | Path, count: int = 4, frames: int = 17, size: tuple[int, int] = (48, 64)) -> Path:
    """`count` short MP4 clips (moving colour gradients, 8 fps) with a .txt caption each: data to try fine-tuning on
    (`configs/finetune-tiny.yaml`)."""
    import imageio.v2 as imageio
    import numpy as np

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    y, x = np.mgrid[:size[0], :size[1]]
    for index in range(count):
        video = [np.stack([(x * 5 + t * 20 * (index + 1)) % 256, (y * 6 + index * 60) % 256, (x + y + t * 9) % 256],
                          -1).astype(np.uint8) for t in range(frames)]
        imageio.mimwrite(folder / f"clip{index}.mp4", video, fps=8, macro_block_size=8)
        (folder / f"clip{index}.txt").write_text(CLIP_CAPTIONS[index % len(CLIP_CAPTIONS)] + "\n")
    return folder
