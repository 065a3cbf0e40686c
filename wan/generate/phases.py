"""Where a video's seconds go: each phase of one pipeline call (text encoding, preparing the latents and image
conditioning, denoising and each step, VAE decoding), and once a process the start-up (loading, FP8, the warm-up).

The phases of a call come from hooks on the text encoder and the transformers and from the step callback, each
timestamp taken after the device finished its work (a synchronisation a phase, a few per video). They partition the
call: they add up to its seconds.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Iterator
from typing import Any

import torch


def _now(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


@dataclasses.dataclass
class PhaseClock:
    """The timestamps of one pipeline call."""

    device: torch.device
    start: float = 0.0
    text_end: float | None = None
    denoise_start: float | None = None
    step_ends: list[float] = dataclasses.field(default_factory=list)
    end: float = 0.0

    def step_ended(self) -> None:
        self.step_ends.append(_now(self.device))

    def seconds(self) -> dict[str, float]:
        """Seconds per phase, adding up to the call's: text encoding (and the call's set-up before it), preparing
        (latents, image conditioning), denoising, decoding (the VAE and the frames' post-processing)."""
        text_end = self.text_end or self.start
        denoise_start = self.denoise_start or text_end
        last_step = self.step_ends[-1] if self.step_ends else denoise_start
        return {"text_encoding": text_end - self.start, "preparing": denoise_start - text_end,
                "denoising": last_step - denoise_start, "decoding": self.end - last_step}

    def step_seconds(self) -> list[float]:
        """Each denoising step's seconds."""
        starts = [self.denoise_start or self.start, *self.step_ends[:-1]]
        return [end - start for start, end in zip(starts, self.step_ends)]


@contextlib.contextmanager
def timed_phases(pipe: Any, device: str | torch.device) -> Iterator[PhaseClock]:
    """A PhaseClock filled by one pipeline call inside the block (its step callback must call `step_ended`)."""
    clock = PhaseClock(torch.device(device))

    def text_done(module, args, output):
        clock.text_end = _now(clock.device)  # the last call's: CFG encodes the negative prompt second

    def denoising(module, args, kwargs):
        if clock.denoise_start is None:
            clock.denoise_start = _now(clock.device)

    hooks = []
    if getattr(pipe, "text_encoder", None) is not None:
        hooks.append(pipe.text_encoder.register_forward_hook(text_done))
    for name in ("transformer", "transformer_2"):
        if getattr(pipe, name, None) is not None:
            hooks.append(getattr(pipe, name).register_forward_pre_hook(denoising, with_kwargs=True))
    clock.start = _now(clock.device)
    try:
        yield clock
    finally:
        clock.end = _now(clock.device)
        for hook in hooks:
            hook.remove()


def describe_phases(phases: dict[str, float], steps: list[float]) -> str:
    """One line: "text encoding 0.12 s, preparing 0.01 s, denoising 7.68 s (4 steps: 1.92 s a step), decoding
    4.75 s"."""
    count = f"{len(steps)} step" + ("s" if len(steps) != 1 else "")
    per_step = f" ({count}: {sum(steps) / len(steps):.2f} s a step)" if steps else ""
    names = {"text_encoding": "text encoding", "preparing": "preparing", "denoising": "denoising",
             "decoding": "VAE decoding", "writing": "writing"}
    parts = [f"{names.get(name, name)} {seconds:.2f} s" + (per_step if name == "denoising" else "")
             for name, seconds in phases.items()]
    return ", ".join(parts)
