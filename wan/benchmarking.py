"""What the benchmark scripts (scripts/bench_*.py) share: timers, the Wan attention shapes and inputs, the --backends
option, the float32 reference of masked attention and its gradients (also tests/test_gpu.py's), the end-to-end
benchmarks' options, pipeline and timed steps, and what is alive at a CUDA memory trace's peak.

The model builders (wan.models.tiny, wan.models.random) are imported where a pipeline is built, so that the attention
benchmarks (bench_attention, bench_backward, bench_mask) import no diffusers.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import re
import statistics
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from nabla.backend import flash_unavailable_reason
from nabla.block_mask import attended_mask
from nabla.config import SparsityConfig
from wan.models.experts import experts
from wan.models.spec import I2V_PIPELINE, VACE_PIPELINE

# --- Attention: shapes, inputs, fixed densities, the float32 reference, backends ---

HEAD_DIM = 128
LOCAL_SCALE = 2.0  # --inputs local: length scale, in tiles, of the positional part of q and k


@dataclass(frozen=True)
class Shape:
    heads: int
    T: int
    H: int
    W: int


SHAPES = {
    "1.3B-480p": Shape(heads=12, T=21, H=30, W=52),
    "14B-720p": Shape(heads=40, T=21, H=45, W=80),
}
# Padded in both H and W (12x20 -> 16x24), so the padding paths run too.
SMOKE_SHAPES = {"smoke": Shape(heads=2, T=2, H=12, W=20)}


def local_part(shape: Shape, device: torch.device) -> torch.Tensor:
    """[S, HEAD_DIM] a smooth function of each raster token's (t, h, w), in tiles, whose dot products fall
    off with distance (random Fourier features of a Gaussian kernel of length scale LOCAL_SCALE tiles)."""
    t, h, w = torch.meshgrid(*(torch.arange(n, device=device) for n in (shape.T, shape.H, shape.W)), indexing="ij")
    position = torch.stack([t, h / 8, w / 8], -1).flatten(0, 2).float()  # tiles are 1 x 8 x 8 tokens
    frequencies = torch.randn(3, HEAD_DIM, device=device) / LOCAL_SCALE
    phases = torch.rand(HEAD_DIM, device=device) * 2 * torch.pi
    return torch.cos(position @ frequencies + phases) * 2 * HEAD_DIM**0.5  # pooled logits ~ 4x the kernel


def fixed_density(density: float, block_size: int, backend: str) -> SparsityConfig:
    # The threshold keeps nearly every block; min = max density then clamps each row to ceil(d * nb) blocks.
    # dense_above 1.0: time the sparse kernel itself, never the dense fallback.
    return SparsityConfig(
        mode="nabla", threshold=0.99, block_size=block_size, min_density=density, max_density=density,
        backend=backend, dense_above=1.0,
    )


def masked_reference(q, k, v, keep, layout, config, grad_out, chunk: int = 4096):
    """float32 attention of the real query rows under the block mask `keep`, written out chunk by chunk of rows (a
    whole S x S mask at 14B 720p has more than 2**31 entries, past what SDPA's masked kernels index), and the
    gradients of <out, grad_out> with respect to q, k, v: (out of the real rows, [dq, dk, dv])."""
    q, k, v = (x.detach().float().requires_grad_() for x in (q, k, v))
    valid = layout.valid_on(q.device)
    blocks = attended_mask(keep, config.query_merge)
    outs = []
    for rows in valid.nonzero().flatten().split(chunk):
        allowed = blocks[:, :, rows // config.block_size].repeat_interleave(config.block_size, -1)
        allowed = allowed[..., : layout.padded_length] & valid
        scores = (q[:, :, rows] @ k.transpose(-1, -2)) / q.shape[-1] ** 0.5
        out = scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ v
        (out * grad_out[:, :, rows].float()).sum().backward()
        outs.append(out.detach())
    return torch.cat(outs, 2), [q.grad, k.grad, v.grad]


def add_backends_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backends", nargs="+", choices=["triton", "flash"], help="default: triton, and flash "
                        "where FlashAttention-4 runs")


def chosen_backends(args: argparse.Namespace, device: torch.device) -> list[str]:
    """--backends, else triton and, where FlashAttention-4 runs, flash."""
    return args.backends or ["triton"] + (["flash"] if flash_unavailable_reason(device) is None else [])


# --- Logs and timers ---

_START = time.perf_counter()


def log(message: str) -> None:
    """`message` after the seconds since this module was imported (the attention benchmarks' log)."""
    print(f"[{time.perf_counter() - _START:7.1f}s] {message}", flush=True)


def log_clock(message: str) -> None:
    """`message` after the time of day (the end-to-end benchmarks' log)."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def warm_up(fn: Callable[[], object], device: torch.device) -> object:
    """One call, to compile and autotune before timing."""
    out = fn()
    sync(device)
    return out


def bench_ms(fn: Callable[[], object], device: torch.device, rep_ms: int, cpu_iters: int) -> float:
    """Median milliseconds per call of an already warmed-up `fn`."""
    if device.type == "cuda":
        from triton.testing import do_bench  # triton ships with CUDA torch only

        return do_bench(fn, warmup=25, rep=rep_ms, return_mode="median")
    times = []
    for _ in range(cpu_iters):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def gpu_ms(fn: Callable[[], object], device: torch.device, calls: int = 10) -> float:
    """Milliseconds per call with the launches hidden: the calls wait in the queue behind matmuls, as many as it
    takes for the GPU to be still busy with them when the last call has been queued (else it would wait for the
    CPU, as 1.3B 480p's forward + backward did behind 40 ms)."""
    if device.type != "cuda":
        return bench_ms(fn, device, 100, cpu_iters=1)
    busy = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for cover in (30, 120, 480):  # matmuls of ~1.4 ms on an H100 or H200
        torch.cuda.synchronize(device)
        for _ in range(cover):
            busy @ busy
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        hidden = not start.query()  # the GPU has not reached the first call yet
        torch.cuda.synchronize(device)
        if hidden:
            break
    return start.elapsed_time(end) / calls


# --- Where one call's device time goes (torch.profiler; bench_backward, bench_kandinsky5 --profile) ---

@dataclass
class Profile:
    """One lone call (a forward, or a forward and its backward) as the device ran it."""

    kernel_ms: float  # the call's kernels, end to end minus idle
    idle_ms: float  # the device idle between the call's start and its last kernel (waiting for launches)
    parts: dict[str, float]  # kernel_ms by `kernel_label`, largest first


def kernel_label(name: str) -> str:
    """A short name for a kernel of the call: FA4's by their part, the rest by their own name."""
    for pattern, label in (("bwd_preprocess", "FA4 backward pre"), ("bwd_postprocess", "FA4 backward post"),
                           ("flash_bwd", "FA4 backward"), ("flash_fwd", "FA4 forward")):
        if pattern in name:
            return label
    return re.sub(r"_+\d+$", "", name)[:48]


#: kernel name parts (lower case) of each coarse group, checked in this order (FA4's CuTe kernels are cutlass ones
#: too); on the CPU, the operators' names
KERNEL_GROUPS = (("attention", ("fa4", "flash", "fmha", "flex", "attention")),
                 ("matmul", ("gemm", "nvjet", "xmma", "cutlass", "matmul", "scaled_mm", "wgmma", "linear", "addmm",
                             "aten::mm", "aten::bmm")))


def kernel_groups(parts: dict[str, float]) -> dict[str, float]:
    """`Profile.parts` summed into attention, matmul and other (norms, rotary embedding, modulation, the mask build,
    copies), largest first."""
    groups = {"attention": 0.0, "matmul": 0.0, "other": 0.0}
    for name, ms in parts.items():
        group = next((g for g, needles in KERNEL_GROUPS if any(n in name.lower() for n in needles)), "other")
        groups[group] += ms
    return dict(sorted(groups.items(), key=lambda item: -item[1]))


def timeline(spans: list[tuple[str, float, float]]) -> Profile:
    """`Profile` of (name, start us, end us) spans on one device queue: the first is a marker queued just before the
    call, so the time from its end to the first kernel is the call's first launch."""
    marker, *kernels = sorted(spans, key=lambda span: span[1])
    parts: dict[str, float] = {}
    idle, last = 0.0, marker[2]
    for name, start, end in kernels:
        idle += max(0.0, start - last)
        last = max(last, end)
        parts[kernel_label(name)] = parts.get(kernel_label(name), 0.0) + (end - start) / 1e3
    busy = (last - marker[2] - idle) / 1e3
    return Profile(busy, idle / 1e3, dict(sorted(parts.items(), key=lambda item: -item[1])))


def profile_call(fn, device: torch.device, calls: int = 3) -> Profile:
    """`timeline` of the last of `calls` calls, alone (synchronised before and after), as torch.profiler saw it: on
    CUDA the device's kernels; on the CPU, where there is no device queue, the top-level operators."""
    from torch.profiler import ProfilerActivity, profile

    marker = torch.zeros(1, device=device)
    for _ in range(calls - 1):
        fn()
    sync(device)
    activities = [ProfilerActivity.CUDA] if device.type == "cuda" else [ProfilerActivity.CPU]
    with profile(activities=activities) as prof:
        marker.add_(1)
        fn()
        sync(device)
    on_device = torch.autograd.DeviceType.CUDA if device.type == "cuda" else torch.autograd.DeviceType.CPU
    events = [e for e in prof.events() if e.device_type == on_device and (device.type == "cuda" or e.cpu_parent is None)]
    return timeline([(e.name, e.time_range.start, e.time_range.end) for e in events])


# --- End-to-end runs (bench_e2e, bench_parallel) ---

PROMPT = "a red fox runs through fresh snow at dawn, cinematic"


def model_args(description: str, steps: int, extra: Callable[[argparse.ArgumentParser], None] | None = None,
               argv: Sequence[str] | None = None, archs: Sequence[str] | None = None,
               handed_on: Mapping[str, str] | None = None) -> argparse.Namespace:
    """The options of the end-to-end benchmarks: architecture (`archs`, default: all of wan.models.random's ARCHS;
    `handed_on`: those another benchmark takes before this parser runs, by what they are, listed in its help and
    errors), video size, timed steps, NABLA budget, --smoke."""
    from wan.models.random import ARCHS

    archs, handed_on = tuple(ARCHS) if archs is None else archs, handed_on or {}
    described = [f"{name}: {ARCHS[name].title}, {ARCHS[name].size[1]}x{ARCHS[name].size[0]} x {ARCHS[name].size[2]} "
                 "frames" for name in archs] + [f"{name}: {what}" for name, what in handed_on.items()]
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", choices=[*archs, *handed_on], default="14B",
                        help="architecture (default: 14B): " + "; ".join(described))
    parser.add_argument("--height", type=int, help="default: the architecture's")
    parser.add_argument("--width", type=int, help="default: the architecture's")
    parser.add_argument("--frames", type=int, help="default: the architecture's")
    parser.add_argument("--steps", type=int, default=steps, help="timed denoising steps per variant (after warm-up)")
    parser.add_argument("--max-density", type=float, default=0.1, help="NABLA density cap (random weights)")
    parser.add_argument("--threshold", type=float, default=0.7)
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--smoke", action="store_true", help="the tiny offline model of --arch's family on CPUs, "
                        "64x96 x 9 frames")
    if extra is not None:
        extra(parser)
    args = parser.parse_args(argv)
    spec = ARCHS[args.arch]
    if args.smoke:
        args.height, args.width, args.frames, args.block_size = 64, 96, 9, 64
        args.title = f"tiny {spec.tiny_family} (--smoke)"
        return args
    if not torch.cuda.is_available():
        parser.error("the real architectures need CUDA; use --smoke on the CPU")
    for name, default in zip(("height", "width", "frames"), spec.size):
        if getattr(args, name) is None:
            setattr(args, name, default)
    args.title = spec.title
    return args


def build_pipeline(args: argparse.Namespace, device: str = "cuda"):
    """The tiny model of --arch's family with --smoke, else the real architecture with random weights built on
    `device`."""
    from wan.models.random import ARCHS, build_random_pipeline
    from wan.models.tiny import build_tiny_pipeline

    if args.smoke:
        pipe = build_tiny_pipeline(family=ARCHS[args.arch].tiny_family)
    else:
        log_clock(f"building {args.title} with random weights on {device}")
        pipe = build_random_pipeline(args.arch, device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pipeline_inputs(pipe, args) -> dict:
    """The call's inputs beyond the prompt, random pixels (the weights are random too): an image-to-video pipeline's
    first frame; a VACE pipeline's control video, and its mask, which keeps the video's left half."""
    random = np.random.RandomState(0)
    if type(pipe).__name__ == VACE_PIPELINE:
        video = [Image.fromarray(random.randint(0, 256, (args.height, args.width, 3), np.uint8))
                 for _ in range(args.frames)]
        mask = np.zeros((args.height, args.width), np.uint8)
        mask[:, args.width // 2:] = 255
        return {"video": video, "mask": [Image.fromarray(mask)] * args.frames}
    if type(pipe).__name__ != I2V_PIPELINE:
        return {}
    return {"image": Image.fromarray(random.randint(0, 256, (args.height, args.width, 3), np.uint8))}


def run_steps(pipe, args, steps: int) -> list[float]:
    """Run the pipeline for `steps` steps (latents out, no VAE decode); returns seconds per step, counted from the
    first transformer call (text and image encoding, and I2V's VAE encoding of its condition, stay out)."""
    stamps: list[float] = []
    device = pipe._execution_device

    def on_first_forward(module, inputs):
        if not stamps:
            sync(device)
            stamps.append(time.perf_counter())

    def on_step_end(pipe, step, timestep, kwargs):
        sync(device)
        stamps.append(time.perf_counter())
        return kwargs

    hooks = [t.register_forward_pre_hook(on_first_forward) for t in experts(pipe, "bench_e2e")]
    try:
        with torch.inference_mode():
            pipe(prompt=PROMPT, negative_prompt="", height=args.height, width=args.width, num_frames=args.frames,
                 num_inference_steps=steps, guidance_scale=5.0, generator=torch.Generator("cpu").manual_seed(0),
                 output_type="latent", callback_on_step_end=on_step_end, **pipeline_inputs(pipe, args))
    finally:
        for hook in hooks:
            hook.remove()
    return [b - a for a, b in itertools.pairwise(stamps)]


# --- What is alive at the peak of a CUDA memory trace (bench_train --trace-memory) ---
# `torch.cuda.memory._snapshot()` after `torch.cuda.memory._record_memory_history(...)`, its allocation events replayed
# to the highest total:
#
#     with record_memory() as trace: step()
#     print(memory_report(trace[0]))


@contextlib.contextmanager
def record_memory(max_entries: int = 400_000) -> Iterator[list]:
    """Record the allocations inside the block; the list it yields then holds the snapshot. Python stacks only: with
    C++ stacks the recording failed in a compiled block's recomputation (torch 2.11, "returned NULL")."""
    taken: list = []
    torch.cuda.memory._record_memory_history(max_entries=max_entries, context="alloc", stacks="python")
    try:
        yield taken
        taken.append(torch.cuda.memory._snapshot())
    finally:
        torch.cuda.memory._record_memory_history(enabled=None)


def alive_at_peak(snapshot: dict, device: int = 0) -> tuple[int, list[dict]]:
    """(the highest total of the allocations made while recording, bytes; the allocation events alive then)."""
    events = snapshot["device_traces"][device]
    live, total, peak, at = {}, 0, 0, -1
    for i, event in enumerate(events):
        if event["action"] == "alloc":
            live[event["addr"]] = event["size"]
            total += event["size"]
        elif event["action"] == "free_completed" and event["addr"] in live:
            total -= live.pop(event["addr"])
        if total > peak:
            peak, at = total, i
    alive = {}
    for event in events[: at + 1]:
        if event["action"] == "alloc":
            alive[event["addr"]] = event
        elif event["action"] == "free_completed":
            alive.pop(event["addr"], None)
    return peak, list(alive.values())


def allocation_site(event: dict) -> str:
    """The innermost frame of an allocation in the project, diffusers or peft (file:line function), else '?'."""
    for frame in event.get("frames", []):
        name = frame["filename"]
        if any(part in name for part in ("/nabla/", "/wan/", "/scripts/", "/diffusers/", "/peft/")):
            return f"{name.rsplit('/', 1)[-1]}:{frame['line']} {frame['name']}"
    return "?"


def memory_report(snapshot: dict, top: int = 12) -> str:
    """The peak and its largest groups of allocations (by size and where they were made), one line each."""
    peak, alive = alive_at_peak(snapshot)
    groups = Counter((event["size"], allocation_site(event)) for event in alive)
    lines = [f"alive at the peak of the traced step: {peak / 2**30:.3f} GiB"]
    for (size, place), count in sorted(groups.items(), key=lambda item: -item[0][0] * item[1])[:top]:
        lines.append(f"  {count:3d} x {size / 2**20:9.2f} MiB  {place}")
    return "\n".join(lines)
