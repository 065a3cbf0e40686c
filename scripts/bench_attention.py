"""Benchmark NABLA sparse attention against dense attention at Wan2.1 shapes (bf16, head dim 128, batch 1).

Dense kernels (SDPA default / cuDNN / FlashAttention, compiled flex_attention without a mask) run on
the real T*H*W tokens in raster order; `sparse_attention` runs on the padded tile-ordered sequence,
at fixed block densities and at NABLA thresholds. The markdown table is printed last and, when $OUT
is set, also written to $OUT/bench_attention.md.

    python scripts/bench_attention.py                           # both shapes, on CUDA
    python scripts/bench_attention.py --shapes 14B-720p --json bench.json
    python scripts/bench_attention.py --smoke                   # tiny shape, few iterations (runs on CPU)
    python scripts/bench_attention.py --inputs local            # q, k with attention to nearby tiles

`--inputs random` (default) draws q, k, v at random: the pooled maps are noise, so neighbouring query
blocks share few key blocks. `--inputs local` adds to q and k a smooth function of the token's position
(random Fourier features of (t, h, w), length scale LOCAL_SCALE tiles: `wan.benchmarking.local_part`), so
that, as in trained video models, a query block's largest pooled logits are its neighbours', and neighbouring
query blocks share most of their key blocks; that decides what 64-token rows run in 128-row kernel blocks cost.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.flex_attention import flex_attention

from nabla.attention import sparse_attention
from nabla.block_mask import attended_mask, make_block_mask
from nabla.config import SparsityConfig
from nabla.layout import TileLayout
from nabla.masks import cdf_keep_sorted, nabla_block_mask, pool_blocks
from wan.benchmarking import (
    HEAD_DIM,
    SHAPES,
    SMOKE_SHAPES,
    Shape,
    add_backends_option,
    bench_ms,
    chosen_backends,
    fixed_density,
    local_part,
    log,
    warm_up,
)

BATCH = 1
TARGET_SPEEDUP = 6.5
TARGET_MASK_SHARE = 0.05
CHECK_TOLERANCE = 2e-2  # max abs error allowed, relative to max |reference|: bf16 rounding is ~0.4%

BLOCK_SIZES = (128, 64)
DENSITIES = (0.1, 0.5)
TARGET_KERNEL = "sparse 10%, block 128"


MERGED = "block 64 in 128-row kernel blocks"


def sparse_variants(backend: str) -> dict[str, SparsityConfig]:
    variants = {
        f"{backend} sparse {density:.0%}, block {block}": fixed_density(density, block, backend)
        for block in BLOCK_SIZES
        for density in DENSITIES
    }
    for density in DENSITIES:
        variants[f"{backend} sparse {density:.0%}, {MERGED}"] = fixed_density(density, 64, backend).replace(
            query_block_size=128)
    return variants
SDPA_BACKENDS = {
    "SDPA default": None,
    "SDPA cuDNN": SDPBackend.CUDNN_ATTENTION,
    "SDPA FlashAttention": SDPBackend.FLASH_ATTENTION,
}


@dataclass
class Row:
    shape: str
    kernel: str
    density: float | None = None  # fraction of (query block, key block) pairs kept; 1 for dense
    kernel_density: float | None = None  # fraction the kernel computes (more than density in merged rows)
    mask_ms: float | None = None  # make_block_mask alone (mask + BlockMask)
    total_ms: float | None = None  # the whole call (sparse: mask build + kernel)
    tflops: float | None = None  # 4*D*(real token pairs computed) / total_ms
    speedup: float | None = None  # fastest dense total_ms of the shape / total_ms
    dense: bool = False


@dataclass
class Check:
    """sparse_attention keeping every block vs SDPA, over the real tokens of one shape."""

    shape: str
    max_err: float  # max |sparse - SDPA|
    ref_max: float  # max |SDPA|, for scale
    mask_mismatch: int  # NABLA(0.4) blocks where the device's mask path and sorting disagree
    mask_blocks: int
    flash_vs_triton: float | None = None  # max |FLASH - Triton| of NABLA(0.4) attention, where FLASH runs

    @property
    def ok(self) -> bool:
        return self.max_err <= CHECK_TOLERANCE * self.ref_max

    def __str__(self) -> str:
        verdict = "ok" if self.ok else "MISMATCH"
        flash = "" if self.flash_vs_triton is None else f"; NABLA(0.4) FLASH vs Triton max abs diff {self.flash_vs_triton:.1e}"
        return (
            f"{self.shape}: max abs err {self.max_err:.2e} (max |ref| {self.ref_max:.2e}): {verdict}; "
            f"NABLA(0.4) mask vs sorting: {self.mask_mismatch} of {self.mask_blocks} blocks differ{flash}"
        )


Bench = Callable[[Callable[[], object]], float]


def tflops(flops: float, ms: float) -> float:
    return flops / (ms * 1e-3) / 1e12


def real_tokens_per_block(layout: TileLayout, block_size: int, device: torch.device) -> torch.Tensor:
    """float32 [nb]: how many real (non-padding) tokens each block of the tile-ordered sequence holds."""
    valid = layout.valid_on(device).float()
    return F.pad(valid, (0, -len(valid) % block_size)).view(-1, block_size).sum(-1)


def check_sparse(
    name: str, raster: tuple[torch.Tensor, ...], tiled: tuple[torch.Tensor, ...], layout: TileLayout,
    backends: list[str],
) -> Check:
    ref = F.scaled_dot_product_attention(*raster).float()
    all_blocks = SparsityConfig(mode="nabla", threshold=1.0, block_size=128, dense_above=1.0)
    out = layout.untile(sparse_attention(*tiled, layout, all_blocks), dim=2).float()
    # The mask path of this device (the Triton kernel on CUDA) against the sort-based reference.
    q, k, valid = tiled[0], tiled[1], layout.valid_on(tiled[0].device)
    keep = nabla_block_mask(q, k, 0.4, 128, valid=valid)
    qa, counts = pool_blocks(q, 128, valid)
    ka, _ = pool_blocks(k, 128, valid)
    probs = ((qa @ ka.transpose(-1, -2)) / q.shape[-1] ** 0.5).masked_fill(counts == 0, float("-inf")).softmax(-1)
    mismatch = int((keep != cdf_keep_sorted(probs, 0.4, 1, probs.shape[-1])).sum())
    flash = None
    if "flash" in backends:
        nabla = SparsityConfig(mode="nabla", threshold=0.4, block_size=128, dense_above=1.0)
        outs = [sparse_attention(*tiled, layout, nabla.replace(backend=b)).float() for b in ("flash", "triton")]
        flash = (outs[0] - outs[1])[:, :, layout.valid].abs().max().item()
    return Check(name, (out - ref).abs().max().item(), ref.abs().max().item(), mismatch, keep.numel(), flash)


def measure_dense(row: Row, attend: Callable[[], object], flops: float, device: torch.device, bench: Bench) -> None:
    warm_up(attend, device)
    row.density = 1.0
    row.total_ms = bench(attend)
    row.tflops = tflops(flops, row.total_ms)


def measure_sparse(
    row: Row,
    config: SparsityConfig,
    tiled: tuple[torch.Tensor, ...],
    layout: TileLayout,
    device: torch.device,
    bench: Bench,
) -> None:
    def build_mask() -> object:
        return make_block_mask(tiled[0], tiled[1], layout, config, compiled=device.type == "cuda")

    def attend() -> torch.Tensor:
        return sparse_attention(*tiled, layout, config)

    # The stats call compiles the same graphs as `attend` (the stats are computed outside them).
    _, stats = warm_up(lambda: sparse_attention(*tiled, layout, config, return_stats=True), device)
    counts = real_tokens_per_block(layout, config.block_size, device)
    attended = attended_mask(stats["mask"], config.query_merge)
    real_pairs = torch.einsum("bhij,i,j->", attended.float(), counts, counts).item()
    warm_up(build_mask, device)
    row.density = stats["density"].mean().item()
    row.kernel_density = stats["kernel_density"].mean().item()
    row.mask_ms = bench(build_mask)
    row.total_ms = bench(attend)
    row.tflops = tflops(4 * HEAD_DIM * real_pairs, row.total_ms)


def attempt(row: Row, measure: Callable[[Row], None]) -> Row:
    """Run `measure(row)`; a kernel that refuses the shape or fails to compile gives an all-n/a row."""
    try:
        measure(row)
    except RuntimeError as failure:  # also torch.OutOfMemoryError and dynamo/inductor errors
        log(f"{row.shape}: {row.kernel}: n/a ({str(failure).strip().splitlines()[0][:160]})")
        return Row(row.shape, row.kernel, dense=row.dense)
    mask = "" if row.dense else f"mask {row.mask_ms:.2f} ms, "
    visited = "" if row.dense else f" (kernel computes {row.kernel_density:.3f})"
    log(f"{row.shape}: {row.kernel}: density {row.density:.3f}{visited}, {mask}total {row.total_ms:.2f} ms")
    return row


def bench_shape(
    name: str, shape: Shape, device: torch.device, dtype: torch.dtype, bench: Bench, backends: list[str],
    inputs: str = "random",
) -> tuple[list[Row], Check]:
    layout = TileLayout(shape.T, shape.H, shape.W)
    S = layout.length
    log(f"{name}: {shape.heads} heads, grid {shape.T}x{shape.H}x{shape.W}, {S} tokens ({layout.padded_length} padded), "
        f"{inputs} inputs")
    raster = [torch.randn(BATCH, shape.heads, S, HEAD_DIM, device=device, dtype=dtype) for _ in range(3)]
    if inputs == "local":
        local = local_part(shape, device).to(dtype)
        raster[0] += local
        raster[1] += local
    raster = tuple(raster)
    tiled = tuple(layout.tile(x, dim=2) for x in raster)

    check = check_sparse(name, raster, tiled, layout, backends)
    log(f"check sparse_attention(threshold 1.0) vs SDPA: {check}")

    dense_flops = 4 * BATCH * shape.heads * S**2 * HEAD_DIM
    rows: list[Row] = []
    for kernel, backend in SDPA_BACKENDS.items():

        def measure_sdpa(row: Row, backend: SDPBackend | None = backend) -> None:
            with sdpa_kernel(backend) if backend is not None else contextlib.nullcontext():
                measure_dense(row, lambda: F.scaled_dot_product_attention(*raster), dense_flops, device, bench)

        rows.append(attempt(Row(name, kernel, dense=True), measure_sdpa))

    # Same convention as sparse_attention: compiled on CUDA, eager (unfused, slow) elsewhere.
    compiled = device.type == "cuda"
    flex = torch.compile(flex_attention, dynamic=False) if compiled else flex_attention
    row = Row(name, f"flex_attention dense ({'compiled' if compiled else 'eager'})", dense=True)
    rows.append(attempt(row, lambda r: measure_dense(r, lambda: flex(*raster), dense_flops, device, bench)))

    for backend in backends:
        for kernel, config in sparse_variants(backend).items():

            def measure(row: Row, config: SparsityConfig = config) -> None:
                measure_sparse(row, config, tiled, layout, device, bench)

            rows.append(attempt(Row(name, kernel), measure))

    fastest = min((r.total_ms for r in rows if r.dense and r.total_ms is not None), default=None)
    for r in rows:
        if fastest is not None and r.total_ms is not None:
            r.speedup = fastest / r.total_ms
    return rows, check


def fmt(value: float | None, spec: str, missing: str = "n/a") -> str:
    return missing if value is None else format(value, spec)


def target_line(shape: str, rows: list[Row], backend: str) -> str:
    target = next(row for row in rows if row.kernel == f"{backend} {TARGET_KERNEL}")
    if target.speedup is None:
        return f"- {shape}: n/a"
    fastest = max((row for row in rows if row.dense and row.speedup is not None), key=lambda row: row.speedup)
    share = target.mask_ms / target.total_ms
    return (
        f"- {shape}, {backend}: {target.speedup:.2f}x vs {fastest.kernel} "
        f"(target >= {TARGET_SPEEDUP}x: {'PASS' if target.speedup >= TARGET_SPEEDUP else 'FAIL'}); "
        f"mask build {share:.1%} of the sparse time "
        f"(target < {TARGET_MASK_SHARE:.0%}: {'PASS' if share < TARGET_MASK_SHARE else 'FAIL'})"
    )


def crossover_lines(shape: str, rows: list[Row], backends: list[str]) -> list[str]:
    """Per backend and blocking: the mask density above which dense attention wins (a line through the 10%
    and 50% rows, mask build included), and the time over the 128-token one at 10%."""
    dense = min((r.total_ms for r in rows if r.dense and r.total_ms is not None), default=None)
    by_kernel = {r.kernel: r for r in rows}
    lines = []
    for backend in backends:
        base = by_kernel.get(f"{backend} sparse 10%, block 128")
        for blocking in [f"block {block}" for block in BLOCK_SIZES] + [MERGED]:
            low, high = (by_kernel.get(f"{backend} sparse {d:.0%}, {blocking}") for d in DENSITIES)
            if dense is None or low is None or high is None or low.total_ms is None or high.total_ms is None:
                continue
            slope = (high.total_ms - low.total_ms) / (high.density - low.density)
            cross = low.density + (dense - low.total_ms) / slope
            ratio = f"; {low.total_ms / base.total_ms:.2f}x the block-128 time at 10%" if base and base.total_ms else ""
            lines.append(f"- {shape}, {backend}, {blocking}: dense wins above density {min(cross, 1.0):.2f}{ratio}")
    return lines


def render(
    rows: list[Row], checks: list[Check], device_name: str, dtype: torch.dtype, backends: list[str], inputs: str
) -> str:
    setup = f"{device_name}, torch {torch.__version__}, {dtype}, head dim {HEAD_DIM}, batch {BATCH}, {inputs} inputs"
    lines = [
        f"## Attention benchmark: {setup}",
        "",
        "Correctness (sparse_attention keeping every block vs SDPA, on the real tokens):",
    ]
    lines += [f"- {check}" for check in checks]
    lines += ["", f"Target check ({TARGET_KERNEL}, mask build included, vs the fastest dense kernel of its shape):"]
    lines += [target_line(c.shape, [row for row in rows if row.shape == c.shape], b) for c in checks for b in backends]
    lines += ["", "Where the sparse kernel stops winning, and 64-token blocks against 128-token ones:"]
    lines += [line for c in checks for line in crossover_lines(c.shape, [r for r in rows if r.shape == c.shape], backends)]
    lines += [
        "",
        ("Dense rows run on the real T*H*W tokens; sparse rows on the padded tile-ordered sequence. "
        "density: fraction of (query block, key block) pairs kept (sparse_attention's stats, mean over heads); "
        "kernel density: the fraction the kernel computes, more than the density where 64-token rows run in "
        "128-row kernel blocks (both rows of a kernel block attend the union of their key blocks). "
        "TFLOP/s: 4*D*(real token pairs computed) / attention total, so sparse rows count exactly the real "
        "token pairs of their kept blocks (padding excluded) and include the mask build time. "
        "speedup: fastest dense attention total / this attention total."),
        "",
        "| shape | kernel | density | kernel density | mask build ms | attention total ms | TFLOP/s | speedup |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        mask = "-" if row.dense else fmt(row.mask_ms, ".2f")
        lines.append(
            f"| {row.shape} | {row.kernel} | {fmt(row.density, '.3f')} | {'-' if row.dense else fmt(row.kernel_density, '.3f')} "
            f"| {mask} | {fmt(row.total_ms, '.2f')} "
            f"| {fmt(row.tflops, '.1f')} | {fmt(row.speedup, '.2f', '-')}{'x' if row.speedup else ''} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description="Benchmark NABLA sparse attention against dense attention.")
    parser.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES), help="shapes to run")
    parser.add_argument("--smoke", action="store_true", help="a tiny shape and few iterations instead (runs on CPU)")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the rows and checks as JSON")
    parser.add_argument("--inputs", choices=["random", "local"], default="random",
                        help="q, k at random, or with attention to nearby tiles (see above)")
    add_backends_option(parser)
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    backends = chosen_backends(args, device)
    if device.type != "cuda" and not args.smoke:
        parser.error("the real shapes need CUDA; use --smoke on CPU")
    shapes = SMOKE_SHAPES if args.smoke else {name: SHAPES[name] for name in args.shapes}
    rep_ms = 20 if args.smoke else 100  # per variant: keeps the whole table within a few minutes
    dtype = torch.bfloat16
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    # Each (density bound, blocking, backend) compiles its own mask graph and kernel: ~15 per shape, past
    # dynamo's default limit of 8, past which it silently falls back to eager and skews the timings.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    torch.manual_seed(0)
    if device.type != "cuda":
        # Eager flex_attention is the expected CPU path; its advice to compile is noise here.
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")

    def bench(fn: Callable[[], object]) -> float:
        return bench_ms(fn, device, rep_ms, cpu_iters=3)

    rows: list[Row] = []
    checks: list[Check] = []
    for name, shape in shapes.items():
        shape_rows, check = bench_shape(name, shape, device, dtype, bench, backends, args.inputs)
        rows += shape_rows
        checks.append(check)
        # Free this shape's tensors and compiled graphs before the next one.
        torch._dynamo.reset()
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()

    markdown = render(rows, checks, device_name, dtype, backends, args.inputs)
    if os.environ.get("OUT"):
        path = Path(os.environ["OUT"]) / "bench_attention.md"
        path.write_text(markdown)
        log(f"wrote {path}")
    if args.json:
        record = {
            "device": device_name,
            "torch": torch.__version__,
            "checks": [asdict(c) | {"ok": c.ok} for c in checks],
            "rows": [asdict(row) for row in rows],
        }
        args.json.write_text(json.dumps(record, indent=2) + "\n")
        log(f"wrote {args.json}")
    print("\n" + markdown, end="", flush=True)


if __name__ == "__main__":
    main()
