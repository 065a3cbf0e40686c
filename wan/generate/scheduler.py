"""The sampler of a run: the model's own scheduler, or the one the settings name (the flow-matching schedulers
diffusers ships for Wan) with their flow shift and explicit sigmas (what a step-distilled model prescribes)."""

from __future__ import annotations

from typing import Any

import numpy as np

from wan.models.spec import scheduler_shift


class _FixedSigmas:
    """A scheduler whose runs of `len(fixed_sigmas)` steps take those sigmas (before its shift); runs of another
    length, such as a warm-up's, keep its own spacing."""

    fixed_sigmas: tuple[float, ...] = ()

    def set_timesteps(self, num_inference_steps: int | None = None, device: Any = None, **kwargs: Any) -> None:
        if num_inference_steps in (None, len(self.fixed_sigmas)):
            return super().set_timesteps(device=device, sigmas=np.array(self.fixed_sigmas), **kwargs)
        return super().set_timesteps(num_inference_steps, device=device, **kwargs)


def _build(name: str, current: Any, shift: float) -> Any:
    from diffusers import DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

    if name == "euler":
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    if name == "dpm++":
        return DPMSolverMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=shift,
                                           algorithm_type="dpmsolver++", solver_order=2)
    if isinstance(current, UniPCMultistepScheduler):  # Wan's own: its other settings kept
        return UniPCMultistepScheduler.from_config(current.config, flow_shift=shift)
    return UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=shift)


def scheduler_for(current: Any, name: str | None, shift: float | None, sigmas: list[float] | None) -> Any:
    """The scheduler a run of these settings samples with: `current` itself where none is set (the stock run)."""
    if name is None and shift is None and sigmas is None:
        return current
    scheduler = _build(name or _name_of(current), current, scheduler_shift(current.config) if shift is None else float(shift))
    if sigmas is not None:
        fixed = type(f"{type(scheduler).__name__}WithSigmas", (_FixedSigmas, type(scheduler)), {})
        scheduler = fixed.from_config(scheduler.config)
        scheduler.fixed_sigmas = tuple(float(s) for s in sigmas)
    return scheduler


def _name_of(scheduler: Any) -> str:
    names = {"FlowMatchEulerDiscreteScheduler": "euler", "DPMSolverMultistepScheduler": "dpm++"}
    classes = {cls.__name__ for cls in type(scheduler).__mro__}  # a WithSigmas subclass keeps its base's name
    return next((name for cls, name in names.items() if cls in classes), "unipc")


def describe_sampler(scheduler: Any) -> str:
    """The sampler in a few words: "unipc, shift 5.0" or "euler, shift 5.0, sigmas 1.0 0.75 0.5 0.25"."""
    text = f"{_name_of(scheduler)}, shift {scheduler_shift(scheduler.config):g}"
    sigmas = getattr(scheduler, "fixed_sigmas", ())
    return text + (", sigmas " + " ".join(f"{s:g}" for s in sigmas) if sigmas else "")
