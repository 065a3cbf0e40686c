"""End-to-end denoising benchmark: stock diffusers (dense, eager) vs dense compiled vs NABLA compiled,
and NABLA with FP8 linear layers (--fp8) and/or a step cache (--cache).

    python scripts/bench_e2e.py --arch 14B --height 720 --width 1280 --frames 81 --steps 3
    python scripts/bench_e2e.py --arch 1.3B --height 480 --width 832 --frames 81 --steps 3
    python scripts/bench_e2e.py --arch 14B --steps 10 --fp8 --cache "{type: taylorseer, cache_interval: 3}"

Variants: stock diffusers (eager), dense with compiled blocks, the NABLA patch with every step
dense (raster order, as dense_steps run), and NABLA for each backend (triton, flash where it runs)
and block size (128 and 64).
Real Wan2.1 architectures with random weights built on the GPU (no download), bf16, one seed. Each
variant gets an untimed one-step warm-up (its compile time is reported), then a timed run of
`--steps` denoising steps (both CFG passes each), timed per step with device synchronisation, with
torch._dynamo.config.error_on_recompile set: any recompilation across steps, layers, CFG passes or
masks fails the run. Random weights do not give trained attention maps, so the NABLA density is set
by `max_density`. Attention and mask shares: per-call times measured on the model's own q, k, v
(captured from layer 0 in one more step after the timed runs, so the copies never count in peak
memory), times calls per step, over the step time. As in the patched block, the mask build starts
from the block means of q and k, which the compiled block takes in the graph that writes q and k
(their standalone cost is printed beside, and is in the step time). The table is printed last.

A cache row computes only some of its steps: the table shows the steps that ran all their blocks
(from the patch's per-pass counters) beside the steps run, and s/step is the total time over the
steps run, so a cache's gain shows as fewer steps computed, not as a faster step. It runs the whole
schedule of `--video-steps` steps (default: --steps), timed, after a warm-up of `--cache-warmup-steps`
steps (computed and cached ones, so both code paths compile before the timing). The last column,
denoising seconds per video of --video-steps steps, is that measured total for cache rows and
s/step x steps for the others (every step computes all its blocks there).

    python scripts/bench_e2e.py --smoke     # the tiny model on the CPU: checks the script, times nothing real
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml
from diffusers import WanPipeline

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import wan.processor
from nabla import SparsityConfig
from nabla.attention import attend
from nabla.block_mask import make_block_mask
from nabla.masks import pool_blocks
from scripts.bench_attention import add_backends_option, bench_ms, chosen_backends, sync
from scripts.make_random_model import build_random_pipeline
from wan.api import BLOCK_COMPILE_OPTIONS
from wan.cache import cache_config, describe_cache, disable_cache, enable_cache
from wan.patch import patch_transformer, unpatch
from wan.precision import apply_precision, check_precision
from wan.state import NablaState
from wan.stats import step_report
from wan.tiny import build_tiny_pipeline

PROMPT = "a red fox runs through fresh snow at dawn, cinematic"
LEVERS = ("cache", "fp8", "fp8+cache")


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def run_steps(pipe, args, steps: int) -> list[float]:
    """Run the pipeline for `steps` steps (latents out, no VAE); returns seconds per step."""
    stamps: list[float] = []
    device = pipe._execution_device

    def on_step_end(pipe, step, timestep, kwargs):
        sync(device)
        stamps.append(time.perf_counter())
        return kwargs

    sync(device)
    start = time.perf_counter()
    with torch.inference_mode():
        pipe(prompt=PROMPT, negative_prompt="", height=args.height, width=args.width, num_frames=args.frames,
             num_inference_steps=steps, guidance_scale=5.0, generator=torch.Generator("cpu").manual_seed(0),
             output_type="latent", callback_on_step_end=on_step_end)
    return [b - a for a, b in zip([start] + stamps[:-1], stamps)]


def measure(name: str, pipe, args, state: NablaState | None = None, cached: bool = False) -> dict:
    """Warm up (one step; --cache-warmup-steps when `cached`), then time `args.steps` steps (the
    --video-steps schedule when `cached`).

    `state`: the NABLA patch's, whose per-pass counters give the steps that computed their blocks.
    """
    cuda = pipe._execution_device.type == "cuda"
    start = time.perf_counter()
    run_steps(pipe, args, args.cache_warmup_steps if cached else 1)
    first_call = time.perf_counter() - start
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    if state is not None:
        state.records.passes.clear()
    torch._dynamo.config.error_on_recompile = True
    try:
        steps = run_steps(pipe, args, args.video_steps if cached else args.steps)
    finally:
        torch._dynamo.config.error_on_recompile = False
    step = sum(steps) / len(steps)
    layers = len(pipe.transformer.blocks)
    computed = len(step_report(state.records.passes, layers)["computed_steps"]) if state is not None else len(steps)
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
    video = sum(steps) if cached else step * args.video_steps
    row = {"name": name, "step_s": step, "steps": steps, "computed": computed, "first_call_s": first_call,
           "peak_gib": peak, "video_s": video}
    log(f"{name}: {step:.2f} s/step ({', '.join(f'{s:.2f}' for s in steps)}), {computed} of {len(steps)} steps "
        f"computed, first call {first_call:.1f} s, peak {row['peak_gib']:.1f} GiB")
    return row


def capture_qkv(transformer, pipe, args) -> dict:
    """Layer 0's tile-ordered q, k, v from one more NABLA step, for per-call timing; captured after the
    timed runs so the copies never count in their peak memory."""
    captured: dict = {}
    original = wan.processor.attend

    def attend(q, k, v, layout, *rest, **options):
        if "q" not in captured:  # the first call of the step is layer 0's
            captured.update(q=q.clone(), k=k.clone(), v=v.clone(), layout=layout)
        return original(q, k, v, layout, *rest, **options)

    wan.processor.attend = attend
    try:
        run_steps(pipe, args, 1)
    finally:
        wan.processor.attend = original
    return captured


def model_args(description: str, steps: int, extra: Callable[[argparse.ArgumentParser], None] | None = None
               ) -> argparse.Namespace:
    """The options of the end-to-end benchmarks: architecture, video size, timed steps, NABLA budget, --smoke."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", choices=["1.3B", "14B"], default="14B")
    parser.add_argument("--height", type=int, default=720)
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--frames", type=int, default=81)
    parser.add_argument("--steps", type=int, default=steps, help="timed denoising steps per variant (after warm-up)")
    parser.add_argument("--max-density", type=float, default=0.1, help="NABLA density cap (random weights)")
    parser.add_argument("--threshold", type=float, default=0.7)
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--smoke", action="store_true", help="the tiny offline model on CPUs, 64x96 x 9 frames")
    if extra is not None:
        extra(parser)
    args = parser.parse_args()
    if args.smoke:
        args.arch, args.height, args.width, args.frames, args.block_size = "tiny", 64, 96, 9, 64
    elif not torch.cuda.is_available():
        parser.error("the real architectures need CUDA; use --smoke on the CPU")
    return args


