"""Training checkpoints that are written whole or not at all, the last K kept, and resumed from the latest.

A checkpoint is a folder `checkpoints/step-NNNNNNNN/`: the trainable weights (`model.safetensors`: the LoRA
parameters, or every weight in full fine-tuning), with EMA their average too (`ema.safetensors`, the same keys), the
AdamW state (`optimizer.pt`) and the step with the LR schedule (`trainer.pt`). Rank 0 writes it into a hidden
temporary folder and renames it into place, so an interruption leaves the previous checkpoints and at most a stray
temporary folder (removed by the next save). The weights, their average and the optimizer state are gathered from the
FSDP shards as full state dicts (torch.distributed.checkpoint.state_dict) and every rank reads the files back and keeps
its own shard.
The noise, the timesteps and the data order are functions of (seed, sample number), so the step alone
restores every random draw.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from wan.train.data_parallel import DataParallel

_NAME = re.compile(r"step-(\d{8})")
EMA_FILE = "ema.safetensors"


def _options(trainable_only: bool) -> StateDictOptions:
    return StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=trainable_only)


def trainable_state(model: torch.nn.Module, trainable_only: bool) -> dict[str, torch.Tensor]:
    """The model's full (unsharded) weights on the CPU: only those that train, with `trainable_only`. Collective."""
    return get_model_state_dict(model, options=_options(trainable_only))


def list_checkpoints(folder: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not folder.is_dir():
        return []
    return sorted((p for p in folder.iterdir() if p.is_dir() and _NAME.fullmatch(p.name)), key=lambda p: p.name)


def chosen_checkpoint(folder: Path, name: str | Path) -> Path:
    """The checkpoint that `--resume NAME` names (a path, or a folder name in `folder`); a one-line ValueError that
    lists the run's checkpoints otherwise."""
    saved = list_checkpoints(folder)
    path = Path(name).expanduser()
    found = next((p for p in saved if p.name == path.name and (path.parent == Path(".") or
                                                              path.resolve() == p.resolve())), None)
    if found is None:
        have = ", ".join(p.name for p in saved) or "none yet"
        raise ValueError(f"resume: {name} is not a checkpoint of this run; it has: {have} (or give --resume alone "
                         "for the latest)")
    return found


def save_checkpoint(folder: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: Any, parallel: DataParallel, trainable_only: bool, keep_last: int,
                    extra: dict | None = None, ema: dict[str, torch.Tensor] | None = None) -> Path:
    """Write checkpoint `step` atomically (with `extra` state, such as the EMA settings, in trainer.pt, and the EMA
    weights `ema`, gathered on rank 0) and delete all but the newest `keep_last`. Collective: call on every rank."""
    weights = trainable_state(model, trainable_only)
    optim = get_optimizer_state_dict(model, optimizer, options=_options(trainable_only))
    target = folder / f"step-{step:08d}"
    if parallel.is_main:
        folder.mkdir(parents=True, exist_ok=True)
        for stray in folder.glob(".step-*.tmp"):
            shutil.rmtree(stray)
        tmp = folder / f".{target.name}.tmp"
        tmp.mkdir()
        save_file({k: v.contiguous() for k, v in weights.items()}, str(tmp / "model.safetensors"))
        if ema is not None:
            save_file({k: v.contiguous() for k, v in ema.items()}, str(tmp / EMA_FILE))
        torch.save(optim, tmp / "optimizer.pt")
        torch.save({"step": step, "scheduler": scheduler.state_dict(), **(extra or {})}, tmp / "trainer.pt")
        if target.exists():  # the same step saved again (a stop right after a scheduled save): replace it
            shutil.rmtree(target)
        tmp.rename(target)
        for old in list_checkpoints(folder)[:-keep_last]:
            shutil.rmtree(old)
    parallel.barrier()  # no rank goes on (or exits) before the checkpoint is in place
    return target


def load_weights(model: torch.nn.Module, path: Path, trainable_only: bool) -> None:
    """Full weights from a safetensors file into `model` (each rank keeps its shards): only the trainable ones, with
    `trainable_only`."""
    set_model_state_dict(model, load_file(str(path)),
                         options=StateDictOptions(full_state_dict=True, strict=not trainable_only))


def load_checkpoint(checkpoint: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                    trainable_only: bool, extra: dict | None = None) -> int:
    """Restore weights, optimizer and LR schedule from `checkpoint` on every rank; returns its step. `extra` receives
    the extra state it was saved with."""
    load_weights(model, checkpoint / "model.safetensors", trainable_only)
    set_optimizer_state_dict(model, optimizer, torch.load(checkpoint / "optimizer.pt", weights_only=True),
                             options=_options(trainable_only))
    state = torch.load(checkpoint / "trainer.pt", weights_only=True)
    scheduler.load_state_dict(state["scheduler"])
    if extra is not None:
        extra.update({k: v for k, v in state.items() if k not in ("step", "scheduler")})
    return int(state["step"])
