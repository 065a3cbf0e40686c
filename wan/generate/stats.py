"""Per-call statistics of a sparse run (`generate.py --stats`): mask densities, mask and attention times, masks.

`wan.attention.processor.self_attention` asks the recorder held in `state.recorder` for a timer per sparse
attention call, marks the end of the mask build with `timer.split()` and hands the result to
`record`. Nothing here synchronises the device during the run: on CUDA the times are
torch.cuda.Event pairs and the densities stay on the device until `report()` (one synchronisation at
the end); elsewhere the times come from time.perf_counter (exact on the CPU, where every op finishes
before it returns).

Block masks are kept only for the (step, layer) pairs in `mask_steps`: the first batch element of the
first call of that step and layer (the conditional pass under classifier-free guidance), as bits
packed like `numpy.packbits(mask, axis=-1)` (big bit order): a [heads, nb, nb] mask of 40 x 1260 x 1260
blocks (14B at 720p) is 8 MB packed instead of 64 MB as bool. On CUDA they are copied into pinned host
memory without waiting. `unpack_mask` turns an entry back into a bool tensor.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from wan.io.files import atomic_write, check_target

STATS_VERSION = 1
_BIT_WEIGHTS = (128, 64, 32, 16, 8, 4, 2, 1)


def masks_path(stats_path: str | Path) -> Path:
    """Where the block masks of a stats report go: `NAME.json` -> `NAME.masks.pt` beside it."""
    return Path(stats_path).with_suffix(".masks.pt")


def check_stats_path(path: str | Path, overwrite: bool = False) -> Path:
    """Fail early (before any model loads) on a --stats path that cannot be written, like --output."""
    return check_target(path, ".json", "stats", overwrite, also=[masks_path(Path(path).expanduser())])


def default_mask_steps(dense_steps: int, steps: int) -> tuple[int, ...]:
    """The steps whose masks `--stats` keeps: the first sparse step and the last step (none if all are dense)."""
    if dense_steps >= steps:
        return ()
    return tuple(sorted({dense_steps, steps - 1}))


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """bool [..., n] -> uint8 [..., ceil(n / 8)], bit for bit `numpy.packbits(mask, axis=-1)`, on mask's device."""
    bits = torch.nn.functional.pad(mask.to(torch.uint8), (0, -mask.shape[-1] % 8)).unflatten(-1, (-1, 8))
    weights = torch.tensor(_BIT_WEIGHTS, dtype=torch.uint8, device=mask.device)
    return (bits * weights).sum(-1, dtype=torch.uint8)


def unpack_mask(entry: dict) -> torch.Tensor:
    """A saved mask entry ({"shape": [H, nb, nb], "bits": uint8}) back to bool [H, nb, nb]."""
    shape = tuple(entry["shape"])
    bits = np.unpackbits(entry["bits"].numpy(), axis=-1, count=shape[-1])
    return torch.from_numpy(bits.astype(bool)).reshape(shape)


def load_masks(path: str | Path) -> list[dict]:
    """The mask entries of a `.masks.pt` file: dicts with step, layer, shape, bits (see `unpack_mask`)."""
    data = torch.load(Path(path), map_location="cpu", weights_only=True)
    return data["masks"]


class _Timer:
    """Marks of one attention call: start, end of the mask build (`split`), end of the attention (`stop`)."""

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda
        self.marks: list[Any] = []
        self._mark()

    def _mark(self) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())

    def split(self) -> None:
        self._mark()

    def stop(self) -> _Timer:
        self._mark()
        return self

    def milliseconds(self) -> tuple[float, float]:
        """(mask build, attention) in ms; on CUDA only once the events have completed."""
        start, split, stop = self.marks
        if self.cuda:
            return start.elapsed_time(split), split.elapsed_time(stop)
        return (split - start) * 1e3, (stop - split) * 1e3


