"""The random real-size model builders: Wan pipelines and transformers at the published sizes, with random weights
(no download), for the GPU benchmarks (scripts/bench_e2e.py, bench_parallel.py, bench_train.py) and
scripts/make_random_model.py, which saves one.

`ARCHS` names the architectures (Wan2.1 T2V 1.3B and 14B, Wan2.2 T2V-A14B, Wan2.2 TI2V-5B, Wan2.1 I2V-14B 480P,
Wan2.1 VACE-14B);
`build_random_pipeline(arch, device)` builds a whole pipeline, `build_random_transformer(arch, device)` one transformer.
Transformers, VAEs, schedulers and pipeline flags are the published ones (Wan-AI/*-Diffusers); the text encoder keeps
UMT5-XXL's width but few layers, and the tokenizer is the tiny offline one. Random weights give random attention
structure: a benchmark sets its density with `max_density`.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch
from diffusers import (
    AutoencoderKLWan,
    UniPCMultistepScheduler,
    WanPipeline,
    WanTransformer3DModel,
    WanVACEPipeline,
    WanVACETransformer3DModel,
)
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection, UMT5Config, UMT5EncoderModel

from wan.models.loading import keep_fp32_modules
from wan.models.spec import I2V_PIPELINE, ModelSpec
from wan.models.tiny import TINY, VACE_IN_CHANNELS, build_tokenizer

if TYPE_CHECKING:
    from diffusers import WanImageToVideoPipeline

COMMON = {
    "patch_size": (1, 2, 2), "attention_head_dim": 128, "in_channels": 16, "out_channels": 16, "text_dim": 4096, "freq_dim": 256,
    "cross_attn_norm": True, "qk_norm": "rms_norm_across_heads", "eps": 1e-6, "rope_max_seq_len": 1024,
}
_14B = {"num_attention_heads": 40, "ffn_dim": 13824, "num_layers": 40}

#: Wan2.2's VAE (Wan-AI/Wan2.2-TI2V-5B-Diffusers vae/config.json): residual blocks, 2x2 pixel patches, z_dim 48
WAN22_VAE = {
    "base_dim": 160, "decoder_base_dim": 256, "z_dim": 48, "is_residual": True, "in_channels": 12, "out_channels": 12,
    "patch_size": 2, "scale_factor_spatial": 16, "scale_factor_temporal": 4,
    "latents_mean": [
        -0.2289, -0.0052, -0.1323, -0.2339, -0.2799, 0.0174, 0.1838, 0.1557, -0.1382, 0.0542, 0.2813, 0.0891, 0.1570,
        -0.0098, 0.0375, -0.1825, -0.2246, -0.1207, -0.0698, 0.5109, 0.2665, -0.2108, -0.2158, 0.2502, -0.2055, -0.0322,
        0.1109, 0.1567, -0.0729, 0.0899, -0.2799, -0.1230, -0.0313, -0.1649, 0.0117, 0.0723, -0.2839, -0.2083, -0.0520,
        0.3748, 0.0152, 0.1957, 0.1433, -0.2944, 0.3573, -0.0548, -0.1681, -0.0667,
    ],
    "latents_std": [
        0.4765, 1.0364, 0.4514, 1.1677, 0.5313, 0.4990, 0.4818, 0.5013, 0.8158, 1.0344, 0.5894, 1.0901, 0.6885, 0.6165,
        0.8454, 0.4978, 0.5759, 0.3523, 0.7135, 0.6804, 0.5833, 1.4146, 0.8986, 0.5659, 0.7069, 0.5338, 0.4889, 0.4917,
        0.4069, 0.4999, 0.6866, 0.4093, 0.5709, 0.6065, 0.6415, 0.4944, 0.5726, 1.2042, 0.5458, 1.6887, 0.3971, 1.0600,
        0.3943, 0.5537, 0.5444, 0.4089, 0.7468, 0.7744,
    ],
}

#: ViT-H/14 (laion/CLIP-ViT-H-14-laion2B-s32B-b79K), Wan2.1 I2V's image encoder; its processor is CLIPImageProcessor's
#: defaults (224 pixels, OpenAI's mean and std)
CLIP_VIT_H = {"hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32, "num_attention_heads": 16,
              "patch_size": 14, "image_size": 224, "projection_dim": 1024, "hidden_act": "gelu"}


@dataclasses.dataclass(frozen=True)
class Arch:
    """A published Wan model, as far as a random-weight copy of it needs."""

    title: str
    #: transformer/config.json beyond COMMON (each expert's, for two)
    transformer: dict
    #: scheduler_config.json's
    flow_shift: float
    #: the video a benchmark defaults to: height, width, frames
    size: tuple[int, int, int]
    #: wan.models.tiny's family of the same layout (bench_e2e --smoke), whose spec is this one's
    tiny_family: str
    #: vae/config.json (empty: diffusers' defaults, Wan2.1's VAE)
    vae: dict = dataclasses.field(default_factory=dict)

    @property
    def spec(self) -> ModelSpec:
        """The model's facts (pipeline class, experts, boundary, TI2V, image tokens, VAE scale): its tiny family's."""
        return dataclasses.replace(TINY[self.tiny_family], model=self.title)

    @property
    def flags(self) -> dict:
        """model_index.json's pipeline flags (boundary_ratio, expand_timesteps)."""
        spec = self.spec
        return {**({"boundary_ratio": spec.boundary_ratio} if len(spec.experts) > 1 else {}),
                **({"expand_timesteps": True} if spec.ti2v else {})}


