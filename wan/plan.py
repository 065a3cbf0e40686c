"""What `generate` checks before a model loads: the config, the settings, the prompts file, the output paths, the
device, precision and cache, the images, LoRA and parallel flags, resolved into one `Plan`."""

from __future__ import annotations

import argparse
import dataclasses
import math
from pathlib import Path

import torch

from nabla.config import SparsityConfig, load_config, read_yaml
from nabla.layout import TileLayout
from wan.batch import Job, plan_jobs, read_prompts
from wan.cache import cache_config, check_cache_parallel
from wan.experts import check_low_noise_model, check_one_expert, low_noise_config
from wan.images import check_local_model_images, pipeline_images
from wan.model_index import local_ti2v
from wan.precision import check_precision
from wan.settings import (
    TI2V_PIXELS_PER_TOKEN,
    GenerationSettings,
    check_device,
    find_config,
    for_ti2v,
    given_keys,
)
from wan.stats import check_stats_path
from wan.video import check_output_path

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclasses.dataclass
class Plan:
    """Everything that can be checked before a model loads."""

    sparsity: SparsityConfig
    #: the low-noise expert's (Wan2.2 A14B's transformer_2) config from `sparsity_2:`, else None (it takes `sparsity`)
    sparsity_2: SparsityConfig | None
    #: the run's settings (with --prompts, the first entry's prompt: the warm-up's)
    settings: GenerationSettings
    #: the settings a flag or the config gave: a Wan2.2 TI2V model's defaults replace the others
    given: frozenset[str]
    #: the model is Wan2.2 TI2V (from a local folder's model_index.json); None for a hub id, known once loaded
    ti2v: bool | None
    #: the videos to make: one for --prompt, one per entry of --prompts
    jobs: list[Job]
    #: --compare's stock-model video
    full_output: Path | None
    precision: str
    cache: object
    #: the device of a one-process run (torchrun ranks pick their own GPU)
    device: str


def resolve(args: argparse.Namespace) -> Plan:
    """Check the whole input (config, settings, prompts file, output paths, device, precision, cache)."""
    device = check_device(args.device)  # first: the backend and precision checks below ask about this device
    sparsity, data = SparsityConfig(), {}
    if args.config is not None:
        config = find_config(args.config)
        sparsity = load_config(config, other_sections=("sparsity_2", "generation", "precision", "cache"))
        data = read_yaml(config)
    sparsity_2 = low_noise_config(sparsity, data.get("sparsity_2"))
    sparse = sparsity.is_sparse or (sparsity_2 is not None and sparsity_2.is_sparse)
    overrides = {
        "prompt": args.prompt, "negative_prompt": args.negative_prompt, "model": args.model, "seed": args.seed,
        "height": args.height, "width": args.width, "frames": args.frames, "steps": args.steps,
        "guidance_scale": args.guidance_scale, "fps": args.fps, "image": args.image, "last_image": args.last_image,
    }
    entries = _prompts_file(args)
    if entries is not None:
        overrides["prompt"] = entries[0].values["prompt"]
    settings = GenerationSettings.from_sources(data.get("generation"), overrides)
    given = given_keys(data.get("generation"), overrides)
    ti2v = local_ti2v(settings.model)
    if ti2v:
        settings = for_ti2v(settings, given)
    check_images(settings)
    if settings.image is not None and (args.ulysses > 1 or args.cfg_parallel):  # not run on several GPUs yet
        raise ValueError("--image runs on one process for now; drop --ulysses/--cfg-parallel")
    if sparsity_2 is not None:
        check_low_noise_model(settings.model)
    check_one_expert(settings.model, one_expert_flags(args))
    precision, cache = resolve_speedups(args, data, device)
    if args.compare and not sparse and precision == "bf16" and cache is None:
        raise ValueError("--compare needs something to compare with the stock model: a sparse config (mode nabla, sta "
                         "or nabla+sta), precision fp8 or a cache; got mode 'full' alone")
    jobs, full_output = _outputs(args, settings, entries)
    if args.transformer is not None:
        from wan.loading import check_transformer_path

        check_transformer_path(args.transformer)
    check_lora_args(args)
    for config in (sparsity, sparsity_2 or sparsity):
        if config.is_sparse:  # e.g. `backend: flash` where FlashAttention-4 cannot run: refused before loading
            from nabla.backend import resolve_backend

            resolve_backend(config.backend, device, DTYPES.get(args.dtype))
    _check_parallel(args, settings, ti2v)
    return Plan(sparsity, sparsity_2, settings, given, ti2v, jobs, full_output, precision, cache, device)


