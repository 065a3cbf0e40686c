"""Fine-tuning step benchmark: dense against NABLA (10% of the blocks, 128-token blocks, FLASH), side by side.

    python scripts/bench_train.py --arch 14B --height 720 --width 1280 --frames 81 --methods lora
    python scripts/bench_train.py --arch 1.3B --height 480 --width 832 --frames 81 --methods lora full
    python scripts/bench_train.py --smoke     # the tiny model on the CPU, dense only: checks the script
    python scripts/bench_train.py --arch 14B --height 720 --width 1280 --methods lora --layers 2 --trace-memory
    torchrun --nproc_per_node=2 scripts/bench_train.py --arch 14B --height 720 --width 1280 --methods lora --batch 2
    python scripts/bench_train.py --arch 14B --height 720 --width 1280 --methods lora --batch 2   # its 1-GPU baseline

One optimizer step is what finetune.py runs (wan.train.trainer.optimizer_step): forward, backward and AdamW update,
gradient checkpointing on, batch 1, compiled blocks on CUDA. Random weights at the real Wan2.1 sizes
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
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import time

import torch

from nabla import SparsityConfig
from wan.benchmarking import memory_report, record_memory, sync
from wan.models.random import build_random_transformer
from wan.models.tiny import build_tiny_pipeline
from wan.train.config import SparsitySchedule, TrainingConfig
from wan.train.data_parallel import DataParallel, close, init_data_parallel, shard_transformer
from wan.train.sparsity_schedule import SparseAttention
from wan.train.trainer import build_optimizer, make_batch, make_trainable, optimizer_step, sample_numbers

NABLA = SparsityConfig(mode="nabla", threshold=0.7, max_density=0.1, block_size=128, backend="flash")
HEADER = ("| model | video | method | attention | s/step | speedup vs dense | density | peak GiB | first step s "
          "| GPUs | global batch | losses |")


def build(arch: str, method: str, device: torch.device, layers: int | None = None) -> torch.nn.Module:
    if arch == "tiny":
        transformer = build_tiny_pipeline().transformer.to(device)
        if layers is not None:
            transformer.blocks = transformer.blocks[:layers]
        return transformer
    # LoRA: bf16 base weights; full fine-tuning: float32 master weights (bf16 compute under autocast)
    return build_random_transformer(arch, str(device), torch.bfloat16 if method == "lora" else torch.float32, layers)


def synthetic_entry(args: argparse.Namespace, text_dim: int) -> dict[str, torch.Tensor]:
    """Latents of a height x width x frames video (VAE: 8x spatial, 4x temporal) and 512 text embeddings."""
    latent = (16, (args.frames - 1) // 4 + 1, args.height // 8, args.width // 8)
    return {"latents": torch.randn(latent), "prompt_embeds": torch.randn(512, text_dim)}


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
    entries = [synthetic_entry(args, transformer.config.text_dim)]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times, losses = [], []
    for step in range(args.steps + 1):
        attention.start_step(step)
        batches = [make_batch(entries, sample_numbers(step, micro, training, parallel), training, 3.0, device, dtype)
                   for micro in range(training.gradient_accumulation)]
        sync(device)
        start = time.perf_counter()
        with record_memory() if args.trace_memory and step == args.steps else contextlib.nullcontext() as trace:
            loss, _ = optimizer_step(transformer, optimizer, scheduler, iter(batches), training.max_grad_norm, parallel)
        sync(device)
        times.append(time.perf_counter() - start)
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
    parser.add_argument("--arch", default="1.3B", choices=["1.3B", "14B"], help="Wan2.1 architecture (default: 1.3B)")
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=832)
    parser.add_argument("--frames", type=int, default=81)
    parser.add_argument("--methods", nargs="+", choices=["lora", "full"], default=["lora"])
    parser.add_argument("--rank", type=int, default=32, help="LoRA rank (alpha = rank) (default: 32)")
    parser.add_argument("--steps", type=int, default=3, help="timed optimizer steps per variant (default: 3)")
    parser.add_argument("--batch", type=int, default=1, help="samples per optimizer step over all processes, a "
                        "multiple of their number (default: 1)")
    parser.add_argument("--layers", type=int, default=None, help="blocks to build instead of the architecture's")
    parser.add_argument("--trace-memory", action="store_true", help="CUDA: print what is alive at the last timed "
                        "step's memory peak, by tensor size")
    parser.add_argument("--smoke", action="store_true", help="tiny model, 32x32x9, CPU, dense only")
    args = parser.parse_args()
    if args.smoke:
        args.arch, args.height, args.width, args.frames, args.steps = "tiny", 32, 32, 9, 2
        args.methods, args.rank = ["lora", "full"], 4
    if args.layers is not None and args.layers < 1:
        parser.error(f"--layers {args.layers}: a positive number of blocks")
    parallel = init_data_parallel("cpu" if args.smoke else None)
    if args.trace_memory and parallel.device.type != "cuda":
        parser.error(f"--trace-memory records CUDA allocations; this run is on {parallel.device.type}")
    if args.batch < 1 or args.batch % parallel.world_size:
        parser.error(f"--batch {args.batch}: a positive multiple of the {parallel.world_size} processes")
    variants = [("dense", SparsityConfig())]
    if parallel.device.type == "cuda":
        variants.append(("NABLA 10%, block 128, flash", NABLA))
    elif parallel.is_main:
        print("skipping the NABLA rows: they run FLASH, on CUDA")
    rows = [row for method in args.methods for row in method_rows(args, method, variants, parallel)]
    if parallel.is_main:
        print(f"\n{HEADER}\n|{'---|' * (HEADER.count('|') - 1)}")
        print("\n".join(rows))
    close(parallel)


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
