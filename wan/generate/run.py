"""One generation: seeded, timed on the device, with NaN/Inf caught at the step where they appear."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from wan.generate.phases import timed_phases
from wan.generate.settings import GenerationSettings
from wan.io.frames import pipeline_controls
from wan.io.images import pipeline_images

if TYPE_CHECKING:  # diffusers stays out of generate.py's checks, which run before any model loads
    from diffusers import Kandinsky5T2VPipeline, WanImageToVideoPipeline, WanPipeline


class NonFiniteLatentsError(RuntimeError):
    pass


def _check_finite(pipe, step: int, timestep, callback_kwargs: dict) -> dict:
    latents = callback_kwargs["latents"]
    if not torch.isfinite(latents).all():
        raise NonFiniteLatentsError(
            f"NaN or Inf in the latents after denoising step {step + 1} (timestep {float(timestep):.1f}); "
            "no video was written (try --dtype float32 or another config)"
        )
    return callback_kwargs


def generate(
    pipe: WanPipeline | WanImageToVideoPipeline | Kandinsky5T2VPipeline, settings: GenerationSettings, *, steps: int | None = None,
    decode: bool = True, phases: dict[str, Any] | None = None,
) -> tuple[np.ndarray, float]:
    """Run the pipeline; returns frames [F, H, W, 3] in [0, 1] and the wall-clock seconds it took.

    The noise comes from a CPU generator seeded with `settings.seed`, so a seed gives the same
    starting latents on every device. With `decode=False` (ranks that write no video) the VAE is
    skipped and the latents come back instead of frames. Image to video: `settings.image` (and `last_image`)
    are read, outside the timing, and given to the pipeline; so are Wan VACE's controls (`video`, `mask`,
    `reference_images`, `conditioning_scale`). `phases`, where given, receives the seconds of each
    phase of the call (wan.generate.phases: they add up to the seconds returned) and under "steps" each step's.
    """
    device = pipe._execution_device
    generator = torch.Generator("cpu").manual_seed(settings.seed)
    face_size = getattr(pipe.transformer.config, "motion_encoder_size", None)  # Wan2.2 Animate's face frames
    inputs = {**pipeline_images(settings), **pipeline_controls(settings, face_size)}
    # Wan2.2 Animate makes as many frames as its pose video has, one segment of them
    frames = {} if "pose_video" in inputs else {"num_frames": settings.frames}

    total = steps or settings.steps
    # CFG truncation: the steps from `guided` on run the conditional pass alone (diffusers' pipelines read
    # do_classifier_free_guidance, the scale > 1, at each step)
    guided = None if settings.cfg_truncation is None else math.ceil(settings.cfg_truncation * total)

    def step_end(pipe, step: int, timestep, callback_kwargs: dict) -> dict:
        _check_finite(pipe, step, timestep, callback_kwargs)
        if guided is not None and step + 1 >= guided:
            pipe._guidance_scale = 1.0
        clock.step_ended()
        return callback_kwargs

    with torch.inference_mode(), timed_phases(pipe, device) as clock:
        result = pipe(
            **inputs,
            prompt=settings.prompt,
            # none given: the pipeline's own (Wan's is empty, Kandinsky 5's names what its models should not show)
            negative_prompt=settings.negative_prompt or None,
            height=settings.height,
            width=settings.width,
            **frames,
            num_inference_steps=total,
            guidance_scale=1.0 if guided == 0 else settings.guidance_scale,
            generator=generator,
            output_type="np" if decode else "latent",
            callback_on_step_end=step_end,
            callback_on_step_end_tensor_inputs=["latents"],
        )
    if phases is not None:
        phases.update(clock.seconds(), steps=clock.step_seconds())
    return result.frames[0], clock.end - clock.start
