"""Ranks sharing one GPU over gloo (`--dist-backend gloo`, a testing aid): torch's functional all-gather on CUDA
tensors over gloo ends in a segmentation fault (in `wait_tensor` after `_c10d_functional.all_gather_into_tensor`),
while c10d's `all_gather` runs there. diffusers' Ulysses gathers the transformer's output and FSDP2's full state
dict gathers its shards through the functional one, and Ulysses' attention exchanges heads for tokens through the
functional all-to-all, so under gloo `use_c10d_collectives` swaps both, process-wide, for c10d's `all_gather` and
`all_to_all_single`: eager (a graph break where traced), the same result. On the CPU too, where the functional ones
run: the CPU's multi-process tests then run the code that two ranks on one GPU run.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.distributed.distributed_c10d as c10d

_NAMES = ("all_gather_tensor", "all_gather_single")  # the deprecated name and its successor; each caller uses one


def gather(tensor: torch.Tensor, gather_dim: int, group: dist.ProcessGroup) -> torch.Tensor:
    """Every rank's `tensor`, in rank order, concatenated along `gather_dim`: what funcol.all_gather_single gives."""
    tensor = tensor.contiguous()
    parts = [torch.empty_like(tensor) for _ in range(group.size())]
    group.allgather([parts], [tensor]).wait()
    return torch.cat(parts, dim=gather_dim)


def process_group(group, tag: str = "") -> dist.ProcessGroup:
    """The ProcessGroup of any group form funcol takes: a ProcessGroup (or a backend such as ProcessGroupGloo), a
    DeviceMesh, (mesh, dim), ranks, a name."""
    if hasattr(group, "allgather"):
        return group
    resolve = getattr(funcol, "_resolve_group", None) or funcol._resolve_group_name
    resolved = resolve(group, tag)
    return resolved if isinstance(resolved, dist.ProcessGroup) else c10d._resolve_process_group(resolved)


def all_gather_c10d(self: torch.Tensor, gather_dim: int, group, tag: str = "") -> torch.Tensor:
    return gather(self, gather_dim, process_group(group, tag))


def all_to_all_single_c10d(self: torch.Tensor, output_split_sizes, input_split_sizes, group,
                           tag: str = "") -> torch.Tensor:
    """What funcol.all_to_all_single gives: dim 0 split by `input_split_sizes` (equal parts when None) and sent in
    rank order, the parts received concatenated, through c10d's all_to_all_single."""
    pg = process_group(group, tag)
    self = self.contiguous()
    rows = sum(output_split_sizes) if output_split_sizes is not None else self.shape[0]
    output = self.new_empty((rows, *self.shape[1:]))
    pg.alltoall_base(output, self, list(output_split_sizes or []), list(input_split_sizes or []),
                     dist.AllToAllOptions()).wait()
    return output


def use_c10d_collectives(backend: str) -> None:
    """Under gloo, route funcol's all-gather and all-to-all through c10d's for the rest of the process (idempotent)."""
    if backend != "gloo":
        return
    for name in _NAMES:
        if hasattr(funcol, name):
            setattr(funcol, name, all_gather_c10d)
    funcol.all_to_all_single = all_to_all_single_c10d
