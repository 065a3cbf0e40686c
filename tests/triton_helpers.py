"""Running Triton kernels without a GPU: by the interpreter in a child process, and through the CUDA front end."""

import contextlib
import functools
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def start_interpreted(code: str, *args: str, threads: int | None = None) -> subprocess.Popen:
    """Start `code` (with `args` in sys.argv) in a child Python under Triton's interpreter; `finish` waits for it.
    A child process: TRITON_INTERPRET must be set before Triton is imported, and only there. `threads`: torch's
    intra-op threads there (its default: one per core)."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    return subprocess.Popen([sys.executable, "-c", code, *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def finish(process: subprocess.Popen) -> str:
    """The stdout of a `start_interpreted` child, which must exit 0."""
    out, err = process.communicate(timeout=600)
    assert process.returncode == 0, err[-3000:]
    return out


def run_interpreted(code: str, *args: str) -> str:
    """`code` under Triton's interpreter, to its end: its stdout."""
    return finish(start_interpreted(code, *args))


@contextlib.contextmanager
def side_by_side(**runs: tuple):
    """Interpreted children started together, {name: (code, *args)}; yields their stdout by name, waiting for each
    on first use. One interpreter keeps one core busy: on CI's two cores, two run in the time of one. Children a
    test selection (-k) left unread are killed at the end."""
    started = {name: start_interpreted(*run, threads=1) for name, run in runs.items()}  # no oversubscribed cores
    try:
        yield functools.cache(lambda name: finish(started[name]))  # a child read by several tests: waited for once
    finally:
        for process in started.values():
            if process.returncode is None:  # not read by `finish`
                process.kill()
                process.communicate()


def make_hopper_ir(kernel, constants: dict, types: dict) -> None:
    """Compile `kernel` to Triton IR for sm_90 on the CPU (the interpreter accepts code that the compiler refuses);
    `types`: Triton types of the non-constexpr arguments by name, "i32" for those not named."""
    from triton._C.libtriton import ir
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import CUDABackend
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", 90, 32)
    backend = CUDABackend(target)
    options = backend.parse_options({})
    context = ir.context()
    ir.load_dialects(context)
    backend.load_dialects(context)
    signature = {name: "constexpr" if name in constants else types.get(name, "i32") for name in kernel.arg_names}
    source = ASTSource(kernel, signature, {(kernel.arg_names.index(k),): v for k, v in constants.items()})
    source.make_ir(target, options, backend.get_codegen_implementation(options), backend.get_module_map(), context)
