"""The transformers ("experts") of a diffusers Wan pipeline that NABLA patches, and where Wan2.2 switches them.

Wan2.1 pipelines hold one `transformer`. Wan2.2 A14B ones also hold `transformer_2`, the low-noise expert: diffusers'
WanPipeline runs it on the steps whose timestep is below `boundary_ratio * num_train_timesteps` (0.875 for A14B), and
`transformer` on the others. A config's `sparsity_2:` section, merged over `sparsity:`, is the low-noise expert's.
diffusers is imported inside the functions: generate's checks use this module before any model loads.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

from nabla.config import SparsityConfig, section_fields
from wan.models.spec import EXPERT_NAMES


def experts(pipe_or_transformer: Any, caller: str) -> list[Any]:
    """The transformers to patch: the one given, or the pipeline's `transformer` (and `transformer_2`), each of a
    family the patch knows (wan.models.families).

    Anything else (a transformer class that no family names) is a one-line TypeError naming what is supported.
    """
    from wan.models.families import SUPPORTED, find_family  # imports diffusers: generate's checks use this module

    if find_family(pipe_or_transformer) is not None:
        return [pipe_or_transformer]
    found = [getattr(pipe_or_transformer, name, None) for name in EXPERT_NAMES]
    if find_family(found[0]) is not None and (found[1] is None or find_family(found[1]) is not None):
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