ARCHS = {
    "1.3B": Arch("Wan2.1 T2V-1.3B", {"num_attention_heads": 12, "ffn_dim": 8960, "num_layers": 30}, 3.0,
                 (720, 1280, 81), "wan2.1-t2v"),
    "14B": Arch("Wan2.1 T2V-14B", _14B, 5.0, (720, 1280, 81), "wan2.1-t2v"),
    "a14b": Arch("Wan2.2 T2V-A14B", _14B, 3.0, (720, 1280, 81), "wan2.2-a14b"),
    "ti2v-5b": Arch("Wan2.2 TI2V-5B", {"num_attention_heads": 24, "ffn_dim": 14336, "num_layers": 30, "in_channels": 48,
                                       "out_channels": 48}, 5.0, (704, 1280, 121), "wan2.2-ti2v", vae=WAN22_VAE),
    "i2v-14b": Arch("Wan2.1 I2V-14B 480P", {**_14B, "in_channels": 36, "image_dim": 1280, "added_kv_proj_dim": 5120},
                    3.0, (480, 832, 81), "wan2.1-i2v"),
    # Wan-AI/Wan2.1-VACE-14B-diffusers: a VACE block beside every fifth of the 40 main blocks
    "vace-14B": Arch("Wan2.1 VACE-14B", {**_14B, "vace_layers": list(range(0, 40, 5)),
                                         "vace_in_channels": VACE_IN_CHANNELS}, 5.0, (720, 1280, 81), "wan2.1-vace"),
}


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """New parameters in `dtype`: a 14B expert initialised in bf16 never holds its 57 GB float32 copy."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def build_random_transformer(arch: str, device: str = "cuda", dtype: torch.dtype = torch.bfloat16,
                             num_layers: int | None = None) -> WanTransformer3DModel | WanVACETransformer3DModel:
    """`arch`'s transformer with random weights; `num_layers` blocks instead of its own where given."""
    layers = {} if num_layers is None else {"num_layers": num_layers}
    model = WanVACETransformer3DModel if ARCHS[arch].spec.vace else WanTransformer3DModel
    with torch.device(device), default_dtype(dtype):  # initialise on the GPU: seconds instead of minutes on the CPU
        model = model(**{**COMMON, **ARCHS[arch].transformer, **layers}).eval()
    return keep_fp32_modules(model)  # as from_pretrained does


def random_image_encoder(device: str) -> dict:
    """Wan2.1 I2V's image_encoder (float32, as generate.py runs it) and image_processor, random and of ViT-H's size."""
    # imported here: without torchvision, importing it prints a warning (as in wan.models.tiny)
    from transformers import CLIPImageProcessor

    with torch.device(device):
        encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(**CLIP_VIT_H)).float().eval()
    return {"image_encoder": encoder, "image_processor": CLIPImageProcessor()}


def build_random_pipeline(
    arch: str, device: str = "cuda", dtype: torch.dtype = torch.bfloat16, text_layers: int = 2, seed: int = 0
) -> WanPipeline | WanImageToVideoPipeline | WanVACEPipeline:
    """`arch`'s whole pipeline with random weights (seeded by `seed`), its transformers in `dtype`, built on `device`;
    the text encoder has `text_layers` layers."""
    if arch not in ARCHS:
        raise ValueError(f"arch: {arch!r} is not known; allowed: {', '.join(ARCHS)}")
    published, spec = ARCHS[arch], ARCHS[arch].spec
    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    # one expert at a time on the device, each in `dtype` from the start: A14B's two take 57 GB, never more
    components = {name: build_random_transformer(arch, device, dtype) for name in spec.experts}
    if spec.image_embeds:
        components.update(random_image_encoder(device))
    with torch.device(device), default_dtype(dtype):
        text_encoder = UMT5EncoderModel(
            UMT5Config(vocab_size=len(tokenizer), d_model=4096, d_kv=64, d_ff=10240, num_layers=text_layers,
                       num_heads=64, feed_forward_proj="gated-gelu", pad_token_id=tokenizer.pad_token_id,
                       eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=tokenizer.pad_token_id)
        )
    with torch.device(device):
        vae = AutoencoderKLWan(**published.vae).float()
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                        flow_shift=published.flow_shift)
    pipeline = WanVACEPipeline if spec.vace else WanPipeline
    if spec.pipeline == I2V_PIPELINE:
        from diffusers import WanImageToVideoPipeline as pipeline
    return pipeline(tokenizer=tokenizer, text_encoder=text_encoder.eval(), vae=vae.eval(), scheduler=scheduler,
                    **components, **published.flags)
