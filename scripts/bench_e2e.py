"""End-to-end denoising benchmark: stock diffusers (dense, eager) vs dense compiled vs NABLA compiled,
and NABLA with FP8 linear layers (--fp8) and/or a step cache (--cache), for every Wan family.

    python scripts/bench_e2e.py --arch 14B --height 720 --width 1280 --frames 81 --steps 3
    python scripts/bench_e2e.py --arch 1.3B --height 480 --width 832 --frames 81 --steps 3
    python scripts/bench_e2e.py --arch 14B --steps 10 --fp8 --cache "{type: taylorseer, cache_interval: 3}"
    python scripts/bench_e2e.py --arch a14b --steps 4 --backends flash --block-sizes 128 --skip-dense   # 1280x720 x 81
    python scripts/bench_e2e.py --arch a14b --steps 2 --backends flash --block-sizes 128 --skip-dense --fp8 \\
        --levers fp8+cache --video-steps 50 --cache-warmup-steps 8 \\
        --cache "{type: taylorseer, cache_interval: 3, disable_cache_before_step: 6, disable_cache_after_step: 48}"
    python scripts/bench_e2e.py --arch ti2v-5b --steps 3 --backends flash --block-sizes 128            # 1280x704 x 121
    python scripts/bench_e2e.py --arch i2v-14b --steps 3 --backends flash --block-sizes 128            # 832x480 x 81
    python scripts/bench_e2e.py --arch vace-14B --steps 3 --backends flash --block-sizes 128           # 1280x720 x 81

Architectures (`--arch`, wan/models/random.py's ARCHS; without --height/--width/--frames, each its own
video): Wan2.1 T2V 1.3B and 14B; `a14b`, Wan2.2 T2V-A14B, whose two 14B experts are both compiled, patched (one step
count, as generate.py patches them), quantised and cached: the timed --steps must cross the boundary (timestep
0.875 x 1000; 4 steps run 2 on each expert), the warm-up runs each expert, and the expert of every timed step is
printed; `ti2v-5b`, Wan2.2 TI2V-5B, whose transformer takes a timestep per token (`expand_timesteps`); `i2v-14b`,
Wan2.1 I2V-14B 480P, a WanImageToVideoPipeline given a (random) first frame, so the transformer reads its 36 input
channels and, in cross-attention, the CLIP image tokens; `vace-14B`, Wan2.1 VACE-14B, a WanVACEPipeline given a
(random) control video and mask, whose 8 VACE blocks' self-attention is patched with the 40 main blocks';
`k5-lite`, `k5-pro`, Kandinsky 5 Lite and Pro T2V: the rest of the command line goes to
scripts/bench_kandinsky5.py (its flags), whose unit is one transformer evaluation, timed against dense and against
diffusers' own NABLA path as its docs set it up. Before each table, the share of the stock step that
self-attention takes: what bounds the speedup that sparse attention can give.

Variants: stock diffusers (eager), dense with compiled blocks, the NABLA patch with every step
dense (raster order, as dense_steps run), and NABLA for each backend (triton, flash where it runs)
and block size (128 and 64).
Real architectures with random weights built on the GPU (no download), bf16, one seed. Each
variant gets an untimed warm-up (one step per expert; its compile time is reported), then a timed run of
`--steps` denoising steps (both CFG passes each), timed per step with device synchronisation from the first
transformer call (text and image encoding stay out), with
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
steps per expert (computed and cached ones, so both code paths compile before the timing). The last column,
denoising seconds per video of --video-steps steps, is that measured total for cache rows and
s/step x steps for the others (every step computes all its blocks there).

    python scripts/bench_e2e.py --smoke [--arch a14b]   # the tiny model of that family on the CPU: checks the script
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml

import wan.attention.processor
from nabla import SparsityConfig
from nabla.attention import attend
from nabla.block_mask import make_block_mask
from nabla.masks import pool_blocks
from wan.api import compile_blocks
from wan.attention.patch import NablaPatch, patch_transformer, unpatch
from wan.attention.state import NablaState
from wan.benchmarking import add_backends_option, bench_ms, build_pipeline, chosen_backends, model_args, run_steps
from wan.benchmarking import log_clock as log
from wan.generate.stats import step_report
from wan.models.experts import boundary_step, experts, warmup_steps
from wan.models.families import family_of
from wan.models.random_kandinsky5 import ARCHS as KANDINSKY5_ARCHS
from wan.models.spec import EXPERT_NAMES, I2V_PIPELINE, VACE_PIPELINE
from wan.speedups.cache import cache_config, describe_cache, disable_cache, enable_cache, expert_cache
from wan.speedups.precision import apply_precision, check_precision

LEVERS = ("cache", "fp8", "fp8+cache")


def step_experts(pipe, steps: int) -> list[int]:
    """The expert (0 `transformer`, 1 `transformer_2`) that runs each step of a `steps`-step run."""
    boundary = boundary_step(pipe, steps)
    return [int(boundary is not None and step >= boundary) for step in range(steps)]


def free_memory(device: torch.device) -> None:
    """Drop the last variant's garbage and cached blocks: each variant's peak is its own (on CUDA; a CPU run measures
    no memory)."""
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def measure(name: str, pipe, args, state: NablaState | None = None, cached: bool = False) -> dict:
    """Warm up (one step per expert; --cache-warmup-steps per expert when `cached`), then time `args.steps` steps
    (the --video-steps schedule when `cached`).

    `state`: the NABLA patch's, whose records (reset before the timed run) give the steps that computed their blocks
    and the expert of each step.
    """
    device = pipe._execution_device
    free_memory(device)
    start = time.perf_counter()
    run_steps(pipe, args, warmup_steps(pipe, args.cache_warmup_steps if cached else 1)[0])
    first_call = time.perf_counter() - start
    free_memory(device)
    if state is not None:
        state.records.reset()
    torch._dynamo.config.error_on_recompile = True
    try:
        steps = run_steps(pipe, args, args.video_steps if cached else args.steps)
    finally:
        torch._dynamo.config.error_on_recompile = False
    step = sum(steps) / len(steps)
    computed = len(step_report(state.records.passes, state.layers)["computed_steps"]) if state is not None else len(steps)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    video = sum(steps) if cached else step * args.video_steps
    row = {"name": name, "step_s": step, "steps": steps, "computed": computed, "first_call_s": first_call,
           "peak_gib": peak, "video_s": video}
    ran = f", experts by step {' '.join(str(state.records.experts[i]) for i in range(len(steps)))}" \
        if state is not None and getattr(pipe, "transformer_2", None) is not None else ""
    log(f"{name}: {step:.2f} s/step ({', '.join(f'{s:.2f}' for s in steps)}), {computed} of {len(steps)} steps "
        f"computed{ran}, first call {first_call:.1f} s, peak {row['peak_gib']:.1f} GiB")
    return row


def capture_qkv(pipe, args) -> dict:
    """Layer 0's tile-ordered q, k, v from one more NABLA step, for per-call timing; captured after the
    timed runs so the copies never count in their peak memory."""
    captured: dict = {}
    original = wan.attention.processor.attend

    def attend(q, k, v, layout, *rest, **options):
        if "q" not in captured:  # the first call of the step is layer 0's
            captured.update(q=q.clone(), k=k.clone(), v=v.clone(), layout=layout)
        return original(q, k, v, layout, *rest, **options)

    wan.attention.processor.attend = attend
    try:
        run_steps(pipe, args, 1)
    finally:
        wan.attention.processor.attend = original
    return captured


def check_schedule(pipe, args) -> None:
    """A two-expert pipeline's timed steps must run both experts: a per-step average over one would say nothing of
    the other."""
    if getattr(pipe, "transformer_2", None) is not None and len(set(step_experts(pipe, args.steps))) < 2:
        sys.exit(f"--steps {args.steps}: every timed step runs one expert; give at least "
                 f"{warmup_steps(pipe, 1)[0]} steps, so that the schedule crosses boundary_ratio "
                 f"{pipe.config.boundary_ratio}")


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
    parser.add_argument("--no-compile", action="store_true", help="leave the blocks eager, as generate.py "
                        "--no-compile does (no dense compiled row; flex_attention stays compiled on CUDA)")
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
    parser.add_argument("--cache-warmup-steps", type=int, default=6, help="untimed warm-up steps (per expert) of a "
                        "cache row")


def patch_experts(transformers: list, config: SparsityConfig) -> NablaPatch:
    """Patch every expert for `config`, on one step count (as enable_nabla does); returns the first's handle."""
    handle = None
    for transformer in transformers:
        patched = patch_transformer(transformer, config, expert_of=handle)
        handle = handle or patched
    return handle


