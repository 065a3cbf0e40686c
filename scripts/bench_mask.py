"""The mask build against the sparse attention call, as the patched Wan block runs them.

    python scripts/bench_mask.py                    # both Wan shapes, random and local inputs, FLASH where it runs
    python scripts/bench_mask.py --smoke            # a tiny shape on the CPU: checks the script, times nothing real

The mask build starts from the block means of q and k (`make_block_mask(..., means=...)`), which the compiled
block takes in the graph that writes q and k; the sparse call is that plus `flex_attention` on the mask. Each is
timed two ways: "wall", wan.benchmarking's `bench_ms` (`triton.testing.do_bench`) per call; and "GPU", ten
calls queued behind as many matmuls as it takes for the CPU to launch them all before the GPU reaches them
(`gpu_ms`: launch overhead hidden, as in a busy pipeline). Inputs: random q, k at a 10% cap (threshold 0.7,
`max_density` 0.1, bench_e2e's setting), and the locally coherent q, k of bench_attention.py --inputs local
(`local_part`) at a fixed 10% (min = max density; peaked rows, every bisection runs).
The last column is the block means in kernels of their own, what they would cost outside the block.
"""

from __future__ import annotations

import argparse
import sys

import torch

from nabla import SparsityConfig, TileLayout
from nabla.attention import attend
from nabla.backend import resolve_backend
from nabla.block_mask import make_block_mask
from nabla.masks import pool_blocks
from wan.benchmarking import HEAD_DIM, SHAPES, SMOKE_SHAPES, Shape, bench_ms, gpu_ms, local_part

#: (block_size, query_block_size): 128-token blocks, 64-token blocks, 64-token rows in 128-row kernel blocks
BLOCKINGS = ((128, None), (64, None), (64, 128))


def config_for(inputs: str, block_size: int, query_block_size: int | None, backend: str) -> SparsityConfig:
    fixed = inputs == "local"
    return SparsityConfig(mode="nabla", threshold=0.99 if fixed else 0.7, block_size=block_size,
                          query_block_size=query_block_size, min_density=0.1 if fixed else None, max_density=0.1,
                          backend=backend, dense_above=1.0)


def bench_shape(name: str, shape: Shape, inputs: str, device: torch.device, backend: str) -> list[str]:
    """Table rows for one shape and kind of inputs; `backend` as in the YAML (auto, triton, flash)."""
    layout = TileLayout(shape.T, shape.H, shape.W)
    valid = layout.valid_on(device)
    x = [torch.randn(1, shape.heads, layout.length, HEAD_DIM, device=device, dtype=torch.bfloat16) for _ in range(3)]
    if inputs == "local":
        local = local_part(shape, device).to(torch.bfloat16)
        x[0] += local
        x[1] += local
    q, k, v = (layout.tile(t, dim=2) for t in x)
    compiled = device.type == "cuda"
    pool = torch.compile(pool_blocks, dynamic=False) if compiled else pool_blocks
    rows = []
    for block_size, query_block_size in BLOCKINGS:
        config = config_for(inputs, block_size, query_block_size, backend).replace(dense_above=1.0)  # never dense
        means = tuple(pool(t, block_size, valid)[0] for t in (q, k))

        def mask(config=config, means=means):
            return make_block_mask(q, k, layout, config, compiled, means=means)

        def call(config=config, means=means):
            return attend(q, k, v, layout, config, means=means, compiled=compiled).out

        def own_kernels(block_size=block_size):
            return [pool(t, block_size, valid) for t in (q, k)]

        mask_wall, call_wall = (bench_ms(fn, device, 100, cpu_iters=1) for fn in (mask, call))
        mask_gpu, call_gpu = gpu_ms(mask, device), gpu_ms(call, device)
        blocking = str(block_size) if query_block_size is None else f"{block_size} in {query_block_size}"
        rows.append(f"| {name} | {inputs} | {blocking} | {mask_wall:.3f} / {mask_gpu:.3f} | {call_wall:.2f} / "
                    f"{call_gpu:.2f} | {mask_wall / call_wall:.1%} / {mask_gpu / call_gpu:.1%} "
                    f"| {bench_ms(own_kernels, device, 100, cpu_iters=1):.3f} |")
        print(rows[-1], file=sys.stderr, flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description="The mask build against the sparse attention call.")
    parser.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES), help="shapes to run")
    parser.add_argument("--inputs", nargs="+", choices=["random", "local"], default=["random", "local"])
    parser.add_argument("--backend", choices=["auto", "triton", "flash"], default="auto")
    parser.add_argument("--smoke", action="store_true", help="a tiny shape instead (runs on CPU)")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not args.smoke:
        parser.error("the real shapes need CUDA; use --smoke on CPU")
    shapes = SMOKE_SHAPES if args.smoke else {name: SHAPES[name] for name in args.shapes}
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)  # a graph per blocking
    torch.manual_seed(0)
    rows = [row for inputs in args.inputs for name, shape in shapes.items()
            for row in bench_shape(name, shape, inputs, device, args.backend)]
    kernel = resolve_backend(args.backend, device)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"\n## Mask build from the block means vs the sparse call ({kernel}), {device_name}, torch {torch.__version__}")
    print("| shape | inputs | block | mask ms wall / GPU | sparse call ms wall / GPU | mask share wall / GPU "
          "| block means in kernels of their own ms |")
    print("|---|---|---|---:|---:|---:|---:|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
