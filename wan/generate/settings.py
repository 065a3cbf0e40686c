"""Generation settings: defaults, the YAML `generation:` section, Wan's rules on sizes."""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Mapping
from typing import Any

from wan.defaults import DEFAULT_MODEL, MAX_FRAMES, MAX_SIDE
from wan.models.spec import TI2V_DEFAULTS

__all__ = ["TI2V_DEFAULTS", "GenerationSettings", "for_ti2v", "given_keys", "with_defaults"]

MAX_STEPS = 1000


@dataclasses.dataclass
class GenerationSettings:
    prompt: str | None = None
    negative_prompt: str = ""
    model: str = DEFAULT_MODEL
    seed: int = 0
    height: int = 480
    width: int = 832
    frames: int = 81
    steps: int = 50
    guidance_scale: float = 5.0
    fps: int = 16
    #: image to video: the first frame's image file (WanImageToVideoPipeline models), and FLF2V's last frame
    image: str | None = None
    last_image: str | None = None
    #: Wan VACE's controls (WanVACEPipeline): a video file, its mask (white: generate, black: keep), reference image
    #: files, and the scale of the VACE hints (None: the pipeline's 1.0)
    video: str | None = None
    mask: str | None = None
    reference_images: list[str] | None = None
    conditioning_scale: float | None = None
    #: Wan2.2 Animate's controls (WanAnimatePipeline): the pose video and the face video that move --image's
    #: character; with `video` and `mask` too, the character replaces the one the mask marks in that video
    pose_video: str | None = None
    face_video: str | None = None
    #: the sampler (SCHEDULERS; None: the model's own, UniPC for Wan), its flow shift (None: the
    #: model's), and explicit sigmas before the shift (a distilled model's schedule; the steps are then as many)
    scheduler: str | None = None
    flow_shift: float | None = None
    sigmas: list[float] | None = None
    #: the VAE's dtype: float32 (Wan's reference) or bfloat16 (decodes in about 60% of the time, BENCHMARKS.md)
    vae_dtype: str = "float32"
    #: the fraction of the steps after which the unconditional pass is skipped (classifier-free guidance truncated:
    #: 0.8 runs the last 20% of the steps with the conditional pass alone); None: guidance on every step
    cfg_truncation: float | None = None

    @classmethod
    def from_sources(cls, yaml_section: Mapping[str, Any] | None, overrides: Mapping[str, Any]) -> GenerationSettings:
        """Defaults, then the YAML `generation:` section, then command-line values that are not None."""
        values: dict[str, Any] = {}
        allowed = [f.name for f in dataclasses.fields(cls)]
        if yaml_section is not None and not isinstance(yaml_section, Mapping):
            raise ValueError(f"config: 'generation' must be a mapping of keys to values, got {yaml_section!r}")
        for key, value in (yaml_section or {}).items():
            if key not in allowed:
                raise ValueError(f"config: unknown key 'generation.{key}'; allowed keys: {', '.join(allowed)}")
            values[key] = value
        values.update({k: v for k, v in overrides.items() if v is not None})
        if isinstance(values.get("sigmas"), list) and "steps" not in values:  # a distilled schedule sets the steps
            values["steps"] = len(values["sigmas"])
        settings = cls(**values)
        settings.validate()
        return settings

    def validate(self) -> None:
        """One-line ValueError for anything Wan cannot generate."""
        if not isinstance(self.prompt, str) or not self.prompt.strip():
            raise ValueError("prompt: must be a non-empty string (give --prompt or generation.prompt in the config)")
        _check_int("seed", self.seed, 0, 2**63 - 1)
        for side in ("height", "width"):
            value = getattr(self, side)
            _check_int(side, value, 16, MAX_SIDE)
            if value % 16:
                raise ValueError(f"{side}: {value} is not allowed; Wan needs a multiple of 16 (e.g. {value // 16 * 16 or 16})")
        _check_int("frames", self.frames, 1, MAX_FRAMES)
        if (self.frames - 1) % 4:
            near = (self.frames - 1) // 4 * 4 + 1
            raise ValueError(f"frames: {self.frames} is not allowed; Wan needs 4k+1 frames (e.g. {near} or {near + 4})")
        _check_int("steps", self.steps, 1, MAX_STEPS)
        _check_int("fps", self.fps, 1, 240)
        if isinstance(self.guidance_scale, bool) or not isinstance(self.guidance_scale, (int, float)):
            # ValueError like every bad input: generate.py turns it into one line and exit code 2
            raise ValueError(f"guidance_scale: {self.guidance_scale!r} must be a number >= 0")  # noqa: TRY004
        if not 0 <= self.guidance_scale <= 100:
            raise ValueError(f"guidance_scale: {self.guidance_scale} must be in [0, 100]")
        if not isinstance(self.negative_prompt, str):
            raise ValueError(f"negative_prompt: {self.negative_prompt!r} must be a string")  # noqa: TRY004
        if not isinstance(self.model, str) or not self.model:
            raise ValueError(f"model: {self.model!r} must be a hub id or a folder path")
        for name in ("image", "last_image"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                raise ValueError(f"{name}: {getattr(self, name)!r} must be an image file's path")
        check_controls(self.video, self.mask, self.reference_images, self.conditioning_scale)
        for name in ("pose_video", "face_video"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                raise ValueError(f"{name}: {getattr(self, name)!r} must be a video file's path (.mp4, or .npy frames)")
        if (self.pose_video is None) != (self.face_video is None):
            given, missing = ("pose_video", "face_video") if self.face_video is None else ("face_video", "pose_video")
            raise ValueError(f"{given}: Wan2.2 Animate moves the character by a pose and a face video together; give "
                             f"--{missing.replace('_', '-')} PATH too")
        if self.last_image is not None and self.image is None:
            raise ValueError("last_image: a last frame needs a first one; give --image PATH too")
        if self.last_image is not None and self.frames < 5:
            raise ValueError(f"frames: {self.frames} is not allowed with a last image; a first and a last frame need "
                             "at least 5 frames")
        check_sampler(self.scheduler, self.flow_shift, self.sigmas, self.steps)
        if self.vae_dtype not in VAE_DTYPES:
            raise ValueError(f"vae_dtype: {self.vae_dtype!r} is not allowed; allowed: {', '.join(VAE_DTYPES)}")
        truncation = self.cfg_truncation
        if truncation is not None and (isinstance(truncation, bool) or not isinstance(truncation, (int, float))
                                       or not 0 <= truncation <= 1):
            raise ValueError(f"cfg_truncation: {truncation!r} is not allowed; it must be a number in [0, 1] (the "
                             "fraction of the steps that keep the unconditional pass) or null")


def check_controls(video: Any, mask: Any, references: Any, scale: Any) -> None:
    """One-line ValueError unless the VACE controls are paths where given, a mask comes with a video (a mask of
    nothing), and the scale is a finite number (the files are read by wan.io.frames)."""
    for name, value in (("video", video), ("mask", mask)):
        if value is not None and not isinstance(value, str):
            raise ValueError(f"{name}: {value!r} must be a video file's path (.mp4, or .npy frames)")
    if references is not None and not (isinstance(references, list) and references
                                       and all(isinstance(r, str) for r in references)):
        raise ValueError(f"reference_images: {references!r} must be a list of image files' paths")
    if mask is not None and video is None:
        raise ValueError("mask: a mask marks where to generate in a control video; give --video PATH too")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))
                              or not math.isfinite(scale)):
        raise ValueError(f"conditioning_scale: {scale!r} is not allowed; it must be a finite number (1.0: the "
                         "hints at full strength, 0: none)")


