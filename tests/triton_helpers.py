"""Running Triton kernels without a GPU: by the interpreter in a child process, and through the CUDA front end."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_interpreted(code: str, *args: str) -> str:
    """Run `code` (with `args` in sys.argv) in a child Python under Triton's interpreter; returns its stdout.
    A child process: TRITON_INTERPRET must be set before Triton is imported, and only there."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


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