def set_config(patch: NablaPatch, config: SparsityConfig) -> None:
    for handle in patch.experts:
        handle.set_config(config)


def enable_caches(pipe, transformers: list, cache, steps: int) -> None:
    """The cache on every expert, last, as generate.py puts it: the low-noise expert's schedule counts from its first
    step of a `steps`-step run."""
    for transformer, first_step in zip(transformers, [0, boundary_step(pipe, steps)]):
        enable_cache(transformer, expert_cache(cache, first_step))


def nabla_rows(pipe, args, transformers: list, backends: list[str], base: SparsityConfig
               ) -> tuple[list[dict], NablaPatch]:
    """The dense compiled rows and a NABLA row per backend and block size; returns them and the patch (made for
    `base`)."""
    rows = []
    blocks = "eager" if args.no_compile else "compiled"
    if not args.no_compile:
        # regional compilation: one graph for all identical blocks (both experts'); static shapes, as generate.py
        for transformer in transformers:
            compile_blocks(transformer)
        if not args.skip_dense:
            rows.append(measure("dense, compiled blocks", pipe, args))
    patch = patch_experts(transformers, base.replace(dense_steps=10**6))
    if not args.skip_dense:
        rows.append(measure(f"NABLA patch, all steps dense, {blocks}", pipe, args))
    for backend in backends:
        for blocking in args.block_sizes:
            cfg = nabla_config(args, backend, blocking)
            set_config(patch, cfg)
            name = f"NABLA {backend}, block {blocking}, {blocks}"
            try:
                row = measure(name, pipe, args, patch.state)
            except RuntimeError as failure:  # a kernel that refuses this blocking: report it, time the rest
                log(f"{name}: n/a ({str(failure).strip().splitlines()[0][:200]})")
                torch._dynamo.config.error_on_recompile = False
                continue
            row.update(config=cfg, density=patch.state.mean_density(), kernel_density=patch.state.mean_kernel_density())
            rows.append(row)
    return rows, patch


