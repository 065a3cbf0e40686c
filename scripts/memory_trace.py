"""What is alive at the peak of a CUDA memory trace: `torch.cuda.memory._snapshot()` after
`torch.cuda.memory._record_memory_history(...)`, its allocation events replayed to the highest total.

    with recording(): step()          # scripts/bench_train.py --trace-memory
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def recording(max_entries: int = 400_000) -> Iterator[list]:
    """Record the allocations inside the block; the list it yields then holds the snapshot. Python stacks only: with
    C++ stacks the recording failed in a compiled block's recomputation (torch 2.11, "returned NULL")."""
    taken: list = []
    torch.cuda.memory._record_memory_history(max_entries=max_entries, context="alloc", stacks="python")
    try:
        yield taken
        taken.append(torch.cuda.memory._snapshot())
    finally:
        torch.cuda.memory._record_memory_history(enabled=None)


def alive_at_peak(snapshot: dict, device: int = 0) -> tuple[int, list[dict]]:
    """(the highest total of the allocations made while recording, bytes; the allocation events alive then)."""
    events = snapshot["device_traces"][device]
    live, total, peak, at = {}, 0, 0, -1
    for i, event in enumerate(events):
        if event["action"] == "alloc":
            live[event["addr"]] = event["size"]
            total += event["size"]
        elif event["action"] == "free_completed" and event["addr"] in live:
            total -= live.pop(event["addr"])
        if total > peak:
            peak, at = total, i
    alive = {}
    for event in events[: at + 1]:
        if event["action"] == "alloc":
            alive[event["addr"]] = event
        elif event["action"] == "free_completed":
            alive.pop(event["addr"], None)
    return peak, list(alive.values())


def where(event: dict) -> str:
    """The innermost frame of an allocation in the project, diffusers or peft (file:line function), else '?'."""
    for frame in event.get("frames", []):
        name = frame["filename"]
        if any(part in name for part in ("/nabla/", "/wan/", "/scripts/", "/diffusers/", "/peft/")):
            return f"{name.rsplit('/', 1)[-1]}:{frame['line']} {frame['name']}"
    return "?"


def report(snapshot: dict, top: int = 12) -> str:
    """The peak and its largest groups of allocations (by size and where they were made), one line each."""
    peak, alive = alive_at_peak(snapshot)
    groups = Counter((event["size"], where(event)) for event in alive)
    lines = [f"alive at the peak of the traced step: {peak / 2**30:.3f} GiB"]
    for (size, place), count in sorted(groups.items(), key=lambda item: -item[0][0] * item[1])[:top]:
        lines.append(f"  {count:3d} x {size / 2**20:9.2f} MiB  {place}")
    return "\n".join(lines)
