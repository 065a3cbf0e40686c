"""Every check `generate` makes, once: before a model loads, the config, the settings, the prompts file, the output
paths, the device, precision and cache, the images, LoRA and parallel flags, resolved into one `Plan`; and what the
model's facts decide (`check_model`: images, experts, the model's own defaults and trained sparsity, the levers it
runs with), from a local folder's files before it loads,
or for a hub id from the loaded pipeline: the same function, once."""

from __future__ import annotations

import argparse
import dataclasses
import math
from pathlib import Path

import torch

from nabla.config import SparsityConfig, load_config, read_yaml
from nabla.layout import TileLayout
from wan.defaults import check_device, find_config
from wan.generate.batch import Job, plan_jobs, read_prompts
from wan.generate.settings import GenerationSettings, for_ti2v, given_keys, with_defaults
from wan.generate.stats import check_stats_path
from wan.io.frames import pipeline_controls
from wan.io.images import pipeline_images
from wan.io.video import check_output_path
from wan.models import kandinsky5_facts
from wan.models.experts import low_noise_config
from wan.models.spec import I2V_PIPELINE, T2V, ModelSpec
from wan.speedups.cache import cache_config, check_cache_parallel
from wan.speedups.precision import check_precision

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
    #: the videos to make: one for --prompt, one per entry of --prompts
    jobs: list[Job]
    #: --compare's stock-model video
    full_output: Path | None
    precision: str
    cache: object
    #: the device of a one-process run (torchrun ranks pick their own GPU)
    device: str
    #: the flags given that replace or adapt the one transformer of a pipeline (--transformer, --lora)
    one_expert_flags: list[str]
    #: the LoRAs to fuse (--lora) and their scales (--lora-scale), in order
    loras: list[tuple[Path, float]] = dataclasses.field(default_factory=list)
    #: the model's facts: a local folder's before it loads; for a hub id None until then (`check_model`)
    spec: ModelSpec | None = None
    #: the run is spread over processes (--ulysses, --cfg-parallel)
    parallel: bool = False
    #: --config was given (else a checkpoint trained with NABLA runs its own sparsity, others full attention)
    configured: bool = False


def resolve(args: argparse.Namespace) -> Plan:
    """Check the whole input (config, settings, prompts file, output paths, device, precision, cache)."""
    device = check_device(args.device)  # first: the backend and precision checks below ask about this device
    sparsity, data = SparsityConfig(), {}
    if args.config is not None:
        config = find_config(args.config)
        sparsity = load_config(config, other_sections=("sparsity_2", "generation", "precision", "cache"))
        data = read_yaml(config)
    sparsity_2 = low_noise_config(sparsity, data.get("sparsity_2"))
    overrides = {
        "prompt": args.prompt, "negative_prompt": args.negative_prompt, "model": args.model, "seed": args.seed,
        "height": args.height, "width": args.width, "frames": args.frames, "steps": args.steps,
        "guidance_scale": args.guidance_scale, "fps": args.fps, "image": args.image, "last_image": args.last_image,
        "scheduler": args.scheduler, "flow_shift": args.flow_shift, "sigmas": args.sigmas,
        "vae_dtype": args.vae_dtype, "cfg_truncation": args.cfg_truncation, "video": args.video, "mask": args.mask,
        "reference_images": args.reference_image, "conditioning_scale": args.conditioning_scale,
        "pose_video": args.pose_video, "face_video": args.face_video,
    }
    entries = _prompts_file(args)
    if entries is not None:
        overrides["prompt"] = entries[0].values["prompt"]
    settings = GenerationSettings.from_sources(data.get("generation"), overrides)
    given = given_keys(data.get("generation"), overrides)
    pipeline_images(settings)  # the images can be read; what the model takes is check_model's
    pipeline_controls(settings)  # VACE's video and mask too, one frame a generated frame
    if settings.image is not None and (args.ulysses > 1 or args.cfg_parallel):  # not run on several GPUs yet
        raise ValueError("--image runs on one process for now; drop --ulysses/--cfg-parallel")
    precision, cache = resolve_speedups(args, data, device)
    jobs, full_output = _outputs(args, settings, entries)
    if args.transformer is not None:
        from wan.models.loading import check_transformer_path

        check_transformer_path(args.transformer)
    loras = check_lora_args(args)
    for config in (sparsity, sparsity_2 or sparsity):
        if config.is_sparse:  # e.g. `backend: flash` where FlashAttention-4 cannot run: refused before loading
            from nabla.backend import resolve_backend

            resolve_backend(config.backend, device, DTYPES.get(args.dtype))
    plan = Plan(sparsity, sparsity_2, settings, given, jobs, full_output, precision, cache, device,
                one_expert_flags(args), loras, parallel=args.ulysses > 1 or args.cfg_parallel,
                configured=args.config is not None)
    spec = ModelSpec.from_folder(settings.model)
    if spec is not None:
        check_model(plan, spec)
    elif plan.configured:  # without a config, a hub id's checkpoint may have a trained sparsity: known once loaded
        check_compare(plan)
    _check_parallel(args, plan.settings, plan.spec)
    return plan


