"""A generate run's loaded pipeline: loading (with --lora, and the checks a hub id's files hid until then),
--compare's stock reference, the levers (FP8, NABLA, multi-GPU, the step cache) on every expert, and the warm-up."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from nabla.config import SparsityConfig
from wan.generate.plan import DTYPES, Plan, check_model, token_grid
from wan.generate.scheduler import scheduler_for
from wan.generate.settings import GenerationSettings
from wan.models.spec import MAX_TEXT_TOKENS, ModelSpec


def warm_up(pipe, patch, settings: GenerationSettings, device: str) -> None:
    """The untimed warm-up on CUDA: compile the sparse kernels of every expert, and where it has dense_steps (or layers
    that can fall back to dense, which keeps steps on which all of them do in raster order) its raster-order dense
    graph too: a dense step, then a sparse one, in each expert's part of a run long enough to reach both."""
    from nabla.backend import dense_above, resolve_backend
    from wan.generate.run import generate
    from wan.models.experts import warmup_steps

    handles = patch.experts if patch else []
    configs = [handle.state.config for handle in handles]
    dense_first = any(
        c.is_sparse and (c.dense_steps > 0 or dense_above(c, resolve_backend(c.backend, device, pipe.transformer.dtype))
                         < 1.0) for c in configs)
    steps, boundary = warmup_steps(pipe, 1 + dense_first)
    for handle, config, first_step in zip(handles, configs, [0, boundary]):
        handle.state.config = config.replace(dense_steps=first_step + dense_first)
    with first_frame_decoding(pipe.vae):
        generate(pipe, settings, steps=steps)
    for handle, config in zip(handles, configs):
        handle.state.config = config


@contextlib.contextmanager
def first_frame_decoding(vae) -> Iterator[None]:
    """Inside the block the VAE decodes only the first latent frame: a warm-up meets the decoder's kernels at the
    video's size without repeating the whole decode, which at 720p takes seconds."""
    decode = vae.decode
    vae.decode = lambda latents, *args, **kwargs: decode(latents[:, :, :1], *args, **kwargs)
    try:
        yield
    finally:
        del vae.decode  # the class's method again


@dataclasses.dataclass
class Session:
    """The loaded pipeline with every lever applied: what each video of the run is made and reported with."""

    pipe: Any
    patch: Any  # the first expert's wan.attention.patch.NablaPatch, or None (mode full, no cache)
    names: tuple[str, ...]  # the experts' attribute names: ("transformer",) or ("transformer", "transformer_2")
    compiled: bool
    device: str
    main_rank: bool
    recorder: Any  # wan.generate.stats.StatsRecorder with --stats, else None
    #: --compare's stock-model run: its frames, the file they went to, its seconds; else None
    full: tuple[Any, Path, float] | None
    #: outputs that could not be encoded (their frames went to .npy files)
    unwritten: list[Path] = dataclasses.field(default_factory=list)
    #: the seconds of the process's start-up: loading (with LoRAs), FP8 quantisation, the warm-up (compilation)
    startup: dict[str, float] = dataclasses.field(default_factory=dict)
    #: --compare's stock-model run: the seconds of its phases (wan.generate.run.generate's `phases`), its writing's
    full_phases: dict[str, Any] = dataclasses.field(default_factory=dict)

    def save(self, frames, path: Path, fps: int) -> Path:
        from wan.io.video import write_video_or_frames

        written, reason = write_video_or_frames(frames, path, fps)
        if reason is not None:
            self.unwritten.append(path)
            print(f"error: could not write {path} ({reason}); its frames are saved in {written} (numpy.load reads "
                  "them)", file=sys.stderr)
        return written


def prepare(args: argparse.Namespace, plan: Plan) -> Session:
    """Load the pipeline, run --compare's stock reference, then apply the levers (FP8, NABLA, parallelism, the
    cache) to every expert and warm up."""
    from wan.models.spec import EXPERT_NAMES

    setup = None
    if args.ulysses > 1 or args.cfg_parallel:
        from wan.speedups.parallel import init_parallel

        setup = init_parallel(args.ulysses, args.cfg_parallel, args.dist_backend)
    device = str(setup.device) if setup else plan.device
    start = time.perf_counter()
    pipe, transformers = _load(args, plan, device, setup is None or setup.is_main)
    loading = time.perf_counter() - start
    # On CUDA the blocks are compiled (unless --no-compile) and flex_attention always is: an untimed warm-up first.
    warmup = torch.device(device).type == "cuda" and not args.no_warmup
    compile_blocks = False if args.no_compile else None  # None: compiled on CUDA, not on the CPU
    session = Session(pipe, None, EXPERT_NAMES[:len(transformers)], False, device, setup is None or setup.is_main,
                      None, None, startup={"loading": loading})
    if args.compare:
        _run_reference(session, plan, warmup, compile_blocks)
    _apply_levers(session, transformers, plan, setup, compile_blocks)
    if warmup:
        start = time.perf_counter()
        warm_up(pipe, session.patch, plan.settings, device)
        session.startup["warm_up"] = time.perf_counter() - start
    if args.stats is not None and session.patch:
        from wan.generate.stats import StatsRecorder, default_mask_steps

        session.recorder = StatsRecorder(default_mask_steps(plan.sparsity.dense_steps, plan.settings.steps))
    return session


