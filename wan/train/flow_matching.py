"""Flow matching as Wan2.1 was trained: x_s = (1 - s) x0 + s noise, the model predicts noise - x0.

The noise level s comes from diffusers' `compute_density_for_timestep_sampling` (logit-normal, mode or
uniform), shifted the way Wan's scheduler shifts its sigmas (`flow_shift`); the transformer's timestep is
s x 1000, as the scheduler feeds it at sampling time. A Wan2.2 A14B expert trains on the timesteps it runs (its side of
the boundary); Wan2.2 TI2V-5B takes a timestep per token, 0 on an image-conditioned first frame, which the loss skips.
"""

from __future__ import annotations

import torch
from diffusers.training_utils import compute_density_for_timestep_sampling

NUM_TRAIN_TIMESTEPS = 1000
MAX_DRAWS = 10_000  # draws for a noise level in an expert's timestep range before giving up


def shift_sigmas(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    """The flow shift of FlowMatchEulerDiscreteScheduler / UniPC (use_flow_sigmas): more weight on high noise."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def sample_sigmas(batch: int, scheme: str, logit_mean: float, logit_std: float, mode_scale: float, shift: float,
                  generator: torch.Generator) -> torch.Tensor:
    """Noise levels s in (0, 1) of a batch, float32 on the generator's device."""
    u = compute_density_for_timestep_sampling(scheme, batch, logit_mean=logit_mean, logit_std=logit_std,
                                              mode_scale=mode_scale, device=generator.device, generator=generator)
    return shift_sigmas(u.float(), shift)


def sample_sigma_in(timesteps: tuple[float, float] | None, scheme: str, logit_mean: float, logit_std: float,
                    mode_scale: float, shift: float, generator: torch.Generator) -> torch.Tensor:
    """One noise level [1] whose timestep (s x 1000, float32 as the model gets it) is in `timesteps` [low, high):
    drawn again until it is, which keeps the distribution's shape within the range (musubi-tuner's
    preserve_distribution_shape). None: the first draw, as `sample_sigmas(1, ...)`."""
    for _ in range(MAX_DRAWS):
        sigma = sample_sigmas(1, scheme, logit_mean, logit_std, mode_scale, shift, generator)
        if timesteps is None or timesteps[0] <= float(sigma * NUM_TRAIN_TIMESTEPS) < timesteps[1]:
            return sigma
    raise ValueError(f"training: no timestep in [{timesteps[0]:g}, {timesteps[1]:g}) in {MAX_DRAWS} draws of "
                     f"weighting_scheme {scheme} with flow_shift {shift:g}; move logit_mean or flow_shift towards it")


def noisy_latents(x0: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    s = sigmas.view(-1, *([1] * (x0.dim() - 1)))
    return (1 - s) * x0 + s * noise


def flow_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    return noise - x0


def first_frame_mask(shape: torch.Size, conditioned: torch.Tensor) -> torch.Tensor:
    """[B, 1, F, H, W] for latents of `shape`: 0 on the first latent frame of the samples `conditioned` marks (their
    clean image condition), 1 elsewhere: WanImageToVideoPipeline's `first_frame_mask` under expand_timesteps, and all
    ones, WanPipeline's `mask`, for text to video."""
    mask = torch.ones(shape[0], 1, *shape[2:])
    mask[conditioned, :, 0] = 0
    return mask


def token_timesteps(mask: torch.Tensor, timesteps: torch.Tensor, patch_size: tuple[int, int, int]) -> torch.Tensor:
    """[B, tokens]: each token's timestep as the expand_timesteps pipelines build it (`(mask[0][0][:, ::2, ::2] *
    t).flatten()` for 2x2 patches), with each sample's own mask and timestep."""
    _, ph, pw = patch_size
    return (mask[:, 0, :, ::ph, ::pw] * timesteps.view(-1, 1, 1, 1)).flatten(1)


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per sample, the mean of `values` [B, C, F, H, W] where `mask` [B, 1, F, H, W] is 1 (the conditioning frame,
    which the model is not asked to denoise, is left out)."""
    mask = mask.expand_as(values)
    return (values * mask).flatten(1).sum(1) / mask.flatten(1).sum(1)
