"""The state a NABLA-patched transformer's hooks share: the config, the token grid, the step, and the run's records.

A forward pre-hook calls `start_forward` with the latents and the timestep. Under inference the denoising step
comes from the timestep (flow-matching timesteps fall within a run); under autograd (training) every forward is a
step of its own and `dense_steps` does not apply: a trainer sets the config per optimizer step instead.
The experts of one pipeline (Wan2.2 A14B: `transformer` above the boundary timestep, `transformer_2` below it) have
a state each but share one StepClock and one AttentionRecords: the step count, dense_steps, the fallback's steps and
the records are those of the whole run.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import weakref
from typing import Any, NamedTuple

import torch

from nabla import SparsityConfig, TileLayout
from wan.attention.fallback import DenseFallback
from wan.attention.records import AttentionRecords


class TileIndices(NamedTuple):
    """A TileLayout's index tensors on the device, for the processor's gathers inside the compiled block."""

    gather: torch.Tensor  # raster_index: tile order from raster order (padding slots read a zero row appended)
    scatter: torch.Tensor  # tile_index: raster order from tile order
    valid: torch.Tensor  # the real tokens in tile order
    #: raster_index with padding slots reading the last real token: v needs no zero rows (padding keys are never
    #: attended, and the dense fallback drops them)
    gather_values: torch.Tensor
    gather_keys: torch.Tensor  # a copy of raster_index for k (see the processor)


@dataclasses.dataclass
class StepClock:
    """The denoising step of a run, shared by the states of a pipeline's experts."""

    step: int = -1
    last_timestep: float | None = None
    #: the dense fallbacks of the states on this clock (one per expert: they are keyed by layer), forgotten with it
    fallbacks: list[DenseFallback] = dataclasses.field(default_factory=list)

    def tick(self, t: float | None) -> None:
        """Advance for a forward at timestep `t` (None: under autograd, every forward is a step)."""
        if t is None:
            self.step += 1
        # Flow-matching timesteps fall within a run: equal -> same step (CFG passes), higher -> new run.
        elif self.last_timestep is None or t > self.last_timestep:
            self.step = 0
        elif t < self.last_timestep:
            self.step += 1
        if t is not None:
            self.last_timestep = t

    def reset(self) -> None:
        self.step, self.last_timestep = -1, None
        for fallback in self.fallbacks:
            fallback.reset()


@dataclasses.dataclass
class NablaState:
    """What the hooks and processors of one patched transformer share during a forward, and the run's records."""

    config: SparsityConfig
    #: the whole token stream runs in padded tile order, dense steps too (sequence parallelism splits the padded
    #: tiles evenly); otherwise it stays in raster order and only attention sees tile order
    pad_dense: bool = False
    #: the transformer's blocks (self-attention layers)
    layers: int = 0
    layout: TileLayout | None = None
    #: the step count, shared with the other experts of the pipeline
    clock: StepClock = dataclasses.field(default_factory=StepClock)
    #: which of the pipeline's transformers this is: 0 `transformer`, 1 `transformer_2` (Wan2.2's low-noise expert)
    expert: int = 0
    #: this forward runs under autograd: a step of its own, no dense steps
    training: bool = False
    #: the run's records, shared with the other experts of the pipeline
    records: AttentionRecords = dataclasses.field(default_factory=AttentionRecords)
    fallback: DenseFallback = dataclasses.field(default_factory=DenseFallback)
    #: the kernel that ran the last sparse call (nabla.backend.resolve_backend)
    backend: str | None = None
    #: where the processor tiles q, k, v itself (sparse steps, raster stream), the layout's index tensors on the
    #: device, else None
    tile_indices: TileIndices | None = None
    #: at inference where the processor tiles q, k, v: the rotary tables in tile order, a copy for k (see the
    #: processor), set by the patched rope.forward and dropped after the forward
    key_rotary: Any = None
    #: torch config patched for the duration of one transformer forward (wan.attention.processor.no_custom_op_check)
    forward_context: Any = None
    #: this state's key for the attention op (wan.attention.processor.wan_self_attention), which reaches the state through it
    key: int = dataclasses.field(default_factory=lambda: next(_KEYS))

    def __post_init__(self) -> None:
        STATES[self.key] = self
        self.clock.fallbacks.append(self.fallback)

    @property
    def step(self) -> int:
        """The run's denoising step (every expert's), or under autograd the forward's number."""
        return self.clock.step

    @property
    def recorder(self) -> Any:
        """The optional wan.generate.stats.StatsRecorder of the run (see AttentionRecords.recorder)."""
        return self.records.recorder

    @recorder.setter
    def recorder(self, recorder: Any) -> None:
        self.records.recorder = recorder

    def start_forward(
        self, latents: torch.Tensor, patch_size: tuple[int, int, int], timestep: torch.Tensor, parallel: bool = False
    ) -> None:
        """Read the forward's token grid and step; `parallel`: under context parallelism (attention gets the
        stream split by diffusers, so the processor does not tile).

        `timestep` is [batch], or [batch, tokens] per token (Wan2.2 TI2V, `expand_timesteps`): there the step's
        timestep is the maximum over the first batch element's tokens, the generated frames' (an image-conditioned
        run's first frame carries 0). The grid is the latents' over the patch size whatever the VAE (TI2V's 16x one:
        1280x704 -> 44x80 latents -> 22x40 tokens a frame, which the layout pads to whole tiles).
        """
        T, H, W = (n // p for n, p in zip(latents.shape[2:], patch_size))
        if self.layout is None or self.layout.shape != (T, H, W):
            self.layout = TileLayout(T, H, W)
        self.training = torch.is_grad_enabled()
        self.clock.tick(None if self.training else float(timestep[0].max()))
        self.records.experts[self.step] = self.expert
        # Sparse steps get q, k, v tiled inside the compiled block; dense steps keep them in raster order (the
        # compiled block then has one graph for each, compiled in the warm-up; generate.py warms up both), and so
        # do steps on which every layer skips its mask after falling back to dense (no tiling to undo).
        tiles = self.sparse_now and not (self.pad_dense or parallel) and not self.fallback.all_skip(self.step,
                                                                                                   self.layers)
        on = functools.partial(self.layout.on, latents.device)
        if tiles:
            gather = on("raster_index")
            self.tile_indices = TileIndices(gather, on("tile_index"), on("valid"),
                                            gather.clamp(max=self.layout.length - 1), gather.clone())
        else:
            self.tile_indices = None
        self.key_rotary = None

    @property
    def sparse_now(self) -> bool:
        return self.config.is_sparse and (self.training or self.step >= self.config.dense_steps)

    def mean_density(self, expert: int | None = None) -> float | None:
        """The mean mask density of the run (every expert's calls), or of `expert`'s steps only."""
        return self.records.mean_density(expert)

    def mean_kernel_density(self) -> float | None:
        return self.records.mean_kernel_density()

    def reset(self) -> None:
        """Forget the run: steps, fallbacks and records (of every expert on this state's clock)."""
        self.clock.reset()
        self.records.reset()


_KEYS = itertools.count()
#: every live state by key: the attention op takes the key, not the state (an op's arguments are tensors and numbers)
STATES: weakref.WeakValueDictionary[int, NablaState] = weakref.WeakValueDictionary()