def _load(args: argparse.Namespace, plan: Plan, device: str, main: bool) -> tuple[Any, list]:
    """The pipeline (with --lora fused) and its transformers, and the checks that need the loaded model: a hub id's
    pipeline class, experts and TI2V defaults are known only now."""
    from wan.models.experts import experts
    from wan.models.loading import load_pipeline

    settings = plan.settings
    pipe = load_pipeline(settings.model, device=device, dtype=DTYPES.get(args.dtype), cpu_offload=args.cpu_offload,
                         transformer=args.transformer, image=settings.image is not None,
                         vae_dtype=DTYPES[settings.vae_dtype])
    # fused: plain Linear layers that FP8, the patch and compilation take as they are; each LoRA's delta adds
    for index, (path, scale) in enumerate(plan.loras):
        from wan.models.lora import load_lora

        load_lora(pipe, path, scale, adapter=f"lora{index}" if index else "lora")
    pipe.set_progress_bar_config(disable=not main)
    transformers = experts(pipe, "generate")  # Wan2.2 A14B: both experts, each patched, quantised and cached
    if plan.spec is None:  # a hub id: its facts are known only now
        check_model(plan, ModelSpec.from_pipeline(pipe, settings.model))
    settings = plan.settings
    pipe.scheduler = scheduler_for(pipe.scheduler, settings.scheduler, settings.flow_shift, settings.sigmas)
    return pipe, transformers


def _run_reference(session: Session, plan: Plan, warmup: bool, compile_blocks: bool | None) -> None:
    """--compare's reference: the stock model (full attention, no FP8, no cache), its blocks compiled alike."""
    from wan.api import disable_nabla, enable_nabla
    from wan.generate.run import generate

    pipe, settings = session.pipe, dataclasses.replace(plan.settings, cfg_truncation=None)  # the stock guidance
    enable_nabla(pipe, SparsityConfig(mode="full"), compile=compile_blocks)
    if warmup:
        start = time.perf_counter()
        with first_frame_decoding(pipe.vae):
            generate(pipe, settings, steps=1)
        session.startup["reference_warm_up"] = time.perf_counter() - start
    full_frames, full_seconds = generate(pipe, settings, phases=session.full_phases)
    start = time.perf_counter()
    session.full = full_frames, session.save(full_frames, plan.full_output, settings.fps), full_seconds
    session.full_phases["writing"] = time.perf_counter() - start
    disable_nabla(pipe)


def _apply_levers(session: Session, transformers: list, plan: Plan, setup: Any, compile_blocks: bool | None) -> None:
    """FP8 weights, then NABLA, parallelism and the cache, on every expert, in the order their hooks need."""
    from wan.api import enable_nabla
    from wan.models.experts import boundary_step
    from wan.speedups.cache import enable_cache, expert_cache
    from wan.speedups.precision import apply_precision

    pipe, settings = session.pipe, plan.settings
    start = time.perf_counter()
    for transformer in transformers:
        apply_precision(transformer, plan.precision)
    if plan.precision != "bf16":
        session.startup["fp8"] = time.perf_counter() - start
    uneven = setup is not None and math.prod(token_grid(settings, plan.spec)) % setup.ulysses != 0
    # with a cache, full attention is patched too (dense, raster order: the stock computation), so that the
    # patch counts the blocks computed; FP8 weights are in place before the blocks are compiled
    session.patch = enable_nabla(pipe, plan.sparsity, config_2=plan.sparsity_2, compile=compile_blocks,
                                 pad_dense=uneven, always=plan.cache is not None)
    session.compiled = bool(getattr(pipe.transformer, "_nabla_compiled", False))
    if setup is not None:  # after the patch: with pad_dense, tile before the sequence split, untile after the gather
        from wan.speedups.parallel import check_degree, enable_cfg_parallel, enable_ulysses

        for transformer in transformers:
            check_degree(transformer.config.num_attention_heads, setup.ulysses)
            enable_ulysses(transformer, setup)
            if setup.cfg_parallel:
                enable_cfg_parallel(transformer, setup)
    # Last, so its hooks wrap everything else: a skipped block skips NABLA's mask, its attention and the
    # all-to-alls around it, and TaylorSeer extrapolates proj_out's output after the context-parallel gather.
    # The low-noise expert's hooks count its steps from the boundary: its schedule is shifted to the run's.
    first_steps = [0, boundary_step(pipe, settings.steps)][:len(transformers)]
    for transformer, first_step in zip(transformers, first_steps):
        enable_cache(transformer, expert_cache(plan.cache, first_step))


def warn_long_prompt(pipe: Any, prompt: str, where: str = "prompt") -> None:
    """One line on stderr where the text encoder will not read the whole prompt (the pipeline cuts it silently)."""
    tokenizer = getattr(pipe, "tokenizer", None)
    if tokenizer is None:
        return
    tokens = len(tokenizer(prompt, add_special_tokens=True).input_ids)
    if tokens > MAX_TEXT_TOKENS:
        print(f"warning: {where} is {tokens} tokens long; the text encoder reads the first {MAX_TEXT_TOKENS}, the "
              "rest does not reach the video", file=sys.stderr)
