"""The transformers ("experts") of a diffusers Wan pipeline that NABLA patches, and where Wan2.2 switches them.

Wan2.1 pipelines hold one `transformer`. Wan2.2 A14B ones also hold `transformer_2`, the low-noise expert: diffusers'
WanPipeline runs it on the steps whose timestep is below `boundary_ratio * num_train_timesteps` (0.875 for A14B), and
`transformer` on the others. A config's `sparsity_2:` section, merged over `sparsity:`, is the low-noise expert's.
diffusers is imported inside the functions: generate.py checks configs with this module before any model loads.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

from nabla.config import SparsityConfig, section_fields
from wan.model_index import local_config

#: the pipeline attributes that hold experts, in the order of the steps they run
EXPERT_NAMES = ("transformer", "transformer_2")
SUPPORTED = ("a WanPipeline, WanImageToVideoPipeline or WanVideoToVideoPipeline (their transformers are "
             "WanTransformer3DModel, Wan2.2's transformer_2 included) or a WanTransformer3DModel")


def experts(pipe_or_transformer: Any, caller: str) -> list[Any]:
    """The WanTransformer3DModels to patch: the one given, or the pipeline's `transformer` (and `transformer_2`).

    Anything else, such as WanVACEPipeline's or WanAnimatePipeline's transformers (other classes, whose attention
    processors NABLA's does not replace), is a one-line TypeError naming what is supported.
    """
    from diffusers import WanTransformer3DModel

    if isinstance(pipe_or_transformer, WanTransformer3DModel):
        return [pipe_or_transformer]
    found = [getattr(pipe_or_transformer, name, None) for name in EXPERT_NAMES]
    if isinstance(found[0], WanTransformer3DModel) and (found[1] is None or isinstance(found[1], WanTransformer3DModel)):
        return [t for t in found if t is not None]
    what = type(pipe_or_transformer).__name__
    if found[0] is not None:
        what += f" (transformer: {type(found[0]).__name__})"
    raise TypeError(f"{caller}: {what} is not supported; pass {SUPPORTED}")


def low_noise_config(sparsity: SparsityConfig, section: Mapping[str, Any] | None) -> SparsityConfig | None:
    """The low-noise expert's config from a YAML `sparsity_2:` section (its keys over `sparsity`'s); None without one
    (then both experts take `sparsity`)."""
    if section is None:
        return None
    return sparsity.replace(**section_fields(SparsityConfig, section, "sparsity_2"))  # validated as merged


def boundary_step(pipe: Any, steps: int) -> int | None:
    """The first step of a `steps`-step run that the low-noise expert runs (`steps` if none), as diffusers'
    WanPipeline picks it; None for a pipeline of one transformer."""
    ratio = getattr(pipe.config, "boundary_ratio", None)
    if ratio is None or getattr(pipe, "transformer_2", None) is None:
        return None
    scheduler = copy.deepcopy(pipe.scheduler)  # the pipeline sets its own timesteps again for each run
    scheduler.set_timesteps(steps, device="cpu")
    boundary = ratio * scheduler.config.num_train_timesteps
    return next((i for i, t in enumerate(scheduler.timesteps) if t < boundary), steps)


def warmup_steps(pipe: Any, per_expert: int, limit: int = 200) -> tuple[int, int | None]:
    """The fewest steps of a run in which every expert runs at least `per_expert` steps, and its boundary step
    (None for one transformer): a warm-up must compile each expert's graphs."""
    for steps in range(per_expert, limit + 1):
        boundary = boundary_step(pipe, steps)
        if boundary is None or min(boundary, steps - boundary) >= per_expert:
            return steps, boundary
    raise ValueError(f"warm-up: no run of up to {limit} steps gives each expert {per_expert} steps; "
                     f"boundary_ratio {pipe.config.boundary_ratio} is too close to 0 or 1")


def local_experts(model: str) -> int | None:
    """How many transformers (experts) a local pipeline folder holds, from its model_index.json; None for a hub id."""
    index = local_config(model)
    if index is None:
        return None
    return 1 if (index.get("transformer_2") or [None])[0] is None else 2


def check_low_noise_model(model: str, experts: int | None = None) -> None:
    """Refuse a `sparsity_2:` section for a pipeline without a low-noise expert: one of `experts` transformers once
    loaded, or before it loads a local folder whose model_index.json has no transformer_2 (a hub id passes then)."""
    if (experts or local_experts(model)) == 1:
        raise ValueError(f"config: 'sparsity_2' is not allowed for {model}: it has one transformer, no transformer_2 "
                         "(the low-noise expert of Wan2.2 A14B that sparsity_2 configures)")


def check_one_expert(model: str, flags: list[str], experts: int | None = None) -> None:
    """Refuse `flags` (--transformer, --lora: they replace or adapt one transformer) for a two-expert pipeline, before
    it loads where its folder says so, else once `experts` is known."""
    if flags and (experts or local_experts(model)) == 2:
        raise ValueError(f"{' and '.join(flags)}: not supported for {model}, a two-expert pipeline (Wan2.2 A14B: "
                         "transformer and transformer_2); they apply to one-transformer Wan models")
