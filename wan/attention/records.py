"""What a NABLA run records per attention call: mask densities, dense fallbacks, attention calls per pass."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from nabla.attention import AttentionResult


@dataclasses.dataclass
class AttentionRecords:
    """The record of one run (cleared by `reset`)."""

    #: (step, layer, density per head [H] on the device) for every sparse attention call that built a mask
    densities: list[tuple[int, int, torch.Tensor]] = dataclasses.field(default_factory=list)
    #: per call that ran the sparse kernel, the fraction of blocks it computed per head [H]: the mask density, or
    #: more where kernel query blocks merge mask rows (config.query_block_size)
    kernel_densities: list[torch.Tensor] = dataclasses.field(default_factory=list)
    #: (step, layer) of sparse calls run dense instead: their mask was too dense for the sparse kernel to win, or
    #: the layer's was within the last steps (then no mask is built; wan.attention.fallback)
    dense_fallbacks: list[tuple[int, int]] = dataclasses.field(default_factory=list)
    #: [step, self-attention calls] per transformer pass that reached the blocks; fewer calls than layers mean the
    #: other blocks came from a step cache (wan/speedups/cache.py)
    passes: list[list[int]] = dataclasses.field(default_factory=list)
    #: step -> the expert that ran it (wan.attention.state.NablaState.expert; 0 for a pipeline of one transformer)
    experts: dict[int, int] = dataclasses.field(default_factory=dict)
    #: optional wan.generate.stats.StatsRecorder: times mask build and attention per call, keeps chosen masks
    recorder: Any = None

    def start_pass(self, step: int) -> None:
        self.passes.append([step, 0])

    def count_call(self) -> None:
        if self.passes:  # a processor called outside a transformer forward belongs to no pass
            self.passes[-1][1] += 1

    def add(self, step: int, layer: int, result: AttentionResult, timer: Any = None) -> None:
        """Record one call of `nabla.attention.attend` (and its timer, where the recorder gave one)."""
        density = result.density
        self.densities.append((step, layer, density))
        if result.dense:
            self.dense_fallbacks.append((step, layer))
        else:
            self.kernel_densities.append(result.kernel_density)
        if timer is not None:
            self.recorder.record(step, layer, density, result.mask, timer, result.dense, self.experts.get(step, 0))

    def mean_density(self, expert: int | None = None) -> float | None:
        """The mean fraction of blocks the masks kept, over calls and heads (None without sparse calls); with
        `expert`, over the steps that expert ran."""
        return _mean([d for step, _, d in self.densities if expert is None or self.experts.get(step, 0) == expert])

    def mean_kernel_density(self) -> float | None:
        """The mean fraction of blocks the sparse kernel computed (None where it never ran)."""
        return _mean(self.kernel_densities)

    def reset(self) -> None:
        for records in (self.densities, self.kernel_densities, self.dense_fallbacks, self.passes, self.experts):
            records.clear()
        if self.recorder is not None:
            self.recorder.reset()


def _mean(per_head: list[torch.Tensor]) -> float | None:
    return float(torch.stack([d.float().mean() for d in per_head]).mean()) if per_head else None
