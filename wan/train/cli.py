"""Fine-tune Wan (LoRA or full) on your own clips, with NABLA sparse attention or dense: Wan2.1 T2V and I2V, Wan2.2
T2V-A14B and I2V-A14B (one expert or both: `training.expert`) and TI2V-5B (`training.first_frame_condition_prob`).

    nabla-wan finetune precompute --model MODEL --data clips/ --config configs/finetune-lora.yaml
    nabla-wan finetune train --model MODEL --data clips/ --config configs/finetune-lora.yaml --output runs/fox
    torchrun --nproc_per_node=8 finetune.py train ...          # data parallel, FSDP2

(`python finetune.py ...` in a checkout takes the same flags.)
`--data` holds videos with a same-name .txt caption each (or a metadata.jsonl of file_name and text). The
config's `sparsity:` section is generate.py's, `training:` is described in configs/finetune-lora.yaml.
`train` encodes the clips the cache lacks first, so `precompute` is optional. Bad input is refused before
any model loads, with one line on stderr and exit code 2. Exit codes: 0 done, 1 the loss turned NaN/Inf,
2 bad input, 130 stopped by SIGINT/SIGTERM after saving a checkpoint (continue with --resume).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

from nabla.backend import check_trainable
from wan.defaults import (
    DEFAULT_MODEL,
    DIST_BACKEND_HELP,
    DIST_BACKENDS,
    OneLineParser,
    check_device,
    find_config,
    shipped_configs,
)
from wan.io.files import check_folder
from wan.models.loading import ModelNotFoundError, load_encoders, model_id
from wan.models.spec import T2V_PIPELINE, ModelSpec
from wan.speedups.kernel_cache import keep_compiled_kernels
from wan.train.checks import (
    check_optimizer,
    check_trainable_model,
    check_training_keys,
    lora_targets,
    trained_experts,
)
from wan.train.clips import find_clips
from wan.train.config import TrainingConfig, bad_value, check_target_modules, load_finetune_config

EXIT_BAD_INPUT = 2


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = OneLineParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    for name, text in (("precompute", "encode the clips into the latent cache"),
                       ("train", "train (encoding the clips the cache lacks first)")):
        sub = commands.add_parser(name, help=text, description=text)
        sub.add_argument("--model", default=DEFAULT_MODEL, help=f"hub id or local diffusers Wan folder: Wan2.1 "
                         f"T2V or I2V, Wan2.2 A14B (T2V or I2V) or TI2V-5B (default: {DEFAULT_MODEL})")
        sub.add_argument("--data", type=Path, required=True, help="folder of videos with captions")
        sub.add_argument("--config", type=Path, help="a YAML file with `sparsity:` and `training:` sections, or the "
                         "name of a shipped one: " + ", ".join(shipped_configs("finetune")) + " (default: dense "
                         "attention, a LoRA, every training key at its built-in default: docs/FINETUNING.md)")
        sub.add_argument("--cache", type=Path, help="latent cache folder (default: DATA/.latent-cache)")
        sub.add_argument("--device", help="torch device (default: cuda if available, else cpu; torchrun: cuda:LOCAL_RANK)")
        if name == "train":
            sub.add_argument("--output", type=Path, required=True, help="run folder: checkpoints, log.jsonl, the "
                             "result (OUT/lora or OUT/transformer), validation videos")
            sub.add_argument("--resume", nargs="?", const="latest", metavar="CHECKPOINT", help="continue the run in "
                             "--output from its latest checkpoint (starts fresh if it has none), or from CHECKPOINT: "
                             "one of OUT/checkpoints/step-NNNNNNNN, by path or name (the newer ones are then "
                             "dropped)")
            sub.add_argument("--overwrite", action="store_true", help="delete the run in --output and start over")
            sub.add_argument("--dist-backend", choices=DIST_BACKENDS, help=DIST_BACKEND_HELP)
    return parser


def check_model(model: str, training: TrainingConfig) -> ModelSpec:
    """The model's spec, the settings it takes, and the LoRA targets among its Linear layers: no weights are read."""
    from wan.models.loading import looks_local
    from wan.models.lora import transformer_linear_names

    if looks_local(model) and not (Path(model).expanduser() / "model_index.json").is_file():
        raise ModelNotFoundError(f"model: {model} is not a diffusers pipeline folder (no model_index.json)")
    try:
        spec = check_trainable_model(ModelSpec.read(model))
        check_training_keys(spec, training)
        names = transformer_linear_names(model, trained_experts(spec, training.expert)[0])
    except OSError as err:
        raise ModelNotFoundError(f"model: could not read the configs of {model!r} "
                                 f"({type(err).__name__}: {' '.join(str(err).split())[:200]})") from None
    if training.method == "lora":
        check_target_modules(lora_targets(spec.kandinsky5, training.target_modules), names)
    return spec


