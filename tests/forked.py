"""Scripts run as `python SCRIPT ARGS` or `torchrun --standalone --nproc_per_node=N SCRIPT ARGS` runs them, in
processes forked from a server that imported torch, diffusers, transformers and peft once (multiprocessing's
forkserver with a preload). A fresh interpreter pays those imports again, one core's seconds each: on CI's two
cores they were most of what the multi-process tests cost. The script runs unchanged as `__main__`, with its own
argv, working directory, environment and, per rank, the variables torchrun sets; its exit code, stdout and stderr
come back as subprocess's. What this skips is the launcher itself, torch's own: tests/test_gpu_parallel.py runs the
commands through torchrun, on a GPU.
"""

from __future__ import annotations

import multiprocessing
import os
import runpy
import socket
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from multiprocessing import forkserver
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# what the scripts import at their top, heaviest first; a module that fails to import is left to the child
PRELOAD = ["torch", "torch._inductor.utils", "torch.distributed.fsdp", "diffusers", "transformers", "peft",
           "wan.generate.cli", "wan.train.cli", "wan.models.tiny", "wan.benchmarking"]
_CONTEXT = multiprocessing.get_context("forkserver")
_STARTED: list[Run] = []


def start_server() -> None:
    """Start the server now, so that its imports run beside the in-process tests; later starts reuse it. The
    environment it starts with is each child's base: HF_HUB_OFFLINE, read once at import, is set there."""
    _CONTEXT.set_forkserver_preload(PRELOAD)
    saved = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        forkserver.ensure_running()
    finally:
        if saved is None:
            del os.environ["HF_HUB_OFFLINE"]
        else:
            os.environ["HF_HUB_OFFLINE"] = saved


def _child(script: str, args: list[str], env: dict[str, str], out: str, err: str, nice: int) -> None:
    """A forked child's body: the script as `python SCRIPT ARGS` would run it, output to the two files."""
    os.nice(nice)
    for fd, path in ((1, out), (2, err)):
        handle = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(handle, fd)
        os.close(handle)
    os.environ.update(env)
    os.chdir(ROOT)
    import torch
    import tqdm

    # the server imported torch without running a parallel region: the thread count may still be chosen
    torch.set_num_threads(int(env.get("OMP_NUM_THREADS", os.cpu_count() or 1)))
    # tqdm's default lock holds multiprocessing semaphores, which a forked child's exit leaves to the resource
    # tracker to clean up (with a warning at the suite's end); one process needs a thread lock only
    tqdm.tqdm.set_lock(threading.RLock())
    sys.argv = [script, *args]
    sys.path.insert(0, str((ROOT / script).parent))
    runpy.run_path(str(ROOT / script), run_name="__main__")


@dataclass
class Run:
    """Ranks being started (by a thread: a start waits for the server's imports) or started."""

    command: list[str]
    folder: Path
    processes: list = field(default_factory=list)
    starting: threading.Thread | None = None

    def wait(self, timeout: float) -> subprocess.CompletedProcess:
        """Every rank's end; the first non-zero exit code (rank order), and the ranks' stdout and stderr, each
        rank's in turn (torchrun interleaves them)."""
        self.starting.join()
        for process in self.processes:
            process.join(timeout)
            if process.exitcode is None:
                self.kill()
                raise subprocess.TimeoutExpired(self.command, timeout)
        codes = [process.exitcode for process in self.processes]
        code = next((c for c in codes if c), 0)
        read = [_text(self.folder / f"{rank}.{name}") for name in ("out", "err") for rank in range(len(self.processes))]
        half = len(self.processes)
        return subprocess.CompletedProcess(self.command, code, "".join(read[:half]), "".join(read[half:]))

    def kill(self) -> None:
        self.starting.join()
        for process in self.processes:
            if process.exitcode is None:
                process.kill()
                process.join()


def _text(path: Path) -> str:
    return path.read_text() if path.exists() else ""  # a child that died before it opened its files


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start(script: str, args: list[str], folder: Path, procs: int = 0, env: dict[str, str] | None = None,
          nice: int = 0) -> Run:
    """`python SCRIPT ARGS` (procs 0) or torchrun's `--nproc_per_node=procs` ranks of it, starting now; outputs under
    `folder`. `env` adds to the server's environment; `nice` lowers the children's priority (19: the CPU the
    in-process tests leave idle)."""
    start_server()  # a no-op once it runs
    folder.mkdir(parents=True, exist_ok=True)
    launcher = ["torchrun", f"--nproc_per_node={procs}"] if procs else ["python"]
    launched = Run([*launcher, script, *args], folder)
    port = _free_port()

    def start_ranks() -> None:
        for rank in range(max(procs, 1)):
            rank_env = dict(env or {})
            if procs:
                rank_env |= {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(procs),
                             "LOCAL_WORLD_SIZE": str(procs), "GROUP_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                             "MASTER_PORT": str(port)}
            files = [str(folder / f"{rank}.{name}") for name in ("out", "err")]
            process = _CONTEXT.Process(target=_child, args=(script, args, rank_env, *files, nice))
            process.start()
            launched.processes.append(process)

    launched.starting = threading.Thread(target=start_ranks, daemon=True)
    launched.starting.start()
    _STARTED.append(launched)
    return launched


def stop_all() -> None:
    """Every run still going is killed (the session's end: else multiprocessing would wait for them at exit)."""
    for launched in _STARTED:
        launched.kill()


def run(script: str, args: list[str], folder: Path, procs: int = 0, env: dict[str, str] | None = None,
        timeout: float = 600) -> subprocess.CompletedProcess:
    return start(script, args, folder, procs, env).wait(timeout)
