"""Which Wan model a fine-tuning run trains, read from its configs (model_index.json, the transformer's config.json)
before any weights load, and the settings that only some of them take.

The objective is flow matching for each; what differs is what the transformer reads beside the noisy latents:
- Wan2.1 T2V: nothing; Wan2.2 T2V-A14B: the same, with two experts switched at `boundary_ratio` (`transformer` at
  timesteps >= boundary_ratio x 1000, `transformer_2` below);
- Wan2.1 I2V and Wan2.2 I2V-A14B (WanImageToVideoPipeline): the first frame's condition (4 mask channels + its
  latents) concatenated along channels, and Wan2.1's CLIP image tokens where the transformer has `image_dim`;
- Wan2.2 TI2V-5B (`expand_timesteps`): per-token timesteps; an image-conditioned sample's first latent frame is clean
  and its tokens carry timestep 0.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

from wan.settings import TI2V_PIXELS_PER_TOKEN
from wan.train_config import TrainingConfig, bad_value

T2V_PIPELINE, I2V_PIPELINE = "WanPipeline", "WanImageToVideoPipeline"
SUPPORTED = "Wan2.1 T2V, Wan2.1 I2V, Wan2.2 T2V-A14B, Wan2.2 I2V-A14B and Wan2.2 TI2V-5B"
#: a TI2V sample's chance of being image-conditioned unless training.first_frame_condition_prob says otherwise: the
#: model does text to video and image to video, and half of each keeps both
TI2V_FIRST_FRAME_PROB = 0.5


@dataclasses.dataclass(frozen=True)
class Family:
    name: str  # for messages, e.g. "Wan2.2 T2V-A14B"
    pipeline: str  # the diffusers pipeline class that runs it
    experts: tuple[str, ...]  # its transformers: ("transformer",) or ("transformer", "transformer_2")
    boundary_ratio: float | None = None
    expand_timesteps: bool = False  # per-token timesteps (TI2V)
    image_embeds: bool = False  # the transformer reads CLIP image tokens (`image_dim`: Wan2.1 I2V)
    patch_size: tuple[int, int, int] = (1, 2, 2)

    @property
    def image_condition(self) -> bool:
        """The noisy latents go in with the first frame's condition concatenated (WanImageToVideoPipeline's
        `torch.cat([latents, condition], dim=1)`; under expand_timesteps the condition replaces frame 0 instead)."""
        return self.pipeline == I2V_PIPELINE and not self.expand_timesteps

    def trained_experts(self, expert: str | None) -> tuple[str, ...]:
        """The transformers that `training.expert` trains (None or both: every one)."""
        if expert in (None, "both"):
            return self.experts
        return (self.experts[0 if expert == "high" else 1],)

    def timestep_range(self, expert: str) -> tuple[float, float] | None:
        """The timesteps [low, high) that `expert` runs at sampling time, so trains on; None: all of them."""
        if self.boundary_ratio is None:
            return None
        boundary = self.boundary_ratio * 1000  # the scheduler's num_train_timesteps, as WanPipeline computes it
        return (boundary, math.inf) if expert == "transformer" else (0.0, boundary)


#: the default where a family is not given (scripts/bench_train.py's batches): text to video of one transformer
T2V = Family("Wan2.1 T2V", T2V_PIPELINE, ("transformer",))


def family_of(index: Mapping[str, Any], transformer: Mapping[str, Any], model: str) -> Family:
    """The family of a pipeline whose model_index.json is `index` and transformer config `transformer`; a one-line
    ValueError naming what is supported for anything else."""
    pipeline = index.get("_class_name")
    two = (index.get("transformer_2") or [None])[0] is not None
    ratio, ti2v = index.get("boundary_ratio"), bool(index.get("expand_timesteps"))
    if pipeline not in (T2V_PIPELINE, I2V_PIPELINE):
        raise ValueError(f"model: {model} is a {pipeline}, which finetune.py does not train; supported: {SUPPORTED}")
    if transformer.get("pos_embed_seq_len") is not None:
        raise ValueError(f"model: {model} is Wan2.1 FLF2V (a first and a last frame), which finetune.py does not "
                         f"train; supported: {SUPPORTED}")
    if two and (ratio is None or ti2v):
        raise ValueError(f"model: {model} has two transformers with boundary_ratio {ratio} and expand_timesteps "
                         f"{ti2v}, which finetune.py does not train; supported: {SUPPORTED} (A14B: a boundary_ratio, "
                         "no expand_timesteps)")
    common = {"pipeline": pipeline, "experts": ("transformer", "transformer_2") if two else ("transformer",),
              "boundary_ratio": ratio if two else None, "patch_size": tuple(transformer.get("patch_size", (1, 2, 2))),
              "image_embeds": pipeline == I2V_PIPELINE and transformer.get("image_dim") is not None}
    if ti2v:
        return Family("Wan2.2 TI2V-5B", expand_timesteps=True, **common)
    kind = "I2V" if pipeline == I2V_PIPELINE else "T2V"
    return Family(f"Wan2.2 {kind}-A14B" if two else f"Wan2.1 {kind}", **common)


def read_family(model: str) -> Family:
    """The family of `model` (a local folder or a hub id) from its configs alone: no weights are read."""
    from diffusers import DiffusionPipeline, WanTransformer3DModel

    index = DiffusionPipeline.load_config(model)
    return family_of(index, WanTransformer3DModel.load_config(model, subfolder="transformer"), model)


def check_family_training(family: Family, training: TrainingConfig, model: str) -> None:
    """The `training:` keys that only some families take: one-line ValueError for the others."""
    if training.expert is not None and len(family.experts) == 1:
        bad_value("expert", training.expert, f"null for {model}, a {family.name} model of one transformer (high, low "
                  "or both choose the experts of Wan2.2 A14B)")
    if training.first_frame_condition_prob is not None and not family.expand_timesteps:
        bad_value("first_frame_condition_prob", training.first_frame_condition_prob,
                  f"null for {model}, a {family.name} model (it sets how often Wan2.2 TI2V-5B trains image to video)")
    if training.validation.every and (family.pipeline != T2V_PIPELINE or len(family.experts) > 1):
        bad_value("validation.every", training.validation.every, f"0 for {model}, a {family.name} model (validation "
                  "videos are sampled for one-transformer text-to-video models: Wan2.1 T2V, Wan2.2 TI2V-5B)")
    if family.expand_timesteps:
        for side in ("height", "width"):
            if getattr(training, side) % TI2V_PIXELS_PER_TOKEN:
                bad_value(side, getattr(training, side), f"a multiple of {TI2V_PIXELS_PER_TOKEN} for {model}, a "
                          f"{family.name} model (its 16x VAE, then 2x2 patches)")


def first_frame_prob(training: TrainingConfig) -> float:
    """How often a Wan2.2 TI2V-5B sample is trained image to video (its first latent frame the clean condition)."""
    prob = training.first_frame_condition_prob
    return TI2V_FIRST_FRAME_PROB if prob is None else float(prob)
