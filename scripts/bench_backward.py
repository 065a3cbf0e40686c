"""Benchmark NABLA attention forward + backward (training) against dense SDPA forward + backward at Wan2.1 shapes.

Each sparse row is one call of `nabla.attention.attend` on the padded tile-ordered q, k, v that require grad, mask
build included, then `torch.autograd.grad` of its output; dense rows are SDPA on the real tokens in raster order,
and on the padded tile-ordered sequence (the length the sparse kernel runs).
Sparse rows keep a fixed 10% of the blocks (NABLA with min = max density). Each is timed two ways: "wall",
`bench_ms` per call (`triton.testing.do_bench`: calls queued back to back, so launches show only where a call's CPU
time nears its GPU time); and "GPU", ten calls queued behind matmuls that outlast their launches (`gpu_ms`). Before
timing, the gradients of each backend are checked against a float32 SDPA under the same token-level mask on 2 heads
of the same sequence. `--profile` adds where one lone call's time goes (torch.profiler: the kernels by name, and the
time the device sat idle between the call's start and its last kernel). The markdown tables are printed last and,
when $OUT is set, also written to $OUT/bench_backward.md.

    python scripts/bench_backward.py                       # both shapes, 128- and 64-token blocks, on CUDA
    python scripts/bench_backward.py --shapes 14B-720p --backends flash --profile
    python scripts/bench_backward.py --smoke               # tiny shape, few iterations (runs on CPU)
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from nabla.attention import attend
from nabla.config import SparsityConfig
from nabla.layout import TileLayout
from wan.benchmarking import (
    HEAD_DIM,
    SHAPES,
    SMOKE_SHAPES,
    Profile,
    Shape,
    add_backends_option,
    bench_ms,
    chosen_backends,
    fixed_density,
    gpu_ms,
    log,
    masked_reference,
    profile_call,
    warm_up,
)

DENSITY = 0.1
TARGETS = {"14B-720p": 9.0, "1.3B-480p": 6.0}  # issue 24: FLASH, 128-token blocks, mask build included


@dataclass
class Row:
    shape: str
    kernel: str
    forward_ms: float | None = None
    total_ms: float | None = None  # forward (mask build included) + backward
    speedup: float | None = None  # dense SDPA forward + backward / total
    gpu_total_ms: float | None = None  # the same, launches hidden (`gpu_ms`)
    gpu_speedup: float | None = None
    note: str = ""
    profile: Profile | None = None  # --profile


def grad_check(config: SparsityConfig, shape: Shape, device: torch.device) -> float:
    """Max |grad - reference| / max |reference| over q, k, v: 2 heads, bf16 kernel vs float32 reference, same mask."""
    layout = TileLayout(shape.T, shape.H, shape.W)
    q, k, v = (layout.tile(torch.randn(1, 2, layout.length, HEAD_DIM, device=device), dim=2).bfloat16()
               .requires_grad_() for _ in range(3))
    result = attend(q, k, v, layout, config)
    real = layout.valid_on(device)
    grad_out = torch.randn_like(q)
    grads = torch.autograd.grad(result.out[:, :, real], (q, k, v), grad_out[:, :, real])
    _, refs = masked_reference(q, k, v, result.mask, layout, config, grad_out)
    return max(((g.float() - r).abs().max() / r.abs().max()).item() for g, r in zip(grads, refs))


def bench_shape(
    name: str, shape: Shape, device: torch.device, backends: list[str], rep_ms: int, profiled: bool = False
) -> list[Row]:
    layout = TileLayout(shape.T, shape.H, shape.W)
    log(f"{name}: {shape.heads} heads, {layout.length} tokens ({layout.padded_length} padded)")
    raster = [torch.randn(1, shape.heads, layout.length, HEAD_DIM, device=device, dtype=torch.bfloat16,
                          requires_grad=True) for _ in range(3)]
    tiled = [layout.tile(x.detach(), dim=2).requires_grad_() for x in raster]
    grad_raster, grad_tiled = torch.randn_like(raster[0]), torch.randn_like(tiled[0])

    def timed(row: Row, forward, inputs, grad_out) -> None:
        def both():
            torch.autograd.grad(forward(), inputs, grad_out)

        with torch.no_grad():
            warm_up(forward, device)
        warm_up(both, device)
        with torch.no_grad():
            row.forward_ms = bench_ms(forward, device, rep_ms, cpu_iters=2)
        row.total_ms, row.gpu_total_ms = bench_ms(both, device, rep_ms, cpu_iters=2), gpu_ms(both, device)
        row.profile = profile_call(both, device) if profiled else None

    dense = Row(name, "dense SDPA")
    timed(dense, lambda: F.scaled_dot_product_attention(*raster), raster, grad_raster)
    # The first probe's 9.48x (docs/GPU-FACTS.md) was against dense SDPA on the padded tile-ordered sequence (80,640
    # tokens at 14B 720p); the speedups here are against dense on the real tokens, which the unpatched model runs.
    padded = Row(name, "dense SDPA on the padded tokens")
    timed(padded, lambda: F.scaled_dot_product_attention(*tiled), tiled, grad_tiled)
    padded.speedup, padded.gpu_speedup = dense.total_ms / padded.total_ms, dense.gpu_total_ms / padded.gpu_total_ms
    padded.note = f"{layout.padded_length} tokens: the length the sparse kernel runs"
    rows = [dense, padded]
    for backend in backends:
        for block in (128, 64):
            config = fixed_density(DENSITY, block, backend)
            row = Row(name, f"{backend} NABLA {DENSITY:.0%}, block {block}")
            try:
                error = grad_check(config, Shape(2, shape.T, shape.H, shape.W), device)
                timed(row, lambda c=config: attend(*tiled, layout, c).out, tiled, grad_tiled)
                row.speedup, row.gpu_speedup = dense.total_ms / row.total_ms, dense.gpu_total_ms / row.gpu_total_ms
                row.note = f"grads within {error:.1e} of float32 (relative to max)"
            except (ValueError, RuntimeError) as failure:  # a refused block size, a kernel that cannot compile
                row.note = str(failure).strip().splitlines()[0][:200]
            log(f"{name}: {row.kernel}: {row.total_ms} ms (GPU {row.gpu_total_ms}); {row.note}")
            rows.append(row)
    return rows


def fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def speedups(row: Row) -> str:
    return "" if row.speedup is None else f"{row.speedup:.2f}x / {row.gpu_speedup:.2f}x"


def render(rows: list[Row], device_name: str) -> str:
    setup = f"{device_name}, torch {torch.__version__}, bf16, head dim {HEAD_DIM}, batch 1"
    lines = [f"## Attention forward + backward: {setup}", ""]
    padded = {r.shape: r for r in rows if r.kernel == "dense SDPA on the padded tokens"}
    for row in rows:
        target = TARGETS.get(row.shape)
        if row.kernel.startswith("flash") and row.kernel.endswith("block 128") and target and row.speedup:
            base = padded[row.shape]
            lines.append(f"- {row.shape}: wall {row.speedup:.2f}x, GPU {row.gpu_speedup:.2f}x (target >= {target}x: "
                         f"wall {'PASS' if row.speedup >= target else 'FAIL'}, "
                         f"GPU {'PASS' if row.gpu_speedup >= target else 'FAIL'}); against dense on the padded "
                         f"tokens {base.total_ms / row.total_ms:.2f}x / {base.gpu_total_ms / row.gpu_total_ms:.2f}x")
    header = "| shape | kernel | forward ms | forward + backward ms, wall / GPU | vs dense SDPA, wall / GPU | note |"
    lines += ["", header, "|---|---|---:|---:|---:|---|"]
    lines += [f"| {r.shape} | {r.kernel} | {fmt(r.forward_ms, '.1f')} | {fmt(r.total_ms, '.1f')} / "
              f"{fmt(r.gpu_total_ms, '.1f')} | {speedups(r)} | {r.note} |" for r in rows]
    profiled = [r for r in rows if r.profile]
    if profiled:
        lines += ["", "Where one lone forward + backward call goes (torch.profiler; the last of 3 calls):", "",
                  "| shape | kernel | kernels ms | idle ms | kernels by name, ms |", "|---|---|---:|---:|---|"]
        lines += [f"| {r.shape} | {r.kernel} | {r.profile.kernel_ms:.2f} | {r.profile.idle_ms:.2f} | "
                  + ", ".join(f"{name} {ms:.2f}" for name, ms in list(r.profile.parts.items())[:6]) + " |"
                  for r in profiled]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES), help="shapes to run")
    parser.add_argument("--smoke", action="store_true", help="a tiny shape and few iterations instead (runs on CPU)")
    parser.add_argument("--profile", action="store_true", help="also where one lone call's time goes (torch.profiler)")
    add_backends_option(parser)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not args.smoke:
        parser.error("the real shapes need CUDA; use --smoke on CPU")
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    torch.manual_seed(0)
    backends = chosen_backends(args, device) if device.type == "cuda" else ["auto"]  # the CPU path
    shapes = SMOKE_SHAPES if args.smoke else {name: SHAPES[name] for name in args.shapes}
    rows = [row for name, shape in shapes.items()
            for row in bench_shape(name, shape, device, backends, 20 if args.smoke else 200, args.profile)]
    markdown = render(rows, torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU")
    if os.environ.get("OUT"):
        (Path(os.environ["OUT"]) / "bench_backward.md").write_text(markdown)
    print("\n" + markdown, end="", flush=True)


if __name__ == "__main__":
    main()