def check_model(plan: Plan, spec: ModelSpec) -> None:
    """What the model's facts decide: its own defaults (a Wan2.2 TI2V model's, with its size rule; a Kandinsky 5
    model's), its trained sparsity where no --config is given, the images it takes, a `sparsity_2:` section only for
    two experts, --transformer/--lora only for one, the levers it runs with. Called once: before loading with a local
    folder's spec, else with the loaded pipeline's."""
    plan.spec = spec
    plan.settings = for_model(plan.settings, plan.given, spec)
    plan.jobs = [dataclasses.replace(job, settings=for_model(job.settings, plan.given, spec)) for job in plan.jobs]
    if not plan.configured and spec.trained_sparsity is not None:  # the checkpoint's own NABLA: it is the model
        plan.sparsity = spec.trained_sparsity
    check_compare(plan)
    check_model_levers(plan, spec)
    check_model_controls(plan, spec)
    check_model_images(spec, plan.settings.image, plan.settings.last_image)
    if plan.sparsity_2 is not None and len(spec.experts) == 1:
        raise ValueError(f"config: 'sparsity_2' is not allowed for {spec.model}: it has one transformer, no "
                         "transformer_2 (the low-noise expert of Wan2.2 A14B that sparsity_2 configures)")
    if plan.one_expert_flags and len(spec.experts) == 2:
        raise ValueError(f"{' and '.join(plan.one_expert_flags)}: not supported for {spec.model}, a two-expert "
                         "pipeline (Wan2.2 A14B: transformer and transformer_2); they apply to one-transformer Wan "
                         "models")


def for_model(settings: GenerationSettings, given: frozenset[str], spec: ModelSpec) -> GenerationSettings:
    """`settings` with the model's own defaults for those not `given` (and Wan2.2 TI2V's size rule)."""
    if spec.ti2v:
        return for_ti2v(settings, given, spec.pixels_per_token)
    return with_defaults(settings, given, spec.generation_defaults)


def check_compare(plan: Plan) -> None:
    """--compare needs a configured run that differs from the stock model."""
    nothing = not plan.sparsity.is_sparse and not (plan.sparsity_2 and plan.sparsity_2.is_sparse)
    nothing = nothing and plan.precision == "bf16" and plan.cache is None and plan.settings.cfg_truncation is None
    if plan.full_output is not None and nothing:
        raise ValueError("--compare needs something to compare with the stock model: a sparse config (mode nabla, sta "
                         "or nabla+sta), precision fp8 or a cache; got mode 'full' alone")


def check_model_levers(plan: Plan, spec: ModelSpec) -> None:
    """One-line ValueError for the levers a Kandinsky 5 model does not run with: several processes (diffusers has no
    context-parallel plan for its transformer, and CFG parallelism splits Wan's batch), --transformer (Wan
    checkpoints), a step cache (diffusers' first-block cache asks its blocks for a `hidden_states` argument they do
    not have; TaylorSeer's lite mode extrapolates `proj_out`, which its transformer has not)."""
    if not spec.kandinsky5:
        return
    refused = [(plan.parallel, "--ulysses/--cfg-parallel", "run it on one process"),
               ("--transformer" in plan.one_expert_flags, "--transformer", "give the whole model with --model"),
               (plan.cache is not None, "cache", "drop the config's cache: section")]
    for bad, what, instead in refused:
        if bad:
            raise ValueError(f"{what}: not supported for {spec.model}, a {spec.name} model; {instead}")