def build_pipeline(args: argparse.Namespace, device: str = "cuda") -> WanPipeline:
    """The tiny model with --smoke, else the real architecture with random weights built on `device`."""
    if not args.smoke:
        log(f"building Wan2.1-{args.arch} with random weights on {device}")
    pipe = build_tiny_pipeline() if args.smoke else build_random_pipeline(args.arch, device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


#: --block-sizes: tokens per block, or 64-token mask rows run two by two in 128-row kernel query blocks
BLOCKINGS = {"128": (128, None), "64": (64, None), "64/128": (64, 128)}


def nabla_config(args, backend: str, blocking: str) -> SparsityConfig:
    # dense_above 1.0: time the sparse kernels themselves
    block_size, query_block_size = BLOCKINGS[blocking]
    return SparsityConfig(mode="nabla", threshold=args.threshold, block_size=block_size, max_density=args.max_density,
                          backend=backend, dense_above=1.0, query_block_size=query_block_size)


def extra_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--skip-stock", action="store_true", help="skip the eager dense run")
    parser.add_argument("--skip-dense", action="store_true",
                        help="skip the dense compiled and patched dense runs (their ratios then show '-')")
    add_backends_option(parser)
    parser.add_argument("--block-sizes", nargs="+", choices=list(BLOCKINGS), default=["128", "64"],
                        help="NABLA block sizes to time, 64/128 for 64-token mask rows in 128-row kernel query blocks "
                        "(the levers' rows use the first)")
    parser.add_argument("--fp8", action="store_true", help="add rows with torchao FP8 block Linear layers (compute "
                        "capability >= 8.9; skipped with the reason elsewhere)")
    parser.add_argument("--cache", nargs="?", metavar="YAML",
                        const="{type: taylorseer, cache_interval: 2, disable_cache_before_step: 1}",
                        help="add rows with a step cache, given like the config's `cache:` section as a YAML mapping "
                        "(default: %(const)s, a plumbing check: set the steps and cache that you mean)")
    parser.add_argument("--levers", nargs="+", choices=LEVERS, default=list(LEVERS),
                        help="which of the --fp8 / --cache rows to run (default: all that those flags enable; "
                        "fp8+cache runs after the fp8 row, which takes FP8's compilation)")
    parser.add_argument("--video-steps", type=int, help="denoising steps of one video: the schedule that cache rows "
                        "run and time whole, and the last column's steps (default: --steps)")
    parser.add_argument("--cache-warmup-steps", type=int, default=6, help="untimed warm-up steps of a cache row")


def main() -> None:
    args = model_args(__doc__, steps=3, extra=extra_options)
    args.video_steps = args.video_steps or args.steps
    torch.backends.cuda.matmul.allow_tf32 = True  # the float32 norms and modulation; bf16 matmuls unaffected
    cache = cache_config(yaml.safe_load(args.cache)) if args.cache else None
    pipe = build_pipeline(args)
    device = pipe._execution_device
    device_name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    backends = chosen_backends(args, device)
    if device.type != "cuda":
        backends = ["auto"]  # eager flex_attention on the CPU
    transformer = pipe.transformer
    rows = []
    if not args.skip_stock:
        rows.append(measure("stock diffusers, dense, eager", pipe, args))

    # regional compilation: one graph for all identical blocks; static shapes, as generate.py compiles them
    transformer.compile_repeated_blocks(dynamic=False, options=BLOCK_COMPILE_OPTIONS)
    if not args.skip_dense:
        rows.append(measure("dense, compiled blocks", pipe, args))

    base = nabla_config(args, backends[0], args.block_sizes[0])
    patch = patch_transformer(transformer, base.replace(dense_steps=10**6))
    if not args.skip_dense:
        rows.append(measure("NABLA patch, all steps dense, compiled", pipe, args))
    for backend in backends:
        for blocking in args.block_sizes:
            cfg = nabla_config(args, backend, blocking)
            patch.set_config(cfg)
            patch.state.reset()
            name = f"NABLA {backend}, block {blocking}, compiled"
            try:
                row = measure(name, pipe, args, patch.state)
            except RuntimeError as failure:  # a kernel that refuses this blocking: report it, time the rest
                log(f"{name}: n/a ({str(failure).strip().splitlines()[0][:200]})")
                torch._dynamo.config.error_on_recompile = False
                continue
            row.update(config=cfg, density=patch.state.mean_density(), kernel_density=patch.state.mean_kernel_density())
            rows.append(row)

    def lever(name: str, cached: bool = False) -> dict:
        patch.state.reset()
        row = measure(name, pipe, args, patch.state, cached=cached)
        return {**row, "config": base, "density": patch.state.mean_density()}

    # The levers on the first backend and block size. The cache goes on last, over the compiled and patched
    # blocks, as in generate.py; FP8 replaces the weights in place, so its rows come last.
    patch.set_config(base)
    if cache is not None and "cache" in args.levers:
        enable_cache(transformer, cache)
        rows.append(lever(f"NABLA + cache ({describe_cache(cache)})", cached=True))
        disable_cache(transformer)
    if args.fp8 and {"fp8", "fp8+cache"} & set(args.levers):
        try:
            check_precision("fp8", device)
        except ValueError as err:
            log(f"skipping the NABLA + FP8 rows: {err}")
        else:
            apply_precision(transformer, "fp8")
            rows.append(lever("NABLA + FP8"))  # also the FP8 compile, which "fp8+cache" would otherwise time
            if cache is not None and "fp8+cache" in args.levers:
                enable_cache(transformer, cache)
                rows.append(lever(f"NABLA + FP8 + cache ({describe_cache(cache)})", cached=True))
                disable_cache(transformer)

    # Per-call attention times on layer 0's own q, k, v.
    patch.set_config(base)
    captured = capture_qkv(transformer, pipe, args)
    q, k, v, layout = captured["q"], captured["k"], captured["v"], captured["layout"]
    real = layout.untile(torch.arange(layout.padded_length, device=q.device), dim=0)
    rq, rk, rv = (x[:, :, real] for x in (q, k, v))
    compiled = device.type == "cuda"  # the kernels generate.py runs on this device
    dense_ms = bench_ms(lambda: F.scaled_dot_product_attention(rq, rk, rv), device, 200, cpu_iters=3)
    valid = layout.valid_on(device)
    pool = torch.compile(lambda x, bs: pool_blocks(x, bs, valid)[0], dynamic=False) if compiled else None

    def sparse_call(cfg: SparsityConfig, means: tuple) -> torch.Tensor:
        return attend(q, k, v, layout, cfg, means=means, compiled=compiled).out

    for row in rows:
        if "config" in row:
            cfg = row["config"]
            means = tuple(pool_blocks(x, cfg.block_size, valid)[0] for x in (q, k))
            row["sparse_ms"] = bench_ms(lambda cfg=cfg, m=means: sparse_call(cfg, m), device, 200, cpu_iters=3)
            row["mask_ms"] = bench_ms(lambda cfg=cfg, m=means: make_block_mask(q, k, layout, cfg, compiled, means=m),
                                      device, 200, cpu_iters=3)
            if pool is not None:  # what the means would cost in kernels of their own (q and k read again)
                row["pool_ms"] = bench_ms(lambda bs=cfg.block_size: (pool(q, bs), pool(k, bs)), device, 200, 1)
    calls = 2 * len(transformer.blocks)  # CFG passes x layers
    unpatch(transformer)

    heads, tokens = q.shape[1], layout.length
    print(f"\n## Wan2.1-{args.arch} {args.width}x{args.height} x {args.frames} frames ({tokens} tokens, "
          f"{layout.padded_length} in tiles), {heads} heads, {device_name}, torch {torch.__version__}")
    print(f"timed: {args.steps} denoising steps per variant after a one-step warm-up (both CFG passes per step); "
          f"no recompilation during the timed steps (error_on_recompile); NABLA threshold {args.threshold}, "
          f"max_density {args.max_density}")
    print(f"per call: dense SDPA {dense_ms:.2f} ms; NABLA per call (mask build from the block means incl.): " + ", ".join(
        f"{r['name']} {r['sparse_ms']:.2f} ms (mask {r['mask_ms']:.2f} ms"
        + (f"; block means in kernels of their own {r['pool_ms']:.2f} ms" if "pool_ms" in r else "") + ")"
        for r in rows if "config" in r) + "\n")
    stock = rows[0]["step_s"] if not args.skip_stock else None
    dense_compiled = next((r["step_s"] for r in rows if r["name"] == "dense, compiled blocks"), None)
    print("s/step: total time over the steps run; a cache row computes its blocks on fewer steps (steps computed)")
    print(f"s per video: {args.video_steps} denoising steps, measured whole for cache rows, s/step x "
          f"{args.video_steps} for the others")
    print("| variant | steps computed | s/step | vs stock | vs dense compiled | density | attention share | mask share "
          f"| mask / sparse call | first call s | peak GiB | s per video ({args.video_steps} steps) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        nabla = "config" in row
        row_calls = calls * row["computed"] / len(row["steps"])  # calls per step run: cached steps make (almost) none
        attn = (row["sparse_ms"] if nabla else dense_ms) * row_calls / 1000 / row["step_s"]
        mask = f"{row['mask_ms'] * row_calls / 1000 / row['step_s']:.1%}" if nabla else "-"
        per_call = f"{row['mask_ms'] / row['sparse_ms']:.1%}" if nabla else "-"
        density = f"{row['density']:.3f}" if nabla else "1"
        if nabla and row["config"].query_merge > 1:
            density += f" (kernel {row['kernel_density']:.3f})"
        vs_stock = f"{stock / row['step_s']:.2f}x" if stock else "-"
        vs_dense = f"{dense_compiled / row['step_s']:.2f}x" if dense_compiled else "-"
        print(f"| {row['name']} | {row['computed']}/{len(row['steps'])} | {row['step_s']:.2f} | {vs_stock} "
              f"| {vs_dense} | {density} | {attn:.1%} | {mask} | {per_call} "
              f"| {row['first_call_s']:.1f} | {row['peak_gib']:.1f} | {row['video_s']:.1f} |")


if __name__ == "__main__":
    main()
