"""The `training:` section of a fine-tuning YAML: a validated dataclass, every key checked before a model loads.

Errors are one-line ValueErrors that name the key, the value and what is allowed (finetune.py exits 2 on them).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from diffusers.optimization import SchedulerType

from nabla.config import SparsityConfig, read_yaml, section_fields
from wan.defaults import MAX_FRAMES, MAX_SIDE

METHODS = ("lora", "full")
EXPERTS = ("high", "low", "both")  # Wan2.2 A14B's `transformer`, its `transformer_2`, or both
WEIGHTING_SCHEMES = ("logit_normal", "mode", "uniform")  # compute_density_for_timestep_sampling's; else uniform
FRAME_SAMPLING = ("start", "uniform", "windows")
OPTIMIZERS = ("adamw", "adam", "sgd", "adamw8bit", "prodigy")
LR_SCHEDULERS = tuple(s.value for s in SchedulerType if s.value != "piecewise_constant")  # those without step rules
#: peft's default for Wan: self- and cross-attention projections and the feed-forward (Kandinsky 5's choice too).
DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2")


def bad_value(key: str, value: Any, allowed: str) -> None:
    raise ValueError(f"config: bad value for 'training.{key}': {value!r}; allowed: {allowed}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _int(key: str, value: Any, low: int, high: int = 2**31 - 1) -> None:
    if not _is_int(value) or not low <= value <= high:
        bad_value(key, value, f"an integer in [{low}, {high}]")


def _positive(key: str, value: Any) -> None:
    if not _is_number(value) or not value > 0:
        bad_value(key, value, "a number > 0")


@dataclasses.dataclass(frozen=True)
class SparsitySchedule:
    """Dense for the first `dense_steps` optimizer steps, then the `sparsity:` section with its `max_density`
    lowered linearly from 1.0 to the configured cap over `ramp_steps` steps (the way VSA ramps its sparsity)."""

    dense_steps: int = 0
    ramp_steps: int = 0

    def __post_init__(self) -> None:
        _int("sparsity_schedule.dense_steps", self.dense_steps, 0)
        _int("sparsity_schedule.ramp_steps", self.ramp_steps, 0)


@dataclasses.dataclass(frozen=True)
class ValidationConfig:
    """Videos for `prompts` every `every` optimizer steps (0: never), with the current weights, on rank 0's files."""

    prompts: tuple[str, ...] = ()
    every: int = 0
    steps: int = 30
    guidance_scale: float = 5.0
    seed: int = 0

    def __post_init__(self) -> None:
        prompts = self.prompts
        if not isinstance(prompts, Sequence) or isinstance(prompts, str) or not all(
                isinstance(p, str) and p.strip() for p in prompts):
            bad_value("validation.prompts", prompts, "a list of non-empty prompts")
        object.__setattr__(self, "prompts", tuple(prompts))
        _int("validation.every", self.every, 0)
        _int("validation.steps", self.steps, 1, 1000)
        if not _is_number(self.guidance_scale) or not 0 <= self.guidance_scale <= 100:
            bad_value("validation.guidance_scale", self.guidance_scale, "a number in [0, 100]")
        _int("validation.seed", self.seed, 0)
        if self.every and not self.prompts:
            bad_value("validation.every", self.every, "0 unless validation.prompts lists prompts")


