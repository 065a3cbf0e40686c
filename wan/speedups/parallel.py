"""Multi-GPU sampling on diffusers' context parallelism: Ulysses sequence parallel and CFG parallel.

Launched by torchrun (`torchrun --nproc_per_node=N generate.py ... --ulysses U [--cfg-parallel]`,
N = U, or 2U with --cfg-parallel). Ranks form a (cfg, ring, ulysses) device mesh: each CFG group
of U ranks runs diffusers' Ulysses context parallelism (the transformer's `_cp_plan` hooks split
the sequence at the first block and gather it at proj_out; all-to-alls around attention give each
rank the whole sequence for U-th of the heads). With --cfg-parallel the conditional and the
unconditional pass run at once on the two groups, and rank i of one group swaps its prediction
with rank i of the other.

NABLA composes with this: its processor runs NABLA between diffusers' two all-to-alls, on the whole
sequence (put in tile order there) and this rank's heads. A sequence that the degree does not divide
runs in padded tile order end to end instead (the patch tiles it before the split and untiles it
after the gather), which splits evenly.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import torch
import torch.distributed as dist
from diffusers import ContextParallelConfig, WanTransformer3DModel
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from wan.defaults import local_device
from wan.speedups import gloo_cuda


@dataclasses.dataclass
class ParallelSetup:
    rank: int
    world_size: int
    ulysses: int
    cfg_parallel: bool
    device: torch.device
    mesh: DeviceMesh

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def cfg_rank(self) -> int:
        """0: this rank runs the conditional pass, 1: the unconditional one."""
        return self.rank // self.ulysses if self.cfg_parallel else 0


def allowed_degrees(heads: int) -> list[int]:
    return [d for d in range(1, heads + 1) if heads % d == 0]


def check_degree(heads: int, ulysses: int) -> None:
    if ulysses < 1 or heads % ulysses:
        raise ValueError(
            f"--ulysses {ulysses} does not divide the model's {heads} attention heads; "
            f"allowed degrees: {', '.join(map(str, allowed_degrees(heads)))}"
        )


def check_sequence(tokens: int, ulysses: int, what: str) -> None:
    if tokens % ulysses:
        raise ValueError(f"--ulysses {ulysses} does not divide the {tokens} {what}; choose a degree that divides it")


def init_parallel(ulysses: int, cfg_parallel: bool, backend: str | None = None) -> ParallelSetup:
    """Join the torchrun process group (NCCL on GPUs, gloo on CPUs, or `backend`) and build the device mesh.

    Ranks take GPUs round-robin: with `backend="gloo"` several ranks may share one GPU (NCCL refuses that), which
    runs every multi-GPU CUDA path on a machine with one GPU.
    """
    expected = ulysses * (2 if cfg_parallel else 1)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world != expected:
        how = f"--ulysses {ulysses}" + (" --cfg-parallel" if cfg_parallel else "")
        raise ValueError(
            f"{how} needs {expected} processes (torchrun --nproc_per_node={expected} generate.py ...), "
            f"got WORLD_SIZE={world}"
        )
    cuda = torch.cuda.is_available()
    if not dist.is_initialized():
        dist.init_process_group(backend or ("nccl" if cuda else "gloo"))
    rank = dist.get_rank()
    device = local_device(rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    gloo_cuda.use_c10d_collectives(dist.get_backend())
    mesh = init_device_mesh(device.type, (2 if cfg_parallel else 1, 1, ulysses), mesh_dim_names=("cfg", "ring", "ulysses"))
    return ParallelSetup(rank, world, ulysses, cfg_parallel, device, mesh)


def enable_ulysses(transformer: WanTransformer3DModel, setup: ParallelSetup) -> None:
    """diffusers' Ulysses context parallelism over this rank's CFG group (after any NABLA patch)."""
    if setup.ulysses == 1:
        return
    config = ContextParallelConfig(ulysses_degree=setup.ulysses, mesh=setup.mesh["ring", "ulysses"])
    count = torch.accelerator.device_count
    if setup.device.type == "cpu":
        # diffusers 0.42.1 takes `rank % torch.accelerator.device_count()`, which is 0 without one.
        torch.accelerator.device_count = lambda: 1
    try:
        transformer.enable_parallelism(config=config)
    finally:
        torch.accelerator.device_count = count


def enable_cfg_parallel(transformer: WanTransformer3DModel, setup: ParallelSetup) -> None:
    """Run only this rank's CFG pass; swap predictions with the partner rank of the other group.

    WanPipeline calls the transformer twice per step, conditional first, then unconditional. The
    rank whose pass it is not returns a buffer that the swap after the second call fills in place,
    before the pipeline combines the two.
    """
    partners = [dist.new_group([i, i + setup.ulysses]) for i in range(setup.ulysses)]  # every rank makes every group
    pair = partners[setup.rank % setup.ulysses]
    inner = transformer.forward
    state: dict[str, Any] = {"calls": 0, "cond": None}

    def forward(*args: Any, **kwargs: Any) -> tuple[torch.Tensor]:
        if kwargs.get("return_dict", True):
            raise ValueError("CFG parallel needs the transformer called with return_dict=False (as WanPipeline does)")
        branch = state["calls"] % 2
        state["calls"] += 1
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        out = inner(*args, **kwargs)[0] if branch == setup.cfg_rank else torch.empty_like(hidden)
        if branch == 0:
            state["cond"] = out
            return (out,)
        gathered = [torch.empty_like(out), torch.empty_like(out)]
        dist.all_gather(gathered, state["cond"] if setup.cfg_rank == 0 else out, group=pair)
        state["cond"].copy_(gathered[0])  # in place: the pipeline already holds this tensor
        state["cond"] = None
        return (gathered[1],)

    transformer.forward = forward
