"""Which Wan models fine-tuning takes, read from their configs (a ModelSpec) before any weights load, and the
settings that only some of them take.

The objective is flow matching for each; what differs is what the transformer reads beside the noisy latents:
- Wan2.1 T2V: nothing; Wan2.2 T2V-A14B: the same, with two experts switched at `boundary_ratio` (`transformer` at
  timesteps >= boundary_ratio x 1000, `transformer_2` below);
- Wan2.1 I2V and Wan2.2 I2V-A14B (WanImageToVideoPipeline): the first frame's condition (4 mask channels + its
  latents) concatenated along channels, and Wan2.1's CLIP image tokens where the transformer has `image_dim`;
- Wan2.2 TI2V-5B (`expand_timesteps`): per-token timesteps; an image-conditioned sample's first latent frame is clean
  and its tokens carry timestep 0;
- Kandinsky 5 T2V: its two text encoders' embeddings and channels-last latents (wan.train.kandinsky5_inputs), a LoRA
  on its visual blocks.
"""

from __future__ import annotations

from wan.models import kandinsky5_facts
from wan.models.spec import I2V_PIPELINE, T2V_PIPELINE, ModelSpec
from wan.train.config import DEFAULT_TARGETS, TrainingConfig, bad_value

SUPPORTED = "Wan2.1 T2V, Wan2.1 I2V, Wan2.2 T2V-A14B, Wan2.2 I2V-A14B, Wan2.2 TI2V-5B and Kandinsky 5 T2V (LoRA)"
#: a TI2V sample's chance of being image-conditioned unless training.first_frame_condition_prob says otherwise: the
#: model does text to video and image to video, and half of each keeps both
TI2V_FIRST_FRAME_PROB = 0.5


def check_trainable_model(spec: ModelSpec) -> ModelSpec:
    """`spec` where fine-tuning takes it; a one-line ValueError naming what is supported for anything else."""
    model, ratio, ti2v = spec.model, spec.boundary_ratio, spec.ti2v
    if spec.pipeline not in (T2V_PIPELINE, I2V_PIPELINE, kandinsky5_facts.T2V_PIPELINE):
        raise ValueError(f"model: {model} is a {spec.pipeline}, which finetune.py does not train; supported: "
                         f"{SUPPORTED}")
    if spec.clip_images == 2:
        raise ValueError(f"model: {model} is Wan2.1 FLF2V (a first and a last frame), which finetune.py does not "
                         f"train; supported: {SUPPORTED}")
    if len(spec.experts) == 2 and (ratio is None or ti2v):
        raise ValueError(f"model: {model} has two transformers with boundary_ratio {ratio} and expand_timesteps "
                         f"{ti2v}, which finetune.py does not train; supported: {SUPPORTED} (A14B: a boundary_ratio, "
                         "no expand_timesteps)")
    return spec


def trained_experts(spec: ModelSpec, expert: str | None) -> tuple[str, ...]:
    """The transformers that `training.expert` trains (None or both: every one)."""
    if expert in (None, "both"):
        return spec.experts
    return (spec.experts[0 if expert == "high" else 1],)


def lora_targets(kandinsky5: bool, targets: tuple[str, ...]) -> tuple[str, ...]:
    """A LoRA's target modules: Kandinsky 5's own (kandinsky5_facts.LORA_TARGETS) where the config keeps the default,
    Wan's names, which name none of its layers."""
    return kandinsky5_facts.LORA_TARGETS if kandinsky5 and tuple(targets) == DEFAULT_TARGETS else tuple(targets)


def check_training_keys(spec: ModelSpec, training: TrainingConfig) -> None:
    """The `training:` keys that only some families take: one-line ValueError for the others."""
    if spec.kandinsky5:
        check_kandinsky5_keys(spec, training)
    if training.expert is not None and len(spec.experts) == 1:
        bad_value("expert", training.expert, f"null for {spec.model}, a {spec.name} model of one transformer (high, low "
                  "or both choose the experts of Wan2.2 A14B)")
    if training.first_frame_condition_prob is not None and not spec.ti2v:
        bad_value("first_frame_condition_prob", training.first_frame_condition_prob,
                  f"null for {spec.model}, a {spec.name} model (it sets how often Wan2.2 TI2V-5B trains image to video)")
    if training.validation.every and (spec.pipeline != T2V_PIPELINE or len(spec.experts) > 1):
        bad_value("validation.every", training.validation.every, f"0 for {spec.model}, a {spec.name} model (validation "
                  "videos are sampled for one-transformer text-to-video models: Wan2.1 T2V, Wan2.2 TI2V-5B)")
    if spec.ti2v:
        pixels = spec.pixels_per_token
        for side in ("height", "width"):
            if getattr(training, side) % pixels:
                bad_value(side, getattr(training, side), f"a multiple of {pixels} for {spec.model}, a "
                          f"{spec.name} model (its 16x VAE, then 2x2 patches)")


def check_kandinsky5_keys(spec: ModelSpec, training: TrainingConfig) -> None:
    """What Kandinsky 5 trains with for now: a LoRA, one clip a batch (its captions' embeddings differ in length),
    no caption dropout (the empty prompt is encoded by Wan's text encoder path)."""
    where = f"for {spec.model}, a {spec.name} model"
    if training.method != "lora":
        bad_value("method", training.method, f"lora {where} (full fine-tuning is not supported for it yet)")
    if training.batch_size != 1:
        bad_value("batch_size", training.batch_size, f"1 {where} (its caption embeddings differ in length)")
    if training.caption_dropout:
        bad_value("caption_dropout", training.caption_dropout, f"0 {where}")


def first_frame_prob(training: TrainingConfig) -> float:
    """How often a Wan2.2 TI2V-5B sample is trained image to video (its first latent frame the clean condition)."""
    prob = training.first_frame_condition_prob
    return TI2V_FIRST_FRAME_PROB if prob is None else float(prob)


#: the optimizers that need a package beside torch, and what it is called on PyPI
OPTIONAL_OPTIMIZERS = {"adamw8bit": ("bitsandbytes", "bitsandbytes"), "prodigy": ("prodigyopt", "prodigyopt")}


def check_optimizer(training: TrainingConfig, device: str) -> None:
    """`training.optimizer` can run here: its package is installed, and 8-bit AdamW has a GPU."""
    import importlib.util

    needs = OPTIONAL_OPTIMIZERS.get(training.optimizer)
    if needs is not None and importlib.util.find_spec(needs[0]) is None:
        bad_value("optimizer", training.optimizer, f"one whose package is installed (pip install {needs[1]}), or "
                  "adamw, adam, sgd")
    if training.optimizer == "adamw8bit" and not device.startswith("cuda"):
        bad_value("optimizer", training.optimizer, f"adamw, adam, sgd or prodigy on {device} (8-bit AdamW runs on "
                  "CUDA GPUs)")
