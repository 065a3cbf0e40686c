"""Fine-tuning step benchmark, dense against NABLA side by side: Wan2.1 (10% of the blocks, 128-token blocks,
FLASH) and Kandinsky 5 (its trained mask, and kandinsky5-fast).

    python scripts/bench_train.py --arch 14B --height 720 --width 1280 --frames 81 --methods lora
    python scripts/bench_train.py --arch 1.3B --height 480 --width 832 --frames 81 --methods lora full
    python scripts/bench_train.py --smoke     # the tiny model on the CPU, dense only: checks the script
    python scripts/bench_train.py --smoke --arch k5-lite   # the tiny Kandinsky 5 on the CPU, every row
    python scripts/bench_train.py --arch 14B --height 720 --width 1280 --methods lora --layers 2 --trace-memory
    torchrun --nproc_per_node=2 scripts/bench_train.py --arch 14B --height 720 --width 1280 --methods lora --batch 2
    python scripts/bench_train.py --arch 14B --height 720 --width 1280 --methods lora --batch 2   # its 1-GPU baseline
    python scripts/bench_train.py --arch k5-lite          # Kandinsky 5 Lite 10s LoRA, 768x512x241: dense vs its NABLA
    python scripts/bench_train.py --arch k5-lite --max-density 0.2   # its NABLA rows capped at a trained density

One optimizer step is what finetune.py runs (wan.train.trainer.optimizer_step): forward, backward and AdamW update,
gradient checkpointing on, batch 1, compiled blocks on CUDA, timed by CUDA events (the wall clock on the CPU). Random weights at the real Wan2.1 sizes
(wan/models/random.py) and synthetic latents and text embeddings: no data, no VAE, no text encoder.
Random weights give random attention, so NABLA's density is set by max_density 0.1. LoRA trains a bf16 base
with a float32 adapter; full fine-tuning float32 master weights with bf16 compute. Each variant runs one
untimed first step (compilation included; its time is reported), then `--steps` timed steps; peak memory is
the allocator's peak over the whole variant. The table is printed last.

`--layers N` builds the architecture with N blocks (a block's time and memory at the real widths in a fraction of
the run: with checkpointing the whole model's peak is its weights and block inputs plus one block's, so a difference
between variants is the same); `--trace-memory` records the allocations of the last timed step and prints, per
variant, what is alive at its peak by tensor size (wan/benchmarking.py's memory_report; that step's time then
includes the recording).

Under torchrun the transformer is sharded by FSDP2 as finetune.py shards it and each rank takes its share of the
global batch (`--batch`, samples per optimizer step): one process runs it as gradient accumulation, N processes as
`--batch / N` micro-batches each, the same samples (noise and timesteps from the trainer's sample numbers), so the
losses of the first steps (printed) match across GPU counts within bf16 tolerance. Peak memory is rank 0's.

Kandinsky 5 (`--arch k5-lite`, `k5-pro`: wan/models/random_kandinsky5.py's transformer configs, the 10s checkpoints'
`attention_type: nabla`, bf16 with float32 modulations as a checkpoint loads) trains a LoRA on its visual blocks, as
finetune does (full fine-tuning is refused there); its batches are make_batch's for a Kandinsky 5 ModelSpec
(wan/train/kandinsky5_inputs.py: channels-last latents with the `visual_cond` channels, Qwen2.5-VL embeddings of
TEXT_TOKENS tokens and a CLIP pooled embedding at the real widths, the pipeline's rotary positions), flow shift 5 (its
scheduler's). Its rows: dense (the patch's mode full: the checkpoint's own NABLA path dropped, as finetune runs it),
the trained mask (configs/kandinsky5-trained.yaml: its P and STA window on 64-token blocks, from the transformer's
config) and configs/kandinsky5-fast.yaml (128-row query blocks over those tiles, at the model's P and window); on CUDA,
whose flex_attention backward takes 128-token key blocks only, the trained P and window on 128-token blocks. The
default video is the 10s checkpoints' (Lite: 768x512x241, 93,696 tokens; Pro: 1280x768x241, 234,240): with gradient
checkpointing a step keeps the bf16 weights and each block's input (Lite: 4 GB and 32 x 0.34 GB; Pro: 38 GB and
60 x 1.9 GB, more than one GPU holds: time Pro with `--layers`, a block's cost at the real widths, or at the SD size,
`--height 512 --width 768`). Random weights give random attention maps, under which the trained
P keeps far more blocks than a trained model does: `--max-density` caps the NABLA rows at a trained model's density,
and the table prints each row's.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import time
from collections.abc import Callable, Iterator

import torch

from nabla import SparsityConfig
from nabla.config import load_config
from wan.benchmarking import memory_report, record_memory, sync
from wan.defaults import find_config
from wan.models import kandinsky5_facts, random_kandinsky5
from wan.models.random import build_random_transformer
from wan.models.spec import T2V, ModelSpec
from wan.models.tiny import build_tiny_pipeline
from wan.models.tiny_kandinsky5 import LITE_10S_ATTENTION, tiny_transformer
from wan.train.config import SparsitySchedule, TrainingConfig
from wan.train.data_parallel import DataParallel, close, init_data_parallel, shard_transformer
from wan.train.sparsity_schedule import SparseAttention
from wan.train.trainer import build_optimizer, make_batch, make_trainable, optimizer_step, sample_numbers

NABLA = SparsityConfig(mode="nabla", threshold=0.7, max_density=0.1, block_size=128, backend="flash")
#: Kandinsky 5's architectures (the tiny one is --smoke's)
K5_ARCHS = (*random_kandinsky5.ARCHS, "k5-tiny")
#: Qwen2.5-VL tokens of a Kandinsky 5 caption: the pipeline keeps a prompt's own length (no padding), a few hundred
TEXT_TOKENS = 256
#: the flow shift of Kandinsky 5's scheduler (its pipelines' FlowMatchEulerDiscreteScheduler), and Wan2.1's
K5_SHIFT, WAN_SHIFT = 5.0, 3.0
HEADER = ("| model | video | method | attention | s/step | speedup vs dense | density | peak GiB | first step s "
          "| GPUs | global batch | losses |")


def build(arch: str, method: str, device: torch.device, layers: int | None = None) -> torch.nn.Module:
    if arch == "k5-tiny":
        transformer = tiny_transformer(visual_cond=True).to(device)
        if layers is not None:
            transformer.visual_transformer_blocks = transformer.visual_transformer_blocks[:layers]
        return transformer
    if arch in random_kandinsky5.ARCHS:  # LoRA only: bf16 base weights
        return random_kandinsky5.build_random_transformer(arch, device, torch.bfloat16, layers=layers)
    if arch == "tiny":
        transformer = build_tiny_pipeline().transformer.to(device)
        if layers is not None:
            transformer.blocks = transformer.blocks[:layers]
        return transformer
    # LoRA: bf16 base weights; full fine-tuning: float32 master weights (bf16 compute under autocast)
    return build_random_transformer(arch, str(device), torch.bfloat16 if method == "lora" else torch.float32, layers)


def synthetic_entry(args: argparse.Namespace, config) -> dict[str, torch.Tensor]:
    """A latent cache entry of a height x width x frames video (VAE: 8x spatial, 4x temporal): Wan's latents
    [C, F, H, W] and 512 text embeddings; Kandinsky 5's channels-last [F, H, W, C], TEXT_TOKENS Qwen2.5-VL embeddings
    and a CLIP pooled embedding (kandinsky5_inputs.encode_clip's)."""
    grid = ((args.frames - 1) // 4 + 1, args.height // 8, args.width // 8)
    if args.arch in K5_ARCHS:
        return {"latents": torch.randn(*grid, config.in_visual_dim),
                "prompt_embeds": torch.randn(TEXT_TOKENS, config.in_text_dim),
                "pooled_embeds": torch.randn(config.in_text_dim2)}
    return {"latents": torch.randn(16, *grid), "prompt_embeds": torch.randn(512, config.text_dim)}


def model_spec(arch: str, transformer: torch.nn.Module) -> ModelSpec:
    """What make_batch feeds the transformer: a Kandinsky5T2VPipeline's inputs, or Wan2.1 T2V's."""
    if arch in K5_ARCHS:
        return ModelSpec.from_configs(arch, {"_class_name": kandinsky5_facts.T2V_PIPELINE}, dict(transformer.config))
    return T2V


def k5_variants(config, max_density: float | None, device: torch.device) -> list[tuple[str, SparsityConfig]]:
    """Kandinsky 5's rows: dense, its trained mask, and the fast config at the model's trained P and window (the
    shipped file names Lite's), each NABLA row capped at `max_density` where given. On CUDA, whose backward takes
    128-token key blocks only (nabla.backend.check_trainable), one NABLA row: the trained P and window on 128-token
    blocks, what `finetune` trains Kandinsky 5 with there."""
    trained = kandinsky5_facts.trained_config(config)
    cap, suffix = ({}, "") if max_density is None else ({"max_density": max_density}, f", max density {max_density:g}")
    if device.type == "cuda":
        coarse = trained.replace(block_size=128, **cap)
        return [("dense", SparsityConfig()), (f"NABLA P {trained.threshold:g} + STA, block 128{suffix}", coarse)]
    fast = load_config(find_config("kandinsky5-fast")).replace(threshold=trained.threshold,
                                                                sta_window=trained.sta_window)
    return [("dense", SparsityConfig()),
            (f"NABLA trained (P {trained.threshold:g} + STA, block 64){suffix}", trained.replace(**cap)),
            (f"kandinsky5-fast (query block 128){suffix}", fast.replace(**cap))]


@contextlib.contextmanager
def step_clock(device: torch.device) -> Iterator[Callable[[], float]]:
    """Seconds of what runs inside (read after the block): CUDA events around it on the current stream, which the
    update ends on, or the wall clock on the CPU."""
    seconds: list[float] = []
    sync(device)
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        yield lambda: seconds[0]
        end.record()
        end.synchronize()
        seconds.append(start.elapsed_time(end) / 1e3)
    else:
        begin = time.perf_counter()
        yield lambda: seconds[0]
        seconds.append(time.perf_counter() - begin)


def run_variant(args: argparse.Namespace, method: str, sparsity: SparsityConfig, parallel: DataParallel) -> dict:
    device = parallel.device
    training = TrainingConfig(method=method, height=args.height, width=args.width, frames=args.frames,
                              rank=args.rank, alpha=args.rank, steps=args.steps + 1, batch_size=1,
                              gradient_accumulation=args.batch // parallel.world_size)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)  # the same LoRA on every rank and in every run
    transformer = make_trainable(build(args.arch, method, device, args.layers), training)
    attention = SparseAttention(transformer, sparsity, SparsitySchedule(), compile=device.type == "cuda")
    if parallel.distributed:
        shard_transformer(transformer, dtype)
    optimizer, scheduler = build_optimizer(transformer, training)
    entries, spec = [synthetic_entry(args, transformer.config)], model_spec(args.arch, transformer)
    shift = K5_SHIFT if spec.kandinsky5 else WAN_SHIFT
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times, losses = [], []
    for step in range(args.steps + 1):
        attention.start_step(step)
        batches = [make_batch(entries, sample_numbers(step, micro, training, parallel), training, shift, device, dtype,
                              spec) for micro in range(training.gradient_accumulation)]
        with step_clock(device) as elapsed, \
                record_memory() if args.trace_memory and step == args.steps else contextlib.nullcontext() as trace:
            loss, _ = optimizer_step(transformer, optimizer, scheduler, iter(batches), training.max_grad_norm, parallel)
        times.append(elapsed())
        losses.append(loss)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    density = attention.mean_density()
    if args.trace_memory and parallel.is_main:
        print(memory_report(trace[0]), flush=True)
    del transformer, optimizer, scheduler, attention
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"s": sum(times[1:]) / args.steps, "first": times[0], "peak": peak, "density": density, "losses": losses}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="1.3B", choices=["1.3B", "14B", *random_kandinsky5.ARCHS],
                        help="Wan2.1 or Kandinsky 5 (10s) architecture (default: 1.3B)")
    parser.add_argument("--height", type=int, help="default: 480 (Wan), 512 (Kandinsky 5: its 10s checkpoints' video)")
    parser.add_argument("--width", type=int, help="default: 832 (Wan), 768 (Kandinsky 5)")
    parser.add_argument("--frames", type=int, help="default: 81 (Wan), 241 (Kandinsky 5)")
    parser.add_argument("--methods", nargs="+", choices=["lora", "full"], default=["lora"])
    parser.add_argument("--rank", type=int, default=32, help="LoRA rank (alpha = rank) (default: 32)")
    parser.add_argument("--steps", type=int, default=3, help="timed optimizer steps per variant (default: 3)")
    parser.add_argument("--batch", type=int, default=1, help="samples per optimizer step over all processes, a "
                        "multiple of their number (default: 1)")
    parser.add_argument("--layers", type=int, default=None, help="blocks to build instead of the architecture's")
    parser.add_argument("--trace-memory", action="store_true", help="CUDA: print what is alive at the last timed "
                        "step's memory peak, by tensor size")
    parser.add_argument("--max-density", type=float, help="cap the NABLA rows' blocks per query row (default: 0.1 for "
                        "Wan; none for Kandinsky 5: its trained mask)")
    parser.add_argument("--smoke", action="store_true", help="tiny model on the CPU: Wan's at 32x32x9, dense only; "
                        "with --arch k5-lite or k5-pro the tiny Kandinsky 5 at 512x256x5, LoRA, every row")
    args = parser.parse_args()
    kandinsky5 = args.arch in random_kandinsky5.ARCHS
    if kandinsky5 and "full" in args.methods:
        parser.error("--methods full: finetune trains a LoRA on Kandinsky 5 (full fine-tuning is refused there)")
    size = random_kandinsky5.ARCHS[args.arch].size if kandinsky5 else (480, 832, 81)
    args.height, args.width, args.frames = (given or default for given, default in
                                            zip((args.height, args.width, args.frames), size))
    if args.smoke and kandinsky5:  # 2 x 4 tiles a frame: the STA window (3 wide) leaves blocks out: sparse rows
        args.arch, args.height, args.width, args.frames, args.steps, args.rank = "k5-tiny", 256, 512, 5, 2, 4
    elif args.smoke:
        args.arch, args.height, args.width, args.frames, args.steps = "tiny", 32, 32, 9, 2
        args.methods, args.rank = ["lora", "full"], 4
    if args.layers is not None and args.layers < 1:
        parser.error(f"--layers {args.layers}: a positive number of blocks")
    parallel = init_data_parallel("cpu" if args.smoke else None)
    if args.trace_memory and parallel.device.type != "cuda":
        parser.error(f"--trace-memory records CUDA allocations; this run is on {parallel.device.type}")
    if args.batch < 1 or args.batch % parallel.world_size:
        parser.error(f"--batch {args.batch}: a positive multiple of the {parallel.world_size} processes")
    if args.arch in K5_ARCHS and parallel.distributed:
        parser.error("Kandinsky 5 runs in one process: shard_transformer shards Wan's `blocks`, not its "
                     "visual_transformer_blocks")
    if args.arch in K5_ARCHS:  # backend auto: its sparse rows run on the CPU too (Wan's insist on FLASH)
        variants = k5_variants(build_config(args.arch), args.max_density, parallel.device)
    elif parallel.device.type == "cuda":
        cap = NABLA.max_density if args.max_density is None else args.max_density
        variants = [("dense", SparsityConfig()), (f"NABLA {cap:.0%}, block 128, flash", NABLA.replace(max_density=cap))]
    else:
        variants = [("dense", SparsityConfig())]
        if parallel.is_main:
            print("skipping the NABLA rows: they run FLASH, on CUDA")
    rows = [row for method in args.methods for row in method_rows(args, method, variants, parallel)]
    if parallel.is_main:
        print(f"\n{HEADER}\n|{'---|' * (HEADER.count('|') - 1)}")
        print("\n".join(rows))
    close(parallel)


def build_config(arch: str) -> dict:
    """The transformer config of a Kandinsky 5 `arch` (the tiny one's attention keys), for its trained sparsity."""
    return LITE_10S_ATTENTION if arch == "k5-tiny" else random_kandinsky5.transformer_config(arch)


def method_rows(args: argparse.Namespace, method: str, variants: list, parallel: DataParallel) -> list[str]:
    """One table row per attention variant of `method`, the first (dense) the speedups' reference."""
    rows, dense = [], None
    for name, sparsity in variants:
        result = run_variant(args, method, sparsity, parallel)
        dense = dense or result["s"]
        losses = ", ".join(f"{loss:.4f}" for loss in result["losses"])
        rows.append(f"| {args.arch} | {args.width}x{args.height}x{args.frames} | {method} | {name} | "
                    f"{result['s']:.3f} | {dense / result['s']:.2f}x | {result['density']:.3f} | "
                    f"{result['peak']:.2f} | {result['first']:.1f} | {parallel.world_size} | {args.batch} | {losses} |")
        if parallel.is_main:
            print(rows[-1], flush=True)
    return rows


if __name__ == "__main__":
    main()