class StatsRecorder:
    """Records every sparse attention call of a run; `report()` resolves them into a JSON-ready dict."""

    def __init__(self, mask_steps: Iterable[int] = ()) -> None:
        self.mask_steps = frozenset(mask_steps)
        self.reset()

    def reset(self) -> None:
        #: (step, layer, density [H] on the device, ran dense, timer)
        self.calls: list[tuple[int, int, torch.Tensor, bool, _Timer]] = []
        #: step -> the expert that ran it
        self.experts: dict[int, int] = {}
        #: (step, layer) -> (shape [H, nb, nb], packed bits, on the host or on their way there)
        self.masks: dict[tuple[int, int], tuple[list[int], torch.Tensor]] = {}

    def timer(self, device: torch.device) -> _Timer:
        return _Timer(torch.device(device).type == "cuda")

    def record(
        self, step: int, layer: int, density: torch.Tensor, keep: torch.Tensor, timer: _Timer, ran_dense: bool = False,
        expert: int = 0,
    ) -> None:
        """One call: per-head density [H], block mask keep [B, H, nb, nb], the stopped timer, whether the
        mask was too dense to win so that the call ran dense attention instead, and the expert that ran it (Wan2.2
        A14B: 1 for transformer_2)."""
        self.calls.append((step, layer, density.detach(), ran_dense, timer))
        self.experts[step] = expert
        if step in self.mask_steps and (step, layer) not in self.masks:
            packed = pack_mask(keep[0].detach())
            if packed.is_cuda:  # no wait: the copy completes before report() synchronises
                host = torch.empty(packed.shape, dtype=packed.dtype, pin_memory=True)
                packed = host.copy_(packed, non_blocking=True)
            self.masks[(step, layer)] = (list(keep.shape[1:]), packed)

    def _synchronize(self) -> None:
        if any(timer.cuda for *_, timer in self.calls):
            torch.cuda.synchronize()

    def report(self) -> dict:
        """Per (step, layer): density per head averaged over the calls (CFG passes), times summed; and totals."""
        self._synchronize()
        records: dict[tuple[int, int], dict] = {}
        densities = list(torch.stack([d.float() for _, _, d, _, _ in self.calls]).cpu()) if self.calls else []
        total_mask = total_attention = 0.0
        for (step, layer, _, ran_dense, timer), density in zip(self.calls, densities):
            mask_ms, attention_ms = timer.milliseconds()
            total_mask += mask_ms
            total_attention += attention_ms
            entry = records.setdefault((step, layer), {"step": step, "expert": self.experts[step], "layer": layer,
                                                       "calls": 0, "density": None,
                                                       "dense_calls": 0, "mask_ms": 0.0, "attention_ms": 0.0})
            entry["calls"] += 1
            entry["dense_calls"] += int(ran_dense)
            entry["density"] = density if entry["density"] is None else entry["density"] + density
            entry["mask_ms"] += mask_ms
            entry["attention_ms"] += attention_ms
        out = []
        for key in sorted(records):
            entry = records[key]
            entry["density"] = (entry["density"] / entry["calls"]).tolist()
            out.append(entry)
        mean = float(torch.stack([d.mean() for d in densities]).mean()) if densities else None
        return {
            "steps": sorted({e["step"] for e in out}),
            "layers": sorted({e["layer"] for e in out}),
            "records": out,
            "totals": {"mean_density": mean, "dense_calls": sum(int(ran_dense) for *_, ran_dense, _ in self.calls),
                       "mask_ms": total_mask, "attention_ms": total_attention, "calls": len(self.calls)},
        }

    def mask_entries(self) -> list[dict]:
        self._synchronize()
        return [{"step": s, "layer": l, "shape": shape, "bits": bits.cpu()}
                for (s, l), (shape, bits) in sorted(self.masks.items())]


def _finite(value: Any) -> Any:
    """JSON has no inf/nan: they become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def write_stats(path: str | Path, report: dict, masks: list[dict] | None = None) -> Path:
    """Write the JSON report (and, when `masks` is given, the `.masks.pt` beside it), each atomically."""
    path = Path(path).expanduser()
    if masks is not None:
        mask_file = masks_path(path)
        payload = {"version": STATS_VERSION, "format": "numpy.packbits(mask, axis=-1), bitorder big",
                   "batch_element": 0, "masks": masks}
        atomic_write(mask_file, lambda tmp: torch.save(payload, tmp))
        report = {**report, "masks_file": mask_file.name}
    text = json.dumps(_finite(report), indent=1, allow_nan=False)

    def write_json(tmp: str) -> None:
        Path(tmp).write_text(text + "\n")

    atomic_write(path, write_json)
    return path


def run_report(recorder: StatsRecorder | None, config: Any, settings: Any, **extra: Any) -> dict:
    """The whole JSON report of one run: version, config, settings, `extra` (device, seconds, ...), records, totals.

    `recorder` is None when nothing was patched (mode full): the records are then empty, like a run
    whose steps were all dense.
    """
    resolved = (recorder or StatsRecorder()).report()
    return {
        "version": STATS_VERSION,
        "config": dataclasses.asdict(config),
        "settings": dataclasses.asdict(settings),
        **extra,
        "mask_steps": sorted(recorder.mask_steps) if recorder is not None else [],
        **resolved,
    }


def step_report(passes: list[list[int]], layers: int, experts: dict[int, int] | None = None) -> dict:
    """Which denoising steps ran all their blocks, and which took some or all of them from a step cache.

    `passes` is AttentionRecords.passes (wan/attention/records.py): [step, self-attention calls] per transformer pass (CFG pass) that
    reached the blocks; a pass computed its blocks when it made `layers` calls (both experts of a Wan2.2 pipeline
    have the same number of blocks). `experts` (AttentionRecords.experts) maps a step to the expert that ran it.
    """
    per_step: dict[int, list[int]] = {}
    for step, calls in passes:
        per_step.setdefault(step, []).append(calls)
    computed = [step for step, calls in per_step.items() if all(n == layers for n in calls)]
    experts = experts or {}
    return {  # "blocks", not "layers": run_report's "layers" lists the layers with sparse records
        "blocks": layers,
        "attention_calls": [{"step": step, "expert": experts.get(step, 0), "per_pass": calls}
                            for step, calls in sorted(per_step.items())],
        "computed_steps": sorted(computed),
        "cached_steps": sorted(set(per_step) - set(computed)),
    }
