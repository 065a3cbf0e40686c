"""One Kandinsky 5 transformer evaluation: dense, diffusers' own NABLA path, and this project's patch.

    python scripts/bench_kandinsky5.py --arch k5-lite                          # 768x512 x 241: 93,696 tokens
    python scripts/bench_kandinsky5.py --arch k5-lite --diffusers-compile max-autotune-no-cudagraphs
    python scripts/bench_kandinsky5.py --arch k5-pro --max-density 0.15        # 1280x768 x 241: 234,240 tokens
    python scripts/bench_kandinsky5.py --arch k5-lite --threshold 0.2          # every path at a trained-like density
    python scripts/bench_kandinsky5.py --arch k5-lite --threshold 0.2 --variants dense ours-fast --profile
    python scripts/bench_kandinsky5.py --arch k5-lite --threshold 0.2 --ours-thresholds 0.17 0.15 \
        --diffusers-compile flex                                               # ours also at 2 more P
    python scripts/bench_kandinsky5.py --smoke                                 # the tiny model on the CPU, seconds

Variants, each on the same random-weight transformer (wan.models.random_kandinsky5, bf16) and inputs:
- `dense`: stock diffusers, `sparse_params` None (SDPA over every token), eager;
- `diffusers-nabla`: stock diffusers given the pipeline's `sparse_params` (the authors' nablaT_v2 mask), as its docs
  set it up: `set_attention_backend("flex")` and the whole model compiled with `dynamic=True`, in the mode of
  `--diffusers-compile` ("default" or "max-autotune-no-cudagraphs"; "flex": flex_attention alone compiled, as
  FastVideo runs it, the rest eager; "none": eager, whose flex ignores the mask). diffusers' flex call names the
  kernel's BLOCK_M for the mask's 64-token blocks but not BLOCK_N, whose default may be 128, which inductor refuses
  for 64-token key blocks: `--diffusers-kernel-options mask` (the default) fills in the mask's block sizes where
  diffusers names none, `shipped` keeps its call as it is;
- `ours-trained`: `enable_nabla(transformer)`, the checkpoint's trained config (64-token blocks, compiled blocks);
- `ours-fast`: `enable_nabla(transformer, "kandinsky5-fast")` (128-row query blocks over the 64-token tiles);
- `ours-trained-fp8`, `ours-fast-fp8`: those with the visual blocks' Linear layers in FP8 (torchao, as `precision:
  fp8`): the first quantizes the shared transformer in place, so they run after the others (CUDA of compute
  capability 8.9+; skipped elsewhere).
The first call of each is its warm-up (compile and autotune time printed), then `--evals` timed calls. Random weights
give random attention maps, so NABLA keeps most blocks; `--max-density` caps our variants at a trained model's
density (the table prints each variant's), which diffusers' path cannot take: compare at equal density only;
`--threshold` lowers P on every path alike. diffusers' density is read from the BlockMasks its warm-up call builds
(not under a whole-model compile, which would trace the reading): at the same P it may differ from ours on CUDA, where
nablaT_v2 sums its sorted bf16 map in bf16. `--profile` adds where one more evaluation's device time goes
(torch.profiler: attention, matmuls and the rest, and the largest kernels).
"""

from __future__ import annotations

import argparse
import time
from types import SimpleNamespace

import torch
from diffusers import Kandinsky5T2VPipeline
from diffusers.models import attention_dispatch
from diffusers.models.attention_dispatch import _AttentionBackendRegistry

from nabla.config import BACKENDS
from wan.api import disable_nabla, enable_nabla
from wan.benchmarking import kernel_groups, log_clock, profile_call, sync
from wan.models.kandinsky5 import trained_config
from wan.models.random_kandinsky5 import ARCHS, build_random_transformer
from wan.models.tiny_kandinsky5 import tiny_transformer
from wan.speedups.precision import apply_precision