def flow_shift(model: str, training: TrainingConfig) -> float:
    from diffusers import UniPCMultistepScheduler

    from wan.models.spec import scheduler_shift

    if training.flow_shift is not None:
        return training.flow_shift
    return scheduler_shift(UniPCMultistepScheduler.load_config(model, subfolder="scheduler"))


def precompute_cache(args: argparse.Namespace, training: TrainingConfig, spec: ModelSpec, device: torch.device,
                     show: bool):
    """Encode the clips the cache lacks; print each skipped clip and the counts. Returns the usable entries."""
    from tqdm import tqdm

    from wan.train.latent_cache import precompute

    cache = cache_folder(args)
    report = precompute(find_clips(args.data), cache, training, model_id(args.model),
                        lambda: load_encoders(args.model, device, spec),
                        progress=lambda clips: tqdm(clips, desc="encoding clips", unit="clip", disable=not show),
                        spec=spec)
    if show:
        for path, reason in report.skipped:
            print(f"skipped {path}: {reason}", file=sys.stderr)
        print(f"latent cache {cache}: {len(report.entries)} clips usable ({report.encoded} encoded now, "
              f"{len(report.entries) - report.encoded} reused), {len(report.skipped)} skipped")
    if not report.entries:
        raise ValueError(f"data: no usable clip in {args.data} ({len(report.skipped)} skipped)")
    return report.entries


def check_inputs(args: argparse.Namespace):
    """Every setting, before any model loads: config, data folder, output folder, model configs and LoRA targets.
    Returns the sparsity and training configs and the model's spec."""
    sparsity, training = load_finetune_config(None if args.config is None else find_config(args.config))
    device = check_device(args.device)
    check_trainable(sparsity, device)  # e.g. 64-token blocks on CUDA: refused before loading
    check_optimizer(training, device)
    if args.command == "train":
        from wan.train.run_folder import check_output

        check_output(args.output, args.resume, args.overwrite)
        if args.dist_backend is not None and int(os.environ.get("WORLD_SIZE", "1")) == 1:
            raise ValueError(f"--dist-backend {args.dist_backend} needs several processes (torchrun --nproc_per_node=N)")
    clips = find_clips(args.data)
    check_images(clips, training)
    check_folder(cache_folder(args), "cache", "give a writable one with --cache DIR")
    if args.command == "train" and args.resume and (args.output / "run.json").is_file():
        from wan.train.run_folder import check_resume

        check_resume(args.output, run_settings(args, sparsity, training))
    spec = check_model(args.model, training)
    if any(clip.is_image for clip in clips) and (spec.pipeline != T2V_PIPELINE or spec.ti2v):
        raise ValueError(f"data: {args.data} holds images, which train text-to-video models only (Wan2.1 T2V, "
                         f"Wan2.2 T2V-A14B); {spec.model} is a {spec.name} model")
    if args.command == "train" and args.resume not in (None, "latest"):
        from wan.train.checkpoints import chosen_checkpoint

        args.resume = chosen_checkpoint(args.output / "checkpoints", args.resume)
    return sparsity, training, spec


