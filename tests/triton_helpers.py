"""Running Triton kernels without a GPU: by the interpreter in one child process for the suite, and through the CUDA
front end."""

import contextlib
import importlib
import io
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


#: every check run under Triton's interpreter: its name, the test module holding its script, the script's parts, and
#: whether it takes a tiny Wan model's folder (sys.argv[1]); in the order they run, that of the test files
INTERPRETED = {
    "cdf-cut": ("test_cdf_select", ("CHECK",), False),
    "cdf-indices": ("test_cdf_select", ("CHECK_INDICES",), False),
    "logits": ("test_logits_kernel", ("CHECK",), False),
    "tiled-qk": ("test_tiled_qk", ("CHECK", "CHECK_GRAD"), False),
    "tiled-qk-processor": ("test_tiled_qk", ("CHECK_PROCESSOR",), True),
    "tiled-qk-training": ("test_tiled_qk", ("CHECK_TRAINING",), True),
}


def start_checks(names: list[str], folder: Path) -> subprocess.Popen:
    """One child process that runs the named checks one after another under Triton's interpreter (TRITON_INTERPRET
    must be set before Triton is imported, and only there), each writing NAME.out and then NAME.status into `folder`.
    One process pays the imports once, and on one thread it runs beside the in-process tests."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    code = "import sys; from tests.triton_helpers import run_checks; run_checks(sys.argv[1], sys.argv[2:])"
    with open(folder / "stderr", "w") as err:  # a file: a full pipe would stall the child until read
        return subprocess.Popen([sys.executable, "-c", code, str(folder), *names], cwd=ROOT, env=env,
                                stdout=subprocess.DEVNULL, stderr=err)


def run_checks(folder: str, names: list[str]) -> None:
    """In the child: each check's script run to its end (a failure is written down, and the next check runs), at the
    lowest priority: on the CPU the in-process tests leave idle, and at full speed once a test waits for it."""
    os.nice(19)
    folder, model = Path(folder), None
    for name in names:
        module, parts, takes_model = INTERPRETED[name]
        if takes_model and model is None:
            from wan.models.tiny import save_tiny_model

            model = str(save_tiny_model(folder / "tiny_wan", seed=0))  # the suite's tiny_model, made alike
        script = "".join(getattr(importlib.import_module(f"tests.{module}"), part) for part in parts)
        sys.argv = ["-c", *([model] if takes_model else [])]
        out = io.StringIO()
        try:
            with contextlib.redirect_stdout(out):
                exec(compile(script, f"<{name}>", "exec"), {"__name__": "__main__"})  # noqa: S102 (the tests' own)
            status = "ok"
        except Exception:  # noqa: BLE001 (an assertion or any error: the test reads it)
            status = traceback.format_exc()
        (folder / f"{name}.out").write_text(out.getvalue())
        (folder / f"{name}.status.tmp").write_text(status)
        (folder / f"{name}.status.tmp").rename(folder / f"{name}.status")  # last: the test waits for it


def read_check(process: subprocess.Popen, folder: Path, name: str, timeout: float = 900) -> str:
    """The stdout of check `name` of `start_checks`'s child, once it has run; it must have passed."""
    status, deadline = folder / f"{name}.status", time.monotonic() + timeout
    while not status.exists():
        if process.poll() is not None and not status.exists():  # looked at again: written just before it exited
            raise AssertionError(f"the interpreted checks' process exited {process.returncode} before {name}: "
                                 f"{(folder / 'stderr').read_text()[-3000:]}")
        assert time.monotonic() < deadline, f"{name}: not done after {timeout} s"
        time.sleep(0.2)
    assert status.read_text() == "ok", status.read_text()[-3000:]
    return (folder / f"{name}.out").read_text()


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