VARIANTS = ("dense", "diffusers-nabla", "ours-trained", "ours-fast", "ours-trained-fp8", "ours-fast-fp8")
FP8 = ("ours-trained-fp8", "ours-fast-fp8")
TEXT_TOKENS = 256
FLEX = attention_dispatch.flex_attention  # torch's flex_attention module, whose function diffusers' dispatch calls
EAGER_FLEX = FLEX.flex_attention


def with_mask_block_sizes(flex):
    """`flex` with BLOCK_M and BLOCK_N set to the block mask's own block sizes where the caller set none."""

    def call(*args, block_mask=None, kernel_options=None, **kwargs):
        if block_mask is not None:
            q_block, kv_block = block_mask.BLOCK_SIZE
            kernel_options = {"BLOCK_M": q_block, "BLOCK_N": kv_block} | (kernel_options or {})
        return flex(*args, block_mask=block_mask, kernel_options=kernel_options, **kwargs)

    return call


class FlexDensity:
    """flex_attention that records the computed share of each BlockMask's blocks (`BlockMask.sparsity`), so that
    diffusers' path prints the density ours print. It reads the mask on the host, so it records the warm-up call only,
    and only where flex is called eagerly (a whole-model compile would trace it)."""

    def __init__(self, flex):
        self.flex, self.recording, self.densities = flex, True, []

    def __call__(self, *args, block_mask=None, **kwargs):
        if self.recording and block_mask is not None:
            self.densities.append(1 - block_mask.sparsity() / 100)
        return self.flex(*args, block_mask=block_mask, **kwargs)

    def mean_density(self) -> float | None:
        return sum(self.densities) / len(self.densities) if self.densities else None


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", choices=list(ARCHS), default="k5-lite")
    parser.add_argument("--height", type=int)
    parser.add_argument("--width", type=int)
    parser.add_argument("--frames", type=int)
    parser.add_argument("--evals", type=int, default=3, help="timed evaluations per variant (default: 3)")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--diffusers-compile", choices=("default", "max-autotune-no-cudagraphs", "flex", "none"),
                        default="default",
                        help="how diffusers' NABLA path is compiled (default: the whole model, default mode)")
    parser.add_argument("--diffusers-kernel-options", choices=("mask", "shipped"), default="mask",
                        help="diffusers' flex call: the mask's block sizes where it names none (default), or as "
                        "shipped")
    parser.add_argument("--max-density", type=float, help="cap our variants' NABLA blocks per query row")
    parser.add_argument("--threshold", type=float, help="NABLA's P for diffusers' path and ours alike (default: the "
                        "checkpoint's): a lower P stands in for a trained model's sparser maps at equal density")
    parser.add_argument("--ours-thresholds", type=float, nargs="+", default=[], metavar="P",
                        help="our variants also at these P, diffusers' at --threshold still: where the two masks keep "
                        "different shares of blocks at one P, the rows bracket diffusers' density")
    parser.add_argument("--backend", choices=BACKENDS, help="our variants' kernel (default: each config's)")
    parser.add_argument("--profile", action="store_true", help="also where one more evaluation's time goes")
    parser.add_argument("--smoke", action="store_true", help="the tiny model on the CPU: checks the script")
    args = parser.parse_args(argv)
    quantized = [variant in FP8 for variant in args.variants]
    if quantized != sorted(quantized):
        parser.error(f"--variants: {' and '.join(FP8)} quantize the transformer every variant shares, in place: put "
                     "them after the others")
    if args.smoke:
        args.height, args.width, args.frames, args.evals = args.height or 256, args.width or 256, args.frames or 5, 1
        args.diffusers_compile = "none"
    else:
        height, width, frames = ARCHS[args.arch].size
        args.height, args.width, args.frames = args.height or height, args.width or width, args.frames or frames
    return args