@dataclasses.dataclass(frozen=True)
class TrainingConfig:
    """Everything a fine-tuning run needs besides the model, the data and the sparsity (see configs/finetune-*.yaml).

    batch_size is per process and micro-step; the global batch of an optimizer step is
    batch_size x processes x gradient_accumulation.
    """

    method: str = "lora"
    height: int = 480
    width: int = 832
    frames: int = 81
    fps: int = 16
    rank: int = 32
    alpha: float = 32.0
    target_modules: tuple[str, ...] = DEFAULT_TARGETS
    learning_rate: float = 1e-4
    weight_decay: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.95)
    lr_scheduler: str = "constant_with_warmup"
    #: adamw, adam, sgd (torch's), adamw8bit (bitsandbytes' 8-bit AdamW, on CUDA) or prodigy (prodigyopt; it sets its
    #: own step size: learning_rate 1.0)
    optimizer: str = "adamw"
    #: which frames of a clip make samples: start (the first `frames`), uniform (`samples_per_clip` windows spread
    #: over the clip) or windows (one every `window_stride` frames at `fps`, at most `samples_per_clip` where > 1)
    frame_sampling: str = "start"
    samples_per_clip: int = 1
    window_stride: int | None = None
    #: resolution buckets: [[height, width], ...] (multiples of 16); each clip goes to the one nearest its aspect
    #: ratio and every batch holds one bucket's samples; null: every clip at height x width
    buckets: list[list[int]] | None = None
    #: how many times an epoch visits each sample (in a new shuffled order each epoch)
    repeats: int = 1
    #: the chance that a sample trains with the empty prompt instead of its caption (what classifier-free guidance
    #: samples against); 0: never
    caption_dropout: float = 0.0
    #: an exponential moving average of the trainable weights (diffusers' EMAModel, this decay; under torchrun each
    #: rank averages its shards), saved beside the raw result as OUT/lora_ema or OUT/transformer_ema; null: none
    ema_decay: float | None = None
    #: where the scalars of each step go beside log.jsonl: tensorboard (OUT/tensorboard) or null
    tracker: str | None = "tensorboard"
    warmup_steps: int = 0
    steps: int = 1000
    batch_size: int = 1
    gradient_accumulation: int = 1
    max_grad_norm: float = 1.0
    weighting_scheme: str = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    flow_shift: float | None = None
    gradient_checkpointing: bool = True
    checkpoint_every: int = 250
    keep_last: int = 3
    seed: int = 0
    #: two-expert models (Wan2.2 A14B): which to train; null: both (wan/train/checks.py)
    expert: str | None = None
    #: Wan2.2 TI2V-5B: the chance a sample is trained image to video (first latent frame clean, at timestep 0);
    #: null: wan.train.checks.TI2V_FIRST_FRAME_PROB
    first_frame_condition_prob: float | None = None
    sparsity_schedule: SparsitySchedule = dataclasses.field(default_factory=SparsitySchedule)
    validation: ValidationConfig = dataclasses.field(default_factory=ValidationConfig)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            bad_value("method", self.method, " or ".join(METHODS))
        for side in ("height", "width"):
            value = getattr(self, side)
            _int(side, value, 16, MAX_SIDE)
            if value % 16:
                bad_value(side, value, f"a multiple of 16 (e.g. {value // 16 * 16 or 16})")
        _int("frames", self.frames, 1, MAX_FRAMES)
        if (self.frames - 1) % 4:
            bad_value("frames", self.frames, "4k+1 frames (e.g. 81)")
        _int("fps", self.fps, 1, 240)
        _int("rank", self.rank, 1, 4096)
        _positive("alpha", self.alpha)
        self._check_targets()
        _positive("learning_rate", self.learning_rate)
        if not _is_number(self.weight_decay) or self.weight_decay < 0:
            bad_value("weight_decay", self.weight_decay, "a number >= 0")
        betas = self.betas
        if not isinstance(betas, Sequence) or len(betas) != 2 or not all(_is_number(b) and 0 <= b < 1 for b in betas):
            bad_value("betas", betas, "two numbers in [0, 1)")
        object.__setattr__(self, "betas", tuple(betas))
        if self.lr_scheduler not in LR_SCHEDULERS:
            bad_value("lr_scheduler", self.lr_scheduler, ", ".join(LR_SCHEDULERS))
        self._check_trainer_keys()
        _int("steps", self.steps, 1)
        _int("warmup_steps", self.warmup_steps, 0, self.steps)
        _int("batch_size", self.batch_size, 1, 1024)
        _int("gradient_accumulation", self.gradient_accumulation, 1, 4096)
        _positive("max_grad_norm", self.max_grad_norm)
        if self.weighting_scheme not in WEIGHTING_SCHEMES:
            bad_value("weighting_scheme", self.weighting_scheme, ", ".join(WEIGHTING_SCHEMES))
        for key in ("logit_mean", "mode_scale"):
            if not _is_number(getattr(self, key)):
                bad_value(key, getattr(self, key), "a number")
        _positive("logit_std", self.logit_std)
        if self.flow_shift is not None:
            _positive("flow_shift", self.flow_shift)
        if not isinstance(self.gradient_checkpointing, bool):
            bad_value("gradient_checkpointing", self.gradient_checkpointing, "true or false")
        _int("checkpoint_every", self.checkpoint_every, 1)
        _int("keep_last", self.keep_last, 1, 1000)
        _int("seed", self.seed, 0, 2**63 - 1)
        self._check_family_keys()

    def _check_trainer_keys(self) -> None:
        """The frame sampling, optimizer, caption dropout, EMA and tracker."""
        if self.frame_sampling not in FRAME_SAMPLING:
            bad_value("frame_sampling", self.frame_sampling, ", ".join(FRAME_SAMPLING))
        _int("samples_per_clip", self.samples_per_clip, 1, 1000)
        if self.frame_sampling == "start" and self.samples_per_clip != 1:
            bad_value("samples_per_clip", self.samples_per_clip, "1 with frame_sampling start (uniform or windows "
                      "draw several samples from a clip)")
        if self.window_stride is not None:
            _int("window_stride", self.window_stride, 1)
        _int("repeats", self.repeats, 1, 10_000)
        self._check_buckets()
        if self.optimizer not in OPTIMIZERS:
            bad_value("optimizer", self.optimizer, ", ".join(OPTIMIZERS))
        if not _is_number(self.caption_dropout) or not 0 <= self.caption_dropout < 1:
            bad_value("caption_dropout", self.caption_dropout, "a number in [0, 1)")
        if self.ema_decay is not None and (not _is_number(self.ema_decay) or not 0 < self.ema_decay < 1):
            bad_value("ema_decay", self.ema_decay, "a number in (0, 1) or null")
        if self.tracker not in (None, "tensorboard"):
            bad_value("tracker", self.tracker, "tensorboard or null")

    def _check_buckets(self) -> None:
        buckets = self.buckets
        if buckets is None:
            return
        sizes = isinstance(buckets, Sequence) and not isinstance(buckets, str) and buckets and all(
            isinstance(b, Sequence) and len(b) == 2 and all(isinstance(v, int) and not isinstance(v, bool) and
                                                             16 <= v <= MAX_SIDE and v % 16 == 0 for v in b)
            for b in buckets)
        if not sizes:
            bad_value("buckets", buckets, f"a list of [height, width] pairs, multiples of 16 up to {MAX_SIDE}, or null")
        object.__setattr__(self, "buckets", [list(b) for b in buckets])

    def _check_targets(self) -> None:
        targets = self.target_modules
        if isinstance(targets, str) or not isinstance(targets, Sequence) or not targets or not all(
                isinstance(t, str) and t for t in targets):
            bad_value("target_modules", targets, "a non-empty list of Linear module names, e.g. [to_q, to_k, to_v]")
        object.__setattr__(self, "target_modules", tuple(targets))

    def _check_family_keys(self) -> None:
        """The keys of some families only (wan.train.checks.check_training_keys checks them against the model)."""
        if self.expert is not None and self.expert not in EXPERTS:
            bad_value("expert", self.expert, f"{', '.join(EXPERTS)} or null (both)")
        prob = self.first_frame_condition_prob
        if prob is not None and not (_is_number(prob) and 0 <= prob <= 1):
            bad_value("first_frame_condition_prob", prob, "a number in [0, 1] or null")

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> TrainingConfig:
        values = section_fields(cls, values, "training")
        if "sparsity_schedule" in values:
            values["sparsity_schedule"] = SparsitySchedule(
                **section_fields(SparsitySchedule, values["sparsity_schedule"] or {}, "training.sparsity_schedule"))
        if "validation" in values:
            values["validation"] = ValidationConfig(
                **section_fields(ValidationConfig, values["validation"] or {}, "training.validation"))
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def check_schedule(training: TrainingConfig, sparsity: SparsityConfig) -> None:
    """A max_density ramp needs a sparse mode and a max_density to ramp to."""
    if training.sparsity_schedule.ramp_steps and not (sparsity.is_sparse and sparsity.max_density is not None):
        bad_value("sparsity_schedule.ramp_steps", training.sparsity_schedule.ramp_steps,
             "0 unless sparsity.mode is sparse and sparsity.max_density is set (the target of the ramp)")


def load_finetune_config(path: str | Path | None) -> tuple[SparsityConfig, TrainingConfig]:
    """The `sparsity:` and `training:` sections of `path` (None: dense LoRA with the defaults)."""
    data = read_yaml(path) if path is not None else {}
    unknown = sorted(set(data) - {"sparsity", "training"})
    if unknown:
        raise ValueError(f"config: unknown section '{unknown[0]}'; allowed sections: sparsity, training")
    sparsity = SparsityConfig.from_dict(data.get("sparsity") or {})
    training = TrainingConfig.from_dict(data.get("training") or {})
    check_schedule(training, sparsity)
    return sparsity, training


def check_target_modules(targets: Sequence[str], linear_names: Sequence[str]) -> None:
    """Each target must name a Linear the way peft matches it: the whole module name or its dotted suffix."""
    for target in targets:
        if not any(name == target or name.endswith("." + target) for name in linear_names):
            leaves = sorted({name.split(".", 2)[-1] for name in linear_names if name.startswith("blocks.0.")})
            bad_value("target_modules", target, f"names of Linear layers in the transformer, e.g. {', '.join(leaves)}")