_I2V_EXAMPLE = "Wan-AI/Wan2.1-I2V-14B-480P-Diffusers"
_VACE_EXAMPLE = "Wan-AI/Wan2.1-VACE-14B-diffusers"
_ANIMATE_EXAMPLE = "Wan-AI/Wan2.2-Animate-14B-Diffusers"
_CONTROLS = {"video": "--video", "mask": "--mask", "reference_images": "--reference-image",
             "conditioning_scale": "--conditioning-scale"}
_ANIMATE_CONTROLS = {"pose_video": "--pose-video", "face_video": "--face-video"}


def check_model_controls(plan: Plan, spec: ModelSpec) -> None:
    """One-line ValueError unless the run's controls fit the model: VACE's (--video, --mask, --reference-image,
    --conditioning-scale) only for a Wan VACE model, Animate's (--pose-video, --face-video; --video and --mask to
    replace) only for a Wan2.2 Animate one; for either, none of the levers it does not run with (`_check_levers`)."""
    settings, model = plan.settings, spec.model
    given = [flag for name, flag in _CONTROLS.items() if getattr(settings, name) is not None]
    posed = [flag for name, flag in _ANIMATE_CONTROLS.items() if getattr(settings, name) is not None]
    if posed and not spec.animate:
        raise ValueError(f"{posed[0]}: {model} is a {spec.pipeline} model and takes no pose or face video; they need "
                         f"a Wan2.2 Animate model (WanAnimatePipeline), such as {_ANIMATE_EXAMPLE}")
    if spec.animate:
        _check_animate_controls(plan, spec, given, posed)
        return
    if given and not spec.vace:
        raise ValueError(f"{given[0]}: {model} is a {spec.pipeline} model and takes no control inputs; they need a "
                         f"Wan VACE model (WanVACEPipeline), such as {_VACE_EXAMPLE}")
    if not spec.vace:
        return
    if settings.image is not None or settings.last_image is not None:
        raise ValueError(f"--image/--last-image: not supported for {model}, a Wan VACE model; give the frames to keep "
                         "as --video with a --mask, or the look as --reference-image")
    _check_levers(plan, spec)


def _check_animate_controls(plan: Plan, spec: ModelSpec, given: list[str], posed: list[str]) -> None:
    """Wan2.2 Animate: a pose and a face video (their pairing is the settings' check); --video with --mask, its
    replacement mode; none of VACE's other controls."""
    settings, model = plan.settings, spec.model
    if not posed:
        raise ValueError(f"--pose-video: {model} is a Wan2.2 Animate model; give the pose and the face video that "
                         "move --image's character: --pose-video PATH --face-video PATH")
    vace_only = [flag for flag in given if flag not in ("--video", "--mask")]
    if vace_only:
        raise ValueError(f"{vace_only[0]}: not supported for {model}, a Wan2.2 Animate model; that control is Wan "
                         "VACE's")
    if settings.video is not None and settings.mask is None:
        raise ValueError(f"--video: {model} is a Wan2.2 Animate model, whose --video is the background of its "
                         "replacement mode; give --mask PATH too, white where the character to replace is")
    _check_levers(plan, spec)


def _check_levers(plan: Plan, spec: ModelSpec) -> None:
    """The levers a model of control inputs does not run with: a step cache (diffusers' caches skip main blocks,
    between which VACE adds its hints and Animate its face features), several processes (diffusers has no
    context-parallel plan for either transformer), --transformer (a WanTransformer3DModel)."""
    refused = [(plan.cache is not None, "cache", "drop the config's cache: section"),
               (plan.parallel, "--ulysses/--cfg-parallel", "run it on one process"),
               ("--transformer" in plan.one_expert_flags, "--transformer",
                f"give the whole {spec.name} model with --model")]
    for bad, what, instead in refused:
        if bad:
            raise ValueError(f"{what}: not supported for {spec.model}, a {spec.name} model; {instead}")
_FLF2V_EXAMPLE = "Wan-AI/Wan2.1-FLF2V-14B-720P-Diffusers"


