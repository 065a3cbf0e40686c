"""Flow matching as Wan2.1 was trained: x_s = (1 - s) x0 + s noise, the model predicts noise - x0.

The noise level s comes from diffusers' `compute_density_for_timestep_sampling` (logit-normal, mode or
uniform), shifted the way Wan's scheduler shifts its sigmas (`flow_shift`); the transformer's timestep is
s x 1000, as the scheduler feeds it at sampling time.
"""

from __future__ import annotations

import torch
from diffusers.training_utils import compute_density_for_timestep_sampling

NUM_TRAIN_TIMESTEPS = 1000


def shift_sigmas(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    """The flow shift of FlowMatchEulerDiscreteScheduler / UniPC (use_flow_sigmas): more weight on high noise."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def sample_sigmas(batch: int, scheme: str, logit_mean: float, logit_std: float, mode_scale: float, shift: float,
                  generator: torch.Generator) -> torch.Tensor:
    """Noise levels s in (0, 1) of a batch, float32 on the generator's device."""
    u = compute_density_for_timestep_sampling(scheme, batch, logit_mean=logit_mean, logit_std=logit_std,
                                              mode_scale=mode_scale, device=generator.device, generator=generator)
    return shift_sigmas(u.float(), shift)


def noisy_latents(x0: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    s = sigmas.view(-1, *([1] * (x0.dim() - 1)))
    return (1 - s) * x0 + s * noise


def flow_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    return noise - x0


def scheduler_shift(scheduler_config: dict) -> float:
    """The shift a Wan scheduler config samples with: UniPC's `flow_shift`, FlowMatchEuler's `shift`, else 1."""
    return float(scheduler_config.get("flow_shift") or scheduler_config.get("shift") or 1.0)