def build(args: argparse.Namespace, device: torch.device):
    """The transformer every variant runs; `--threshold` becomes its P, which the pipeline's sparse_params (diffusers'
    path) and trained_config (ours) both read."""
    transformer = tiny_transformer(visual_cond=True) if args.smoke else build_random_transformer(args.arch, device)
    if args.threshold is not None:
        transformer.register_to_config(attention_P=args.threshold)
    return transformer


def inputs(transformer, args, device: torch.device) -> dict:
    """One forward's arguments as Kandinsky5T2VPipeline passes them, its sparse_params included."""
    config, dtype = transformer.config, transformer.dtype
    frames, height, width = (args.frames - 1) // 4 + 1, args.height // 8, args.width // 8
    channels = 2 * config.in_visual_dim + 1 if config.visual_cond else config.in_visual_dim
    latents = torch.randn(1, frames, height, width, channels, device=device, dtype=dtype)
    owner = SimpleNamespace(transformer=transformer, fast_sta_nabla=Kandinsky5T2VPipeline.fast_sta_nabla)
    return {"hidden_states": latents, "timestep": torch.tensor([700.0], device=device, dtype=dtype),
            "encoder_hidden_states": torch.randn(1, TEXT_TOKENS, config.in_text_dim, device=device, dtype=dtype),
            "pooled_projections": torch.randn(1, config.in_text_dim2, device=device, dtype=dtype),
            "visual_rope_pos": [torch.arange(n, device=device) for n in (frames, height // 2, width // 2)],
            "text_rope_pos": torch.arange(TEXT_TOKENS, device=device), "scale_factor": (1.0, 2.0, 2.0),
            "sparse_params": Kandinsky5T2VPipeline.get_sparse_params(owner, latents, device)}


def set_up(variant: str, transformer, args, threshold: float | None) -> tuple[object, dict, object]:
    """The callable of `variant` (ours at P `threshold`), the forward's changed arguments, and its NABLA handle
    (ours), FlexDensity (diffusers' path where flex runs eagerly) or None."""
    capped = {} if args.max_density is None else {"max_density": args.max_density}
    capped |= {} if threshold is None else {"threshold": threshold}
    capped |= {} if args.backend is None else {"backend": args.backend}
    compile_blocks = None if not args.smoke else False
    if variant in ("ours-trained", "ours-trained-fp8"):
        config = trained_config(transformer.config).replace(**capped)
        return transformer, {}, enable_nabla(transformer, config, compile=compile_blocks)
    if variant in ("ours-fast", "ours-fast-fp8"):
        from nabla.config import load_config
        from wan.defaults import find_config

        config = load_config(find_config("kandinsky5-fast")).replace(**capped)
        return transformer, {}, enable_nabla(transformer, config, compile=compile_blocks)
    if variant == "dense":
        return transformer, {"sparse_params": None}, None
    transformer.set_attention_backend("flex")
    flex = torch.compile(EAGER_FLEX, dynamic=False) if args.diffusers_compile == "flex" else EAGER_FLEX
    if args.diffusers_kernel_options == "mask" and args.diffusers_compile != "none":
        flex = with_mask_block_sizes(flex)
    if args.diffusers_compile in ("none", "flex"):  # flex called eagerly: its masks can be read
        FLEX.flex_attention = FlexDensity(flex)
        return transformer, {}, FLEX.flex_attention
    FLEX.flex_attention = flex
    mode = None if args.diffusers_compile == "default" else args.diffusers_compile
    return torch.compile(transformer, mode=mode, dynamic=True), {}, None


def tear_down(variant: str, transformer, active_backend) -> None:
    if variant.startswith("ours"):
        disable_nabla(transformer)
    elif variant == "diffusers-nabla":
        transformer.reset_attention_backend()
        FLEX.flex_attention = EAGER_FLEX
        # set_attention_backend also sets the process-wide default, which reset_attention_backend leaves: without
        # this, every later model in the process (a training step on the CPU, say) would attend through flex
        _AttentionBackendRegistry.set_active_backend(active_backend)
        torch._dynamo.reset()


def measure(variant: str, transformer, args, forward: dict, device: torch.device, threshold: float | None) -> dict:
    active_backend = _AttentionBackendRegistry.get_active_backend()[0]
    model, changed, handle = set_up(variant, transformer, args, threshold)
    try:
        with torch.no_grad():
            start = time.perf_counter()
            model(**{**forward, **changed})
            sync(device)
            warm = time.perf_counter() - start
            if isinstance(handle, FlexDensity):
                handle.recording = False
            times = []
            for _ in range(args.evals):
                start = time.perf_counter()
                model(**{**forward, **changed})
                sync(device)
                times.append(time.perf_counter() - start)
            profile = profile_call(lambda: model(**{**forward, **changed}), device, calls=1) if args.profile else None
    finally:
        tear_down(variant, transformer, active_backend)
    density = handle.mean_density() if isinstance(handle, FlexDensity) else handle and handle.state.mean_density()
    name = variant if threshold == args.threshold else f"{variant} P {threshold:g}"
    return {"variant": name, "s": min(times), "warm": warm, "density": density, "profile": profile}


def table(rows: list[dict]) -> str:
    base = {row["variant"]: row["s"] for row in rows}
    lines = ["| variant | s/eval | vs dense | vs diffusers-nabla | first call s | density |", "|---|---|---|---|---|---|"]
    for row in rows:
        ratio = [f"{base[ref] / row['s']:.2f}x" if ref in base else "-" for ref in ("dense", "diffusers-nabla")]
        density = "-" if row["density"] is None else f"{row['density']:.3f}"
        lines.append(f"| {row['variant']} | {row['s']:.3f} | {ratio[0]} | {ratio[1]} | {row['warm']:.1f} | {density} |")
    return "\n".join(lines + profile_table(rows))


def profile_table(rows: list[dict]) -> list[str]:
    """One more evaluation of each variant, as the device ran it (`--profile`)."""
    profiled = [row for row in rows if row["profile"] is not None]
    if not profiled:
        return []
    lines = ["", "| variant | kernels ms | idle ms | attention / matmul / other ms | largest kernels, ms |",
             "|---|---|---|---|---|"]
    for row in profiled:
        profile = row["profile"]
        groups = kernel_groups(profile.parts)
        largest = ", ".join(f"{name} {ms:.1f}" for name, ms in list(profile.parts.items())[:4])
        lines.append(f"| {row['variant']} | {profile.kernel_ms:.1f} | {profile.idle_ms:.1f} | {groups['attention']:.1f}"
                     f" / {groups['matmul']:.1f} / {groups['other']:.1f} | {largest} |")
    return lines


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    device = torch.device("cpu" if args.smoke else "cuda")
    transformer = build(args, device)
    forward = inputs(transformer, args, device)
    tokens = forward["hidden_states"].shape[1] * (args.height // 16) * (args.width // 16)
    log_clock(f"{'tiny (smoke)' if args.smoke else ARCHS[args.arch].title}: {args.width}x{args.height} x "
              f"{args.frames} frames, {tokens} tokens; diffusers' compile: {args.diffusers_compile}")
    rows, fp8 = [], None
    for variant in args.variants:
        if variant in FP8:
            if fp8 is None:
                try:
                    apply_precision(transformer, "fp8")
                    fp8 = ""
                except ValueError as error:
                    fp8 = str(error)
            if fp8:
                print(f"skipping {variant}: {fp8}")
                continue
        for threshold in [args.threshold] + (args.ours_thresholds if variant.startswith("ours") else []):
            rows.append(measure(variant, transformer, args, forward, device, threshold))
            log_clock(f"{rows[-1]['variant']}: {rows[-1]['s']:.3f} s/eval (first call {rows[-1]['warm']:.1f} s)")
    print(table(rows))


if __name__ == "__main__":
    main()