SCHEDULERS = ("unipc", "euler", "dpm++")
VAE_DTYPES = ("float32", "bfloat16")


def check_sampler(scheduler: Any, flow_shift: Any, sigmas: Any, steps: int) -> None:
    """One-line ValueError unless the scheduler is a known one, the shift a number > 0, and the sigmas a decreasing
    list in (0, 1] of `steps` entries that the scheduler takes."""
    if scheduler is not None and scheduler not in SCHEDULERS:
        raise ValueError(f"scheduler: {scheduler!r} is not allowed; allowed: {', '.join(SCHEDULERS)}")
    if flow_shift is not None and (isinstance(flow_shift, bool) or not isinstance(flow_shift, (int, float))
                                   or not 0 < flow_shift <= 100):
        raise ValueError(f"flow_shift: {flow_shift!r} is not allowed; it must be a number in (0, 100]")
    if sigmas is None:
        return
    numbers = isinstance(sigmas, list) and sigmas and all(
        isinstance(s, (int, float)) and not isinstance(s, bool) for s in sigmas)
    if not numbers or not all(0 < s <= 1 for s in sigmas) or any(a <= b for a, b in itertools.pairwise(sigmas)):
        raise ValueError(f"sigmas: {sigmas!r} is not allowed; it must be a decreasing list of numbers in (0, 1], e.g. "
                         "[1.0, 0.75, 0.5, 0.25]")
    if len(sigmas) != steps:
        raise ValueError(f"steps: {steps} is not allowed with {len(sigmas)} sigmas; give as many steps as sigmas (or "
                         "leave steps out)")
    if scheduler == "dpm++":
        raise ValueError("sigmas: not allowed with scheduler dpm++ (it takes none); use unipc or euler")


def given_keys(yaml_section: Mapping[str, Any] | None, overrides: Mapping[str, Any]) -> frozenset[str]:
    """The settings that a config's `generation:` section or a flag gives (the others take their defaults)."""
    return frozenset(yaml_section or {}) | {key for key, value in overrides.items() if value is not None}


def with_defaults(settings: GenerationSettings, given: frozenset[str], defaults: Mapping[str, Any]) -> GenerationSettings:
    """`settings` with a model's own `defaults` (wan.models.spec's `generation_defaults`) for the settings not `given`."""
    return dataclasses.replace(settings, **{k: v for k, v in defaults.items() if k not in given})


def for_ti2v(settings: GenerationSettings, given: frozenset[str], pixels: int) -> GenerationSettings:
    """`settings` for a Wan2.2 TI2V model whose token is `pixels` wide: TI2V_DEFAULTS for the settings not `given`,
    and its size rule (one-line ValueError for a side that is not a multiple of `pixels`)."""
    settings = with_defaults(settings, given, TI2V_DEFAULTS)
    for side in ("height", "width"):
        value = getattr(settings, side)
        if value % pixels:
            low = value // pixels * pixels
            raise ValueError(f"{side}: {value} is not allowed for a Wan2.2 TI2V model; it needs a multiple of {pixels} "
                             f"(its 16x VAE, then 2x2 patches; e.g. {low or pixels} or {low + pixels})")
    return settings


def _check_int(name: str, value: Any, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"{name}: {value!r} is not allowed; it must be an integer in [{low}, {high}]")