def check_model_images(spec: ModelSpec, image: str | None, last_image: str | None) -> None:
    """One-line ValueError unless the images given (`image`, `last_image`: paths or None) are what the model takes:
    a TI2V model an optional first frame (its image mode), an image-to-video one a first frame (and a last where
    it takes two), a text-to-video one none."""
    model = spec.model
    if spec.ti2v:
        if last_image is not None:  # diffusers' TI2V image mode encodes the first frame alone
            raise ValueError(f"--last-image: {model} is a Wan2.2 TI2V model, whose image mode takes one image, the "
                             f"first frame; a first and a last frame need a FLF2V model, such as {_FLF2V_EXAMPLE}")
        return
    frames = spec.image_frames
    if frames == 0 and image is not None:
        needs = (f"a {kandinsky5_facts.I2V_PIPELINE} model" if spec.kandinsky5 else
                 f"a {I2V_PIPELINE} model, such as {_I2V_EXAMPLE}, or a Wan2.2 TI2V one")
        raise ValueError(f"--image: {model} is a text-to-video model ({spec.pipeline}) and takes no image; image to "
                         f"video needs {needs}")
    if frames > 0 and image is None:
        what = "the character to animate" if spec.animate else "its first frame"
        raise ValueError(f"--image: {model} is an image-to-video model ({spec.pipeline}); give {what} with "
                         "--image PATH")
    if frames == 1 and last_image is not None:
        raise ValueError(f"--last-image: {model} takes one image, the first frame ({spec.name}); a first and a last "
                         f"frame need a FLF2V model, such as {_FLF2V_EXAMPLE}, or a Wan2.2 I2V one")


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


def _check_parallel(args: argparse.Namespace, settings: GenerationSettings, spec: ModelSpec | None) -> None:
    """--ulysses / --cfg-parallel: the degree, the flags that run on one process, CFG's two passes, and a token
    count that the degree divides (raster) or the tiled sequence that it then splits."""
    if args.ulysses < 1:
        raise ValueError(f"--ulysses {args.ulysses} is not allowed; it must be an integer >= 1")
    if args.ulysses == 1 and not args.cfg_parallel:
        if args.dist_backend is not None:
            raise ValueError(f"--dist-backend {args.dist_backend} needs --ulysses N or --cfg-parallel under torchrun")
        return
    if args.dist_backend == "nccl" and not torch.cuda.is_available():
        raise ValueError("--dist-backend nccl needs CUDA GPUs; allowed here: gloo")
    if args.compare or args.cpu_offload:
        raise ValueError("--compare and --cpu-offload run on one process; drop them with --ulysses/--cfg-parallel")
    if args.cfg_parallel and settings.guidance_scale <= 1:
        raise ValueError(f"--cfg-parallel needs guidance_scale > 1 (two passes per step), got {settings.guidance_scale}")
    if args.cfg_parallel and settings.cfg_truncation is not None:
        raise ValueError("--cfg-parallel runs both passes on every step; drop cfg_truncation")
    from wan.speedups.parallel import check_sequence

    # raster tokens are split as they are; a count the degree does not divide runs padded to whole tiles
    grid = token_grid(settings, spec)
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


def one_expert_flags(args: argparse.Namespace) -> list[str]:
    """The flags given that replace or adapt the one transformer of a pipeline."""
    return [flag for flag, value in (("--transformer", args.transformer), ("--lora", args.lora)) if value]


def check_lora_args(args: argparse.Namespace) -> list[tuple[Path, float]]:
    """The LoRAs to fuse, each with its scale: every --lora names a LoRA file or folder, every --lora-scale is a finite
    number, and there are as many scales as LoRAs (none: 1.0 each)."""
    loras, scales = args.lora or [], args.lora_scale or []
    for scale in scales:
        if not loras or not math.isfinite(scale):
            raise ValueError(f"--lora-scale {scale} is not allowed; it must be a finite number, given with --lora")
    if scales and len(scales) != len(loras):
        raise ValueError(f"--lora-scale: {len(scales)} scales for {len(loras)} LoRAs are not allowed; give one "
                         "--lora-scale per --lora, in the same order (or none: 1.0 each)")
    if loras:
        from wan.models.lora import check_lora_path  # imports diffusers: only where a LoRA is given

        for lora in loras:
            check_lora_path(lora)
    return list(zip(loras, scales or [1.0] * len(loras)))


def token_grid(settings: GenerationSettings, spec: ModelSpec | None) -> tuple[int, int, int]:
    """The transformer's tokens of a video of `settings` (Wan2.1's 16 pixels a token where the spec is not known yet:
    a hub id before it loads)."""
    return (spec or T2V).token_grid(settings.frames, settings.height, settings.width)
