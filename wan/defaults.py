"""What generation and training share before any model loads: the default model, the size limits, the device, and
the shipped configs (package data of `wan`; in a checkout a link to the top-level configs/)."""

from __future__ import annotations

import argparse
import os
import re
from pathlib import Path

DEFAULT_MODEL = "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"
MAX_SIDE = 2048  # pixels; 720p is 1280 wide
MAX_FRAMES = 241
CONFIG_DIR = Path(__file__).resolve().parent / "configs"


def shipped_configs(kind: str | None = None) -> list[str]:
    """Names of the configs that come with the package (`--config NAME`): all, or those of `generate` or
    `finetune` (the finetune-*.yaml ones)."""
    names = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
    if kind is None:
        return names
    return [name for name in names if name.startswith("finetune-") == (kind == "finetune")]


def find_config(config: str | Path) -> Path:
    """A config file: the path if it exists, else the shipped config of that name (`nabla-0.7` or `nabla-0.7.yaml`).

    A missing file is a one-line ValueError that lists the shipped names.
    """
    path = Path(config).expanduser()
    if path.exists():
        return path
    names = ", ".join(shipped_configs())
    if path.parent != Path("."):  # a path with a folder part means that file, not a name
        raise ValueError(f"config: file not found: {path}; or give a shipped config by name: {names}")
    shipped = CONFIG_DIR / (path.name if path.suffix == ".yaml" else f"{path.name}.yaml")
    if not shipped.is_file():
        raise ValueError(f"config: {str(config)!r} is neither a file nor a shipped config; shipped: {names}")
    return shipped


def check_device(device: str | None) -> str:
    """The device to run on: `device` (cpu, cuda or cuda:N, for a GPU this machine has), else cuda if there is
    one, else cpu. Anything else is a one-line ValueError that says what this machine has."""
    import torch  # here, not at import: wan.defaults serves checks that must stay light

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus:
        has = f"{gpus} CUDA GPU{'s' if gpus > 1 else ''}: cuda, " + ", ".join(f"cuda:{i}" for i in range(gpus))
    else:
        has = "no CUDA GPU, so only cpu"
    if device is None:
        return "cuda" if gpus else "cpu"
    match = re.fullmatch(r"(cpu|cuda)(?::(\d+))?", device)
    if match is None or (match[1] == "cpu" and match[2] is not None):
        raise ValueError(f"--device {device!r} is not allowed; allowed: cpu, cuda or cuda:N (this machine has {has})")
    if match[1] == "cuda" and (not gpus or int(match[2] or 0) >= gpus):
        raise ValueError(f"--device {device!r} is not available; this machine has {has}")
    return device


class OneLineParser(argparse.ArgumentParser):
    """argparse whose refusals (an unknown flag, a value of the wrong type, a missing argument) are one line on
    stderr and exit code 2, as every other bad input of the commands; --help still prints the whole usage."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def local_device(rank: int) -> torch.device:  # noqa: F821 (torch is imported lazily)
    """This rank's GPU: LOCAL_RANK's, wrapped round the GPUs there are."""
    import torch

    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)) % torch.cuda.device_count())


DIST_BACKENDS = ("nccl", "gloo")
DIST_BACKEND_HELP = ("torchrun's collective backend (default: nccl on GPUs, gloo on the CPU); gloo lets several ranks "
                     "share one GPU, a testing aid that runs the multi-GPU CUDA paths on one GPU, slowly")
