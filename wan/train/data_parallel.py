"""Data-parallel training under torchrun: the process group, and the transformer sharded by FSDP2.

Each WanTransformerBlock (diffusers' `_no_split_modules`) is one `fully_shard` unit and the root holds the
rest, so one block's weights are gathered at a time. Gradients are averaged over the ranks by FSDP's
reduce-scatter; with one process nothing is sharded and no process group exists.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from typing import NoReturn

import torch
import torch.distributed as dist
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from wan.defaults import local_device
from wan.speedups import gloo_cuda


@dataclasses.dataclass(frozen=True)
class DataParallel:
    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        """`values` summed over the ranks (a copy; itself when there is one process)."""
        if not self.distributed:
            return values
        values = values.clone()
        dist.all_reduce(values)
        return values

    def any(self, flag: bool) -> bool:
        """True on every rank if it is True on one (a stop request must stop all ranks at the same step)."""
        return bool(self.sum(torch.tensor([float(flag)], device=self.device)).item())

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


def init_data_parallel(device: str | None = None, backend: str | None = None) -> DataParallel:
    """Join torchrun's process group (NCCL on GPUs, gloo on CPUs, or `backend`: gloo lets ranks share one GPU) if
    WORLD_SIZE > 1; pick this rank's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available() and (device is None or device.startswith("cuda"))
    if world == 1:
        return DataParallel(0, 1, torch.device(device or ("cuda" if cuda else "cpu")))
    if not dist.is_initialized():
        dist.init_process_group(backend or ("nccl" if cuda else "gloo"))
    rank = dist.get_rank()
    local = local_device(rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(local)
    gloo_cuda.use_c10d_collectives(dist.get_backend())
    return DataParallel(rank, world, local)


def shard_transformer(transformer: torch.nn.Module, compute_dtype: torch.dtype) -> None:
    """FSDP2 over the blocks and the root; weights are gathered in `compute_dtype`, gradients reduced in float32."""
    policy = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
    for block in transformer.blocks:
        fully_shard(block, mp_policy=policy)
    fully_shard(transformer, mp_policy=policy)


def close(parallel: DataParallel) -> None:
    if parallel.distributed and dist.is_initialized():
        dist.destroy_process_group()


def end_worker(code: int) -> NoReturn:
    """End a torchrun worker whose run is over (process group destroyed, files closed) without the interpreter's
    finalization. destroy_process_group does not stop gloo's worker threads: FSDP2's module state and DTensor's caches
    keep the group alive, so its destructor, which joins them, never runs. A worker thread that drops the last
    reference to a finished collective's tensor needs the GIL to free the tensor's Python object; asked for during
    finalization, the GIL ends the thread instead, and a C++ thread ended that way aborts the whole process
    ("terminate called without an active exception"): now and then, on the rank that exits soonest after its last
    collective."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