def lever_rows(pipe, args, transformers: list, patch: NablaPatch, base: SparsityConfig, cache) -> list[dict]:
    """The levers on `base` (the first backend and block size). The cache goes on last, over the compiled and patched
    blocks, as in generate.py; FP8 replaces the weights in place, so its rows come last."""
    set_config(patch, base)
    rows = []

    def lever(name: str, cached: bool = False) -> None:
        row = measure(name, pipe, args, patch.state, cached=cached)
        rows.append({**row, "config": base, "density": patch.state.mean_density()})

    if cache is not None and "cache" in args.levers:
        enable_caches(pipe, transformers, cache, args.video_steps)
        lever(f"NABLA + cache ({describe_cache(cache)})", cached=True)
        for transformer in transformers:
            disable_cache(transformer)
    if args.fp8 and {"fp8", "fp8+cache"} & set(args.levers):
        try:
            check_precision("fp8", pipe._execution_device)
        except ValueError as err:
            log(f"skipping the NABLA + FP8 rows: {err}")
            return rows
        for transformer in transformers:
            apply_precision(transformer, "fp8")
        lever("NABLA + FP8")  # also the FP8 compile, which "fp8+cache" would otherwise time
        if cache is not None and "fp8+cache" in args.levers:
            enable_caches(pipe, transformers, cache, args.video_steps)
            lever(f"NABLA + FP8 + cache ({describe_cache(cache)})", cached=True)
            for transformer in transformers:
                disable_cache(transformer)
    return rows


def per_call_times(pipe, args, patch: NablaPatch, base: SparsityConfig, rows: list[dict]) -> dict:
    """Layer 0's q, k, v from one more step under `base`: dense SDPA's ms per call, and each NABLA row's sparse call,
    mask build and (compiled) block means, into the rows. Returns the capture with dense_ms."""
    device = pipe._execution_device
    set_config(patch, base)
    captured = capture_qkv(pipe, args)
    q, k, v, layout = captured["q"], captured["k"], captured["v"], captured["layout"]
    real = layout.untile(torch.arange(layout.padded_length, device=q.device), dim=0)
    rq, rk, rv = (x[:, :, real] for x in (q, k, v))
    compiled = device.type == "cuda"  # the kernels generate.py runs on this device
    captured["dense_ms"] = bench_ms(lambda: F.scaled_dot_product_attention(rq, rk, rv), device, 200, cpu_iters=3)
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
    return captured


