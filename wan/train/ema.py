"""An exponential moving average of the trainable weights (diffusers' EMAModel: its decay warm-up and state), sharded
as the weights are.

Under FSDP2 each rank averages its own shards (the shadow weights are DTensors like the parameters they follow), so
no step communicates. To save or export, the average is swapped into the parameters for a moment and gathered as the
raw weights are; to resume, the saved full weights are read back into the parameters (each rank keeping its shards)
and copied into the shadows.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from diffusers.training_utils import EMAModel

from wan.train.checkpoints import load_weights, trainable_state


class WeightAverage:
    """The EMA of `model`'s trainable parameters."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.model = model
        self.average = EMAModel(self.parameters(), decay=decay)

    def parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def step(self) -> None:
        self.average.step(self.parameters())

    @contextmanager
    def in_place(self) -> Iterator[None]:
        """The averaged weights in the model's parameters for the duration; the raw ones back after. The raw copy stays
        on the parameters' device (EMAModel.store moves it to the CPU, where a CUDA DTensor cannot copy from)."""
        params = self.parameters()
        raw = [p.detach().clone() for p in params]
        _copy(params, self.average.shadow_params)
        try:
            yield
        finally:
            _copy(params, raw)

    def full_state(self, trainable_only: bool) -> dict[str, torch.Tensor]:
        """The averaged weights, gathered and keyed as `trainable_state` keys the raw ones. Collective."""
        with self.in_place():
            state = trainable_state(self.model, trainable_only)
            # unsharded on the CPU, the state dict holds the parameters themselves, which the swap back overwrites
            live = {p.data_ptr() for p in self.model.parameters()}
            return {k: v.clone() if v.data_ptr() in live else v for k, v in state.items()}

    def settings(self) -> dict:
        """EMAModel's state without the weights (its step count sets the decay warm-up)."""
        return {k: v for k, v in self.average.state_dict().items() if k != "shadow_params"}

    def load(self, weights: Path, settings: dict, trainable_only: bool) -> None:
        """Restore from `full_state`'s file and `settings`: each rank reads the full weights into its own shards.
        Collective."""
        params = self.parameters()
        raw = [p.detach().clone() for p in params]
        try:
            load_weights(self.model, weights, trainable_only)
            self.average.shadow_params = [p.detach().clone() for p in params]
        finally:
            _copy(params, raw)
        self.average.load_state_dict(settings)


@torch.no_grad()
def _copy(targets: list[torch.Tensor], sources: list[torch.Tensor]) -> None:
    for target, source in zip(targets, sources, strict=True):
        target.copy_(source)