def _prompts_file(args: argparse.Namespace) -> list | None:
    """The entries of --prompts FILE (None without it), and the flags that cannot go with it."""
    if args.prompts is None:
        return None
    if args.prompt is not None:
        raise ValueError("--prompt and --prompts: give one (--prompts FILE holds the prompt of every video)")
    if args.compare or args.stats is not None:
        raise ValueError("--compare and --stats report on one video; run them with --prompt, not --prompts")
    if args.ulysses > 1 or args.cfg_parallel:
        raise ValueError("--prompts runs on one process; drop --ulysses/--cfg-parallel")
    return read_prompts(args.prompts)


def _outputs(args: argparse.Namespace, settings: GenerationSettings, entries: list | None) -> tuple[list[Job], Path | None]:
    """The videos to make (one, or one per --prompts entry) and --compare's reference output, all checked writable;
    the --stats path too."""
    if entries is None:
        jobs = [Job(settings, check_output_path(args.output, args.overwrite), str(args.output))]
    else:
        jobs = plan_jobs(args.prompts, entries, settings, args.output, args.overwrite)
    full_output = None
    if args.compare:
        full_output = check_output_path(args.output.with_suffix(".full" + args.output.suffix), args.overwrite)
    if args.stats is not None:
        check_stats_path(args.stats, args.overwrite)
    return jobs, full_output


def _check_parallel(args: argparse.Namespace, settings: GenerationSettings, ti2v: bool) -> None:
    """--ulysses / --cfg-parallel: the degree, the flags that run on one process, CFG's two passes, and a token
    count that the degree divides (raster) or the tiled sequence that it then splits."""
    if args.ulysses < 1:
        raise ValueError(f"--ulysses {args.ulysses} is not allowed; it must be an integer >= 1")
    if args.ulysses == 1 and not args.cfg_parallel:
        return
    if args.compare or args.cpu_offload:
        raise ValueError("--compare and --cpu-offload run on one process; drop them with --ulysses/--cfg-parallel")
    if args.cfg_parallel and settings.guidance_scale <= 1:
        raise ValueError(f"--cfg-parallel needs guidance_scale > 1 (two passes per step), got {settings.guidance_scale}")
    from wan.parallel import check_sequence

    # raster tokens are split as they are; a count the degree does not divide runs padded to whole tiles
    grid = token_grid(settings, TI2V_PIXELS_PER_TOKEN if ti2v else 16)
    if math.prod(grid) % args.ulysses:
        check_sequence(TileLayout(*grid).padded_length, args.ulysses, "tokens of the tiled sequence")


def resolve_speedups(args: argparse.Namespace, data: dict, device: str) -> tuple[str, object]:
    """The levers beside sparsity: precision (--precision, else the YAML's, else bf16) and the `cache:` config,
    from the config file's top-level mapping `data`."""
    precision = args.precision or data.get("precision", "bf16")
    # the device run() will pick (under torchrun each rank's own GPU, of the same kind)
    check_precision(precision, device)
    cache = cache_config(data.get("cache"))
    check_cache_parallel(cache, args.ulysses)
    return precision, cache


def check_images(settings: GenerationSettings) -> None:
    """The images can be read and are what the model takes (a local folder's files say; a hub id's pipeline, once
    loaded)."""
    pipeline_images(settings)
    check_local_model_images(settings.model, settings.image, settings.last_image)


def one_expert_flags(args: argparse.Namespace) -> list[str]:
    """The flags given that replace or adapt the one transformer of a pipeline."""
    return [flag for flag, value in (("--transformer", args.transformer), ("--lora", args.lora)) if value is not None]


def check_lora_args(args: argparse.Namespace) -> None:
    """--lora names a LoRA file or folder, --lora-scale a finite number and only with --lora."""
    if args.lora_scale is not None and (args.lora is None or not math.isfinite(args.lora_scale)):
        raise ValueError(f"--lora-scale {args.lora_scale} is not allowed; it must be a finite number, given with --lora")
    if args.lora is not None:
        from wan.lora import check_lora_path

        check_lora_path(args.lora)


def token_grid(settings: GenerationSettings, pixels: int = 16) -> tuple[int, int, int]:
    """The transformer's tokens: 4x temporal VAE compression, and `pixels` a token's side (the spatial compression x
    the 2x2 patches: Wan2.1's 8x VAE 16, Wan2.2 TI2V's 16x one 32)."""
    return (settings.frames - 1) // 4 + 1, settings.height // pixels, settings.width // pixels
