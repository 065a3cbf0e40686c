"""The all-gather and all-to-all that stand in for torch's functional ones when ranks share a GPU over gloo: two gloo
ranks, as threads of this process on the CPU, give what funcol's give (rank order, any gather dim, uneven splits)."""

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


@pytest.mark.parametrize("splits", [None, [1, 3]])
def test_all_to_all_sends_each_rank_its_part(splits):
    """Rank r gets part r of every rank's rows, in rank order (equal parts, or the rows `splits` gives each rank)."""
    shards = [torch.randn(4, 3, 2).transpose(1, 2) for _ in range(2)]  # not contiguous
    sizes = splits or [2, 2]
    received = [[splits[r]] * 2 if splits else None for r in range(2)]
    results = two_ranks(lambda r, group: gloo_cuda.all_to_all_single_c10d(shards[r], received[r], splits, group))
    for r in range(2):
        expected = torch.cat([shard.split(sizes)[r] for shard in shards])
        assert torch.equal(results[r], expected)


def test_swap_under_gloo_only(monkeypatch):
    for name in ("all_gather_tensor", "all_gather_single", "all_to_all_single"):
        monkeypatch.setattr(funcol, name, getattr(funcol, name), raising=False)
    gloo_cuda.use_c10d_collectives("nccl")
    assert funcol.all_gather_single is not gloo_cuda.all_gather_c10d
    gloo_cuda.use_c10d_collectives("gloo")
    assert funcol.all_gather_single is gloo_cuda.all_gather_c10d
    assert funcol.all_gather_tensor is gloo_cuda.all_gather_c10d
    assert funcol.all_to_all_single is gloo_cuda.all_to_all_single_c10d
