"""1 GPU against 2 (Ulysses 2, CFG parallel 2), dense and NABLA, in one torchrun launch.

    torchrun --nproc_per_node=2 scripts/bench_parallel.py --arch 14B --height 720 --width 1280 --frames 81

Both ranks build the same random-weight model (same seed), patch it for NABLA (dense rows switch the
patched model to dense SDPA, so every row pays the same tiling), and compile its repeated blocks.
Rows, in order: one GPU (rank 0 alone), CFG parallel on both, Ulysses on both (enabled last:
diffusers cannot switch it off). Each row: a one-step warm-up, then `--steps` timed steps.

    torchrun --nproc_per_node=2 scripts/bench_parallel.py --smoke    # tiny model, CPU, gloo: checks the script
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist

from nabla import SparsityConfig
from wan.api import compile_blocks
from wan.attention.patch import patch_transformer
from wan.benchmarking import build_pipeline, model_args, run_steps
from wan.defaults import DIST_BACKEND_HELP, DIST_BACKENDS
from wan.speedups.parallel import enable_cfg_parallel, enable_ulysses, init_parallel


def main() -> None:
    args = model_args(__doc__, steps=1, archs=("1.3B", "14B"),  # one transformer: Wan2.1 T2V
                      extra=lambda p: p.add_argument("--dist-backend", choices=DIST_BACKENDS, help=DIST_BACKEND_HELP))

    # One mesh for both modes: CFG parallel uses the (cfg) pairs, Ulysses a 2-rank ulysses group.
    cfg_setup = init_parallel(1, cfg_parallel=True, backend=args.dist_backend)
    rank = cfg_setup.rank
    uly_setup = init_parallel(2, cfg_parallel=False, backend=args.dist_backend)
    pipe = build_pipeline(args, str(cfg_setup.device))
    device_name = torch.cuda.get_device_name() if cfg_setup.device.type == "cuda" else "CPU"
    nabla = SparsityConfig(mode="nabla", threshold=args.threshold, block_size=args.block_size,
                           max_density=args.max_density)
    dense = SparsityConfig(mode="full")
    patch = patch_transformer(pipe.transformer, nabla)
    if cfg_setup.device.type == "cuda":  # what generate.py runs there; the CPU smoke only checks the script
        compile_blocks(pipe.transformer)
    rows: list[tuple[str, str, float]] = []

    def timed(layout: str, name: str, config: SparsityConfig, ranks: list[int]) -> None:
        patch.set_config(config)
        if rank in ranks:
            run_steps(pipe, args, 1)
            steps = run_steps(pipe, args, args.steps)
            rows.append((layout, name, sum(steps) / len(steps)))
            if rank == 0:
                print(f"[{time.strftime('%H:%M:%S')}] {layout} {name}: {rows[-1][2]:.2f} s/step", flush=True)
        dist.barrier()

    for name, config in (("NABLA", nabla), ("dense", dense)):
        timed("1 GPU", name, config, [0])
    inner = pipe.transformer.forward
    enable_cfg_parallel(pipe.transformer, cfg_setup)
    for name, config in (("NABLA", nabla), ("dense", dense)):
        timed("2 GPUs, CFG parallel", name, config, [0, 1])
    pipe.transformer.forward = inner
    enable_ulysses(pipe.transformer, uly_setup)
    for name, config in (("NABLA", nabla), ("dense", dense)):
        timed("2 GPUs, Ulysses 2", name, config, [0, 1])

    if rank == 0:
        base = {name: s for layout, name, s in rows if layout == "1 GPU"}
        print(f"\n## {args.title} {args.width}x{args.height} x {args.frames} frames, {device_name}, "
              f"torch {torch.__version__}; {args.steps} timed step(s) after a one-step warm-up; NABLA max_density "
              f"{args.max_density}, block {args.block_size}; compiled blocks on CUDA\n")
        print("| GPUs | attention | s/step | speedup vs 1 GPU |")
        print("|---|---|---:|---:|")
        for layout, name, s in rows:
            print(f"| {layout} | {name} | {s:.2f} | {base[name] / s:.2f}x |")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