def check_images(clips: list, training: TrainingConfig) -> None:
    """Images (one-frame samples) beside videos stack into no batch: batch_size 1 then, or buckets (which keep them
    apart)."""
    images = sum(clip.is_image for clip in clips)
    if images and images < len(clips) and training.frames > 1 and training.batch_size > 1 and not training.buckets:
        bad_value("batch_size", training.batch_size, f"1 for data of images and videos together ({images} images, "
                  f"{len(clips) - images} videos: one frame against {training.frames} do not stack)")


def cache_folder(args: argparse.Namespace) -> Path:
    """The latent cache: --cache, else DATA/.latent-cache."""
    return args.cache or args.data / ".latent-cache"


def run_settings(args: argparse.Namespace, sparsity, training: TrainingConfig) -> dict:
    """What run.json records of a run, and what --resume must find unchanged."""
    return {"model": model_id(args.model), "data": str(args.data.resolve()), "sparsity": vars(sparsity),
            "training": training.to_dict()}


def train(args: argparse.Namespace, sparsity, training: TrainingConfig, spec: ModelSpec) -> int:
    """Train in this process, or as one torchrun worker (which then ends at once: `end_worker` says why)."""
    from wan.train.data_parallel import close, end_worker, init_data_parallel

    parallel = init_data_parallel(args.device, args.dist_backend)
    try:
        code = run_training(args, sparsity, training, spec, parallel)
    finally:
        close(parallel)
    if parallel.distributed:
        end_worker(code)
    return code


def run_training(args: argparse.Namespace, sparsity, training: TrainingConfig, spec: ModelSpec, parallel) -> int:
    from wan.train.latent_cache import load_entries
    from wan.train.run_folder import clear_run, write_run_file
    from wan.train.trainer import Trainer
    from wan.train.validation import Validator

    if parallel.is_main:
        entries = precompute_cache(args, training, spec, parallel.device, show=True)
        if args.overwrite:
            clear_run(args.output)
        write_run_file(args.output, run_settings(args, sparsity, training))
    parallel.barrier()
    if not parallel.is_main:  # the cache is complete now: rank 0 encoded what was missing
        entries = precompute_cache(args, training, spec, parallel.device, show=False)
    validator, empty_prompt, encoders = None, None, None
    if training.validation.every or training.caption_dropout:
        encoders = load_encoders(args.model, parallel.device, spec)
    if training.caption_dropout:
        from wan.train.latent_cache import empty_prompt_embeds

        empty_prompt = empty_prompt_embeds(encoders)
    if training.validation.every:
        validator = Validator(encoders, training, parallel.device,
                              torch.bfloat16 if parallel.device.type == "cuda" else torch.float32, spec)
    trainer = Trainer(args.model, load_entries(entries), args.output, sparsity, training, parallel,
                      flow_shift(args.model, training), validator, spec, empty_prompt)
    if parallel.is_main:
        print(describe_start(sparsity, training, trainer))
    start = trainer.resume(None if args.resume == "latest" else args.resume) if args.resume else 0
    code = trainer.run(start)
    if code == 0:
        results = ", ".join(str(path) for path in trainer.export())
        if parallel.is_main:
            print(f"wrote {results} (log: {args.output / 'log.jsonl'}; plot it with scripts/plot_training.py)")
    return code


def describe_start(sparsity, training: TrainingConfig, trainer) -> str:
    """What a run starts with: the resolved config (every key, defaults included) and the parameters it trains."""
    import yaml

    trainable, total = trainer.parameter_counts()
    config = yaml.safe_dump({"sparsity": vars(sparsity), "training": training.to_dict()}, sort_keys=False,
                            default_flow_style=None, width=120)
    return (f"resolved config:\n{config.rstrip()}\ntrainable parameters: {trainable:,} of {total:,} "
            f"({100 * trainable / total:.2f}%)")


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """`finetune.py` / `nabla-wan finetune`: the exit code (2 for bad input, refused before any model loads)."""
    args = build_parser(prog).parse_args(argv)
    keep_compiled_kernels()
    try:
        sparsity, training, spec = check_inputs(args)
        if args.command == "precompute":
            device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
            precompute_cache(args, training, spec, device, show=True)
            return 0
        return train(args, sparsity, training, spec)
    except ValueError as err:  # ModelNotFoundError included: one line, exit 2
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