def arch_lines(pipe, args, rows: list[dict], calls: int, dense_ms: float) -> list[str]:
    """What the architecture adds to the report: the experts of the timed steps, per-token timesteps, the image
    condition, and the self-attention share of the stock step that bounds the speedup."""
    lines = []
    if getattr(pipe, "transformer_2", None) is not None:
        names = [EXPERT_NAMES[e] for e in step_experts(pipe, args.steps)]
        blocks = "" if args.no_compile else "compiled and "
        lines.append(f"timed steps' experts (boundary_ratio {pipe.config.boundary_ratio}): {', '.join(names)}; both "
                     f"{blocks}patched on one step count")
    if pipe.config.get("expand_timesteps"):
        lines.append("per-token timesteps (expand_timesteps): the transformer takes a timestep per token, and NABLA "
                     "its step from their maximum")
    if type(pipe).__name__ == VACE_PIPELINE:
        config = pipe.transformer.config
        lines.append(f"Wan VACE: a random control video and mask; {len(config.vace_layers)} VACE blocks run on the "
                     f"control latents before the {config.num_layers} main blocks, every block's self-attention "
                     "patched (their cross-attention stock)")
    if type(pipe).__name__ == I2V_PIPELINE:
        config = pipe.transformer.config
        lines.append(f"image to video: a random first frame; the transformer reads {config.in_channels} input channels "
                     "(noise, frame mask, image latents) and the CLIP image tokens beside the text in cross-attention "
                     "(untouched by NABLA)")
    for row in rows:
        if row["name"] in ("stock diffusers, dense, eager", "dense, compiled blocks"):
            share = dense_ms * calls / 1000 / row["step_s"]
            bound = f"{1 / (1 - share):.2f}x" if share < 1 else "unbounded"
            lines.append(f"self-attention (dense SDPA, {calls} calls a step) takes {share:.1%} of the {row['name']} "
                         f"step: sparse attention can make that step at most {bound} faster (the rest as it runs)")
    return lines


def print_report(pipe, args, rows: list[dict], captured: dict) -> None:
    """The run's description, then the table, last."""
    device = pipe._execution_device
    device_name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    q, layout, dense_ms = captured["q"], captured["layout"], captured["dense_ms"]
    # CFG passes x self-attention layers (VACE's blocks included; both experts have as many)
    calls = 2 * len(family_of(pipe.transformer, "bench_e2e").self_attention(pipe.transformer))
    heads, tokens = q.shape[1], layout.length
    print(f"\n## {args.title} {args.width}x{args.height} x {args.frames} frames ({tokens} tokens, "
          f"{layout.padded_length} in tiles), {heads} heads, {device_name}, torch {torch.__version__}")
    print(f"timed: {args.steps} denoising steps per variant after a warm-up of one step per expert (both CFG passes "
          f"per step); no recompilation during the timed steps (error_on_recompile); NABLA threshold {args.threshold}, "
          f"max_density {args.max_density}")
    print("\n".join(arch_lines(pipe, args, rows, calls, dense_ms)))
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


def kandinsky5_bench(argv: list[str]):
    """scripts/bench_kandinsky5.py's main where `argv` names a Kandinsky 5 architecture, else None. Loaded from its
    file: this script runs as `python scripts/bench_e2e.py` and imported as `scripts.bench_e2e` alike."""
    peek = argparse.ArgumentParser(add_help=False)
    peek.add_argument("--arch")
    if peek.parse_known_args(argv)[0].arch not in KANDINSKY5_ARCHS:
        return None
    spec = importlib.util.spec_from_file_location("bench_kandinsky5", Path(__file__).with_name("bench_kandinsky5.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if kandinsky5 := kandinsky5_bench(argv):
        return kandinsky5(argv)
    handed_on = {name: f"{arch.title} (scripts/bench_kandinsky5.py)" for name, arch in KANDINSKY5_ARCHS.items()}
    args = model_args(__doc__, steps=3, extra=extra_options, argv=argv, handed_on=handed_on)
    args.video_steps = args.video_steps or args.steps
    torch.backends.cuda.matmul.allow_tf32 = True  # the float32 norms and modulation; bf16 matmuls unaffected
    cache = cache_config(yaml.safe_load(args.cache)) if args.cache else None
    pipe = build_pipeline(args)
    check_schedule(pipe, args)
    device = pipe._execution_device
    backends = chosen_backends(args, device)
    if device.type != "cuda":
        backends = ["auto"]  # eager flex_attention on the CPU
    transformers = experts(pipe, "bench_e2e")  # Wan2.2 A14B: both experts, as generate.py runs them
    base = nabla_config(args, backends[0], args.block_sizes[0])
    rows = [measure("stock diffusers, dense, eager", pipe, args)] if not args.skip_stock else []
    nabla, patch = nabla_rows(pipe, args, transformers, backends, base)
    rows += nabla + lever_rows(pipe, args, transformers, patch, base, cache)
    captured = per_call_times(pipe, args, patch, base, rows)
    for transformer in transformers:
        unpatch(transformer)
    print_report(pipe, args, rows, captured)


if __name__ == "__main__":
    main()
