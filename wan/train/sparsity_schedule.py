"""Which attention each optimizer step trains with: `training.sparsity_schedule` over the `sparsity:` section.

`config_at` is the pure schedule; `SparseAttention` is the one place that talks to the NABLA patch
(`wan.api.enable_nabla`'s handle): set the step's config, read its mean density, clear its records.
"""

from __future__ import annotations

import torch

from nabla.config import SparsityConfig
from wan.train.config import SparsitySchedule


def config_at(step: int, target: SparsityConfig, schedule: SparsitySchedule) -> SparsityConfig:
    """The sparsity of optimizer step `step` (0-based): dense for the first dense_steps, then `target` with its
    max_density lowered linearly from 1.0 over ramp_steps steps (the first sparse step is 1 / ramp_steps in)."""
    if not target.is_sparse:
        return target
    if step < schedule.dense_steps:
        return target.replace(mode="full")
    if not schedule.ramp_steps:
        return target
    progress = min(1.0, (step - schedule.dense_steps + 1) / schedule.ramp_steps)
    if progress == 1.0:  # the target itself, not 1 - (1 - 0.1) = 0.09999999999999998 (a block fewer a row)
        return target
    cap = round(1.0 - (1.0 - target.max_density) * progress, 9)
    return target.replace(max_density=cap, min_density=min(cap, target.min_density or 0.0) or None)


class SparseAttention:
    """The attention of the transformers that train under the schedule: a transformer, or a module whose `transformer`
    and `transformer_2` are Wan2.2's two experts (patched as enable_nabla patches a pipeline's, one step count and
    one record for both). Mode full patches nothing (the handle is None)."""

    def __init__(self, transformer: torch.nn.Module, target: SparsityConfig, schedule: SparsitySchedule,
                 compile: bool) -> None:
        from wan.api import enable_nabla  # the patch imports the attention kernels: only when training starts

        self.target, self.schedule = target, schedule
        # in training mode (make_trainable), compiled blocks take wan.api.TRAINING_COMPILE_OPTIONS
        self.handle = enable_nabla(transformer, target, compile=compile)
        self.current: SparsityConfig | None = None

    def start_step(self, step: int) -> SparsityConfig:
        config = config_at(step, self.target, self.schedule)
        if self.handle is not None:
            if config != self.current:
                for expert in self.handle.experts:
                    expert.set_config(config)
            self.handle.state.reset()
        self.current = config
        return config

    def for_sampling(self) -> None:
        """Validation videos run under the configured sparsity, whatever step the schedule is at."""
        self.start_step(self.schedule.dense_steps + self.schedule.ramp_steps)

    def mean_density(self) -> float:
        """Mean fraction of attention blocks computed this step; 1.0 when dense."""
        density = self.handle.state.mean_density() if self.handle is not None else None
        return 1.0 if density is None else float(density)
