"""The dense-fallback policy: a layer whose mask was too dense to win stays dense for a few steps."""

from __future__ import annotations

import dataclasses

#: steps for which a layer that fell back to dense attention stays dense without building a mask; doubled at
#: each further fallback in a row (a mask too dense at 4 checks in a row is checked again 60 steps later)
FALLBACK_STEPS = 4


@dataclasses.dataclass
class DenseFallback:
    """Masks change slowly over the denoising steps: a layer that fell back skips building its mask for a while
    (dense attention is a superset of any mask, so it never attends less)."""

    #: layer -> first step at which it builds a mask again
    dense_until: dict[int, int] = dataclasses.field(default_factory=dict)
    #: layer -> its fallbacks in a row (each doubles the steps it then skips its mask)
    streak: dict[int, int] = dataclasses.field(default_factory=dict)

    def skips(self, step: int, layer: int) -> bool:
        """Whether `layer` runs dense at `step` without building a mask."""
        return step < self.dense_until.get(layer, -1)

    def all_skip(self, step: int, layers: int) -> bool:
        """Whether every one of `layers` layers runs dense at `step` without building a mask."""
        return 0 < layers == len(self.dense_until) and all(step < until for until in self.dense_until.values())

    def update(self, step: int, layer: int, ran_dense: bool) -> None:
        """After `layer` built its mask at `step`: whether the mask was too dense and dense attention ran."""
        if ran_dense:
            streak = self.streak[layer] = self.streak.get(layer, 0) + 1
            self.dense_until[layer] = step + FALLBACK_STEPS * 2 ** (streak - 1)
        else:
            self.streak.pop(layer, None)

    def reset(self) -> None:
        self.dense_until.clear()
        self.streak.clear()
