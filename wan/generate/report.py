"""What a finished `generate` video reports: the run in one label, the summary it prints (with --compare's table
last) and the --stats file."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from nabla.config import SparsityConfig
from wan.generate.phases import describe_phases
from wan.generate.scheduler import describe_sampler
from wan.generate.settings import GenerationSettings
from wan.speedups.cache import describe_cache

if TYPE_CHECKING:  # the plan and the loaded session: both import no report
    from wan.generate.plan import Plan
    from wan.generate.session import Session


def _count(n: int, what: str) -> str:
    return f"{n} {what}" + ("" if n == 1 else "s")


def _per_expert(names: tuple[str, ...], densities: list[float | None]) -> str:
    """ (transformer 0.123, transformer_2 0.456): each expert's mean mask density (n/a where all its steps were dense)."""
    return " (" + ", ".join(f"{name} {'n/a' if d is None else f'{d:.3f}'}" for name, d in zip(names, densities)) + ")"


def describe(config: SparsityConfig, backend: str | None = None) -> str:
    """The sparsity in a few words ("nabla, threshold 0.7, 128-token blocks, flash kernel")."""
    if config.mode == "full":
        return "full attention"
    parts = [config.mode]
    if config.uses_nabla:
        parts.append(f"threshold {config.threshold}")
    if config.uses_sta:
        parts.append("STA window {}x{}x{}".format(*config.sta_window))
    parts.append(f"{config.block_size}-token blocks")
    if config.query_merge > 1:
        parts.append(f"{config.query_block_size}-row kernel blocks")
    if backend is not None:
        parts.append(f"{backend} kernel")
    return ", ".join(parts)


def describe_run(sparsity: SparsityConfig, precision: str, cache: object, backend: str | None = None,
                 sparsity_2: SparsityConfig | None = None) -> str:
    """The configured run in one label: sparsity (and the low-noise expert's where it differs), then FP8 and the
    cache when they are on."""
    parts = [describe(sparsity, backend)]
    if sparsity_2 is not None and sparsity_2 != sparsity:
        parts[0] += f" (transformer_2: {describe(sparsity_2, backend)})"
    if precision != "bf16":
        parts.append(precision)
    if cache is not None:
        parts.append(describe_cache(cache))
    return " + ".join(parts)


@dataclasses.dataclass
class Outcome:
    """What one finished video reports."""

    written: Path
    seconds: float
    density: float | None  # the run's mean mask density (None: no sparse call)
    per_expert: list[float | None] | None  # each expert's, where patched
    steps_report: dict | None  # wan.generate.stats.step_report: computed and cached steps, attention calls
    computed: int  # denoising steps that computed all their blocks
    fidelity: dict | None  # against --compare's stock video
    #: seconds per phase of the video (wan.generate.run.generate's `phases`: text encoding, preparing, denoising and
    #: under "steps" each step's, decoding) and its writing
    phases: dict = dataclasses.field(default_factory=dict)


def write_run_stats(path: Path, plan: Plan, session: Session, settings: GenerationSettings, outcome: Outcome) -> None:
    """--stats: the recorder's per-call report with the run's settings, totals and levers."""
    from wan.generate.stats import masks_path, run_report, write_stats

    patch, recorder = session.patch, session.recorder
    extra = {"device": session.device, "seconds": outcome.seconds,
             "timing": "cuda events" if torch.device(session.device).type == "cuda" else "time.perf_counter",
             "backend": patch.backend if patch else None, "compiled_blocks": session.compiled,
             "dense_fallback_calls": len(patch.state.records.dense_fallbacks) if patch else 0,
             "mean_kernel_density": patch.state.mean_kernel_density() if patch else None,
             "precision": plan.precision, "cache": describe_cache(plan.cache), "experts": list(session.names)}
    if len(session.names) > 1:  # Wan2.2 A14B: the low-noise expert's config and each expert's mean density
        extra.update(config_2=dataclasses.asdict(plan.sparsity_2 or plan.sparsity),
                     mean_density_per_expert=outcome.per_expert)
    if outcome.steps_report is not None:
        extra.update(outcome.steps_report)
    if session.full is not None:
        extra.update(full_seconds=session.full[2], fidelity=outcome.fidelity, full_phases=session.full_phases)
    extra.update(phases=outcome.phases, startup=session.startup)
    report = run_report(recorder, plan.sparsity, settings, **extra)
    stats = write_stats(path, report, recorder.mask_entries() if recorder is not None else [])
    print(f"wrote {stats} and {masks_path(stats)} (attention statistics)")


def phases_line(phases: dict, startup: dict[str, float]) -> str:
    """Where the seconds went: each phase of the video, then the process's start-up (once)."""
    names = {"loading": "loading", "fp8": "FP8 quantisation", "warm_up": "warm-up",
             "reference_warm_up": "reference warm-up"}
    timed = {name: seconds for name, seconds in phases.items() if name != "steps"}
    line = f"phases: {describe_phases(timed, phases.get('steps', []))}"
    if startup:
        line += "; start-up (once): " + ", ".join(f"{names.get(n, n)} {s:.2f} s" for n, s in startup.items())
    return line


