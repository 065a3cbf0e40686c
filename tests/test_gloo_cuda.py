"""The all-gather that stands in for torch's functional one when ranks share a GPU over gloo: two gloo ranks, as
threads of this process on the CPU, give what funcol.all_gather_single gives (rank order, any gather dim)."""

import datetime
import threading

import pytest
import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol

from wan.speedups import gloo_cuda


def two_ranks(work):
    """`work(rank, group)` on two gloo ranks (threads sharing a HashStore); the results by rank."""
    store, results, errors = dist.HashStore(), {}, []

    def rank(r):
        try:
            results[r] = work(r, dist.ProcessGroupGloo(store, r, 2, datetime.timedelta(seconds=60)))
        except Exception as error:  # noqa: BLE001 - re-raised in the test's thread
            errors.append(error)

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    if errors:
        raise errors[0]
    return results


@pytest.mark.parametrize("dim", [0, 1, 2])
def test_gather_concatenates_in_rank_order(dim):
    shards = [torch.randn(3, 4, 5, dtype=torch.bfloat16).transpose(1, 2) for _ in range(2)]  # not contiguous
    results = two_ranks(lambda r, group: gloo_cuda.all_gather_c10d(shards[r], dim, group))
    expected = torch.cat(shards, dim=dim)
    assert all(torch.equal(results[r], expected) for r in range(2))


def test_swap_under_gloo_only(monkeypatch):
    for name in ("all_gather_tensor", "all_gather_single"):
        monkeypatch.setattr(funcol, name, getattr(funcol, name), raising=False)
    gloo_cuda.use_c10d_all_gather("nccl")
    assert funcol.all_gather_single is not gloo_cuda.all_gather_c10d
    gloo_cuda.use_c10d_all_gather("gloo")
    assert funcol.all_gather_single is gloo_cuda.all_gather_c10d
    assert funcol.all_gather_tensor is gloo_cuda.all_gather_c10d