def _model_lines(plan: Plan, session: Session, settings: GenerationSettings) -> list[str]:
    """The LoRAs fused and the sampler, where they were set."""
    lines = []
    if plan.loras:
        lines.append("LoRAs fused: " + ", ".join(f"{path} (scale {scale:g})" for path, scale in plan.loras))
    if settings.scheduler is not None or settings.flow_shift is not None or settings.sigmas is not None:
        lines.append(f"sampler: {describe_sampler(session.pipe.scheduler)}, guidance {settings.guidance_scale:g}")
    if settings.cfg_truncation is not None:
        guided = math.ceil(settings.cfg_truncation * settings.steps)
        lines.append(f"CFG truncation {settings.cfg_truncation:g}: the unconditional pass ran on steps 0-{guided - 1} "
                     f"only ({guided} of {settings.steps})" if guided else "CFG truncation 0: no unconditional pass")
    return lines


def summary_lines(plan: Plan, session: Session, settings: GenerationSettings, outcome: Outcome) -> list[str]:
    """What a finished video prints: the file and its run, the levers, fallbacks, and --compare's table last."""
    from nabla.backend import dense_above

    sparsity, patch, density = plan.sparsity, session.patch, outcome.density
    size = (f"{_count(settings.frames, 'frame')}, {settings.width}x{settings.height}, "
            f"{_count(settings.steps, 'step')}")
    blocks = "compiled" if session.compiled else "not compiled"
    backend = patch.backend if patch else None
    label = describe_run(sparsity, plan.precision, plan.cache, backend, plan.sparsity_2)
    lines = [f"wrote {outcome.written} ({size}, {label}, transformer blocks {blocks}) in {outcome.seconds:.2f} s",
             phases_line(outcome.phases, session.startup)]
    lines += _model_lines(plan, session, settings)
    if plan.precision != "bf16" or plan.cache is not None:
        linears = "FP8 linear layers" if plan.precision == "fp8" else "linear layers in the model's dtype"
        lines.append(f"levers: {linears}, {describe_cache(plan.cache)}; denoising steps computed: {outcome.computed} "
                     f"of {settings.steps} (the others took some or all blocks from the cache)")
    kernel_density = patch.state.mean_kernel_density() if patch and sparsity.query_merge > 1 else None
    if kernel_density is not None:
        lines.append(f"{sparsity.query_block_size}-row kernel query blocks attend the union of their "
                     f"{sparsity.block_size}-token mask rows: the kernel computed {kernel_density:.3f} of the blocks, "
                     f"the mask keeps {density:.3f}")
    if patch and patch.state.records.dense_fallbacks:
        merged = " (the union of the mask rows that a kernel query block merges)" if sparsity.query_merge > 1 else ""
        lines.append(f"{len(patch.state.records.dense_fallbacks)} sparse attention calls ran dense: the kernel would "
                     f"have computed more blocks{merged} than dense_above ({dense_above(sparsity, backend or 'eager'):.2f}"
                     "), where dense attention is faster, or the layer's mask was that dense within the last steps")
    if session.full is None:
        if density is not None:
            experts = _per_expert(session.names, outcome.per_expert) if len(session.names) > 1 else ""
            lines.append(f"mean mask density: {density:.3f}{experts}")
        return lines
    _, full_written, full_seconds = session.full
    lines.append(f"wrote {full_written} ({size}, reference: stock model, full attention, no FP8, no cache, "
                 f"transformer blocks {blocks}) in {full_seconds:.2f} s")
    lines.append("reference " + phases_line(session.full_phases, {}))
    if torch.device(session.device).type != "cuda":  # before the table, which stays the last lines printed
        lines.append("on the CPU the speedup does not show: FlexAttention runs eagerly there, computing every block and "
                     "masking afterwards; it is a GPU effect of the compiled FlexAttention kernels (BENCHMARKS.md), and "
                     "the CPU path is for correctness")
    fidelity = outcome.fidelity
    dens = "n/a (all steps dense)" if density is None else f"{density:.3f}"
    quality = f"{fidelity['psnr']:.2f} | {fidelity['ssim']:.4f} | {fidelity['mad']:.4f}"
    return [*lines, "| attention | seconds | speedup | PSNR (dB) | SSIM | MAD | mean mask density |",
            "|---|---|---|---|---|---|---|", f"| full | {full_seconds:.2f} | 1.00x | inf | 1.0000 | 0.0000 | 1.000 |",
            f"| {label} | {outcome.seconds:.2f} | {full_seconds / outcome.seconds:.2f}x | {quality} | {dens} |"]
