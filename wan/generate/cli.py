"""Text- or image-to-video with Wan or Kandinsky 5 whose self-attention runs full, NABLA, STA or NABLA+STA, as a YAML config says.

    nabla-wan generate --prompt "a red fox in the snow" --config nabla-0.7 --output fox.mp4
    nabla-wan generate --model Wan-AI/Wan2.1-I2V-14B-480P-Diffusers --image fox.png --prompt "..." --config nabla-0.7
    nabla-wan generate --prompt "..." --config nabla-0.7 --compare        # full vs sparse, same seed
    nabla-wan generate --model Wan-AI/Wan2.1-VACE-14B-diffusers --video in.mp4 --mask mask.mp4 --prompt "..." \
        --config nabla-0.7                                                 # Wan VACE: inpaint where the mask is white
    nabla-wan generate --prompts prompts.txt --config nabla-0.7 --output out/fox.mp4   # out/fox-1.mp4, ...
    nabla-wan generate --model kandinsky5-folder --prompt "..."            # a NABLA-trained one: its own sparsity
    nabla-wan make-tiny-model tiny-wan                                     # an offline demo model

(`python generate.py ...` in a checkout takes the same flags.) Command-line flags override the config's
`generation:` section, which overrides the defaults. Bad input is rejected before any model loads, with one
line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

from wan.defaults import DEFAULT_MODEL, DIST_BACKEND_HELP, DIST_BACKENDS, OneLineParser, shipped_configs
from wan.generate import report
from wan.generate.batch import Job
from wan.generate.plan import DTYPES, Plan, resolve
from wan.generate.session import Session, prepare, warn_long_prompt
from wan.generate.settings import SCHEDULERS, TI2V_DEFAULTS, VAE_DTYPES
from wan.speedups.kernel_cache import keep_compiled_kernels
from wan.speedups.precision import PRECISIONS


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    p = OneLineParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _model_flags(p)
    _video_flags(p)
    _run_flags(p)
    return p


def _model_flags(p: argparse.ArgumentParser) -> None:
    """What to make and with which model: prompts, config, model, images, checkpoints."""
    p.add_argument("--prompt", help="what the video shows (required here, as generation.prompt in the config, or "
                   "per video in --prompts)")
    p.add_argument("--prompts", type=Path, metavar="FILE", help="make one video per entry of FILE with the model "
                   "loaded and compiled once: plain text, one prompt a line, or FILE.jsonl, one JSON object a line "
                   "with \"prompt\" and optionally \"negative_prompt\", \"seed\" and \"output\". Entries without "
                   "an output are numbered after --output (NAME-1.mp4, NAME-2.mp4, ...). The whole file is checked "
                   "before the model loads; an entry that fails is reported in one line and the others go on; exit "
                   "code 1 if any failed. Not with --prompt, --compare, --stats or several processes")
    p.add_argument("--negative-prompt", help="what the video should not show (default: empty)")
    p.add_argument("--config", help="a YAML file with a `sparsity:` and optionally `sparsity_2:` (Wan2.2 A14B's "
                   "low-noise expert, merged over `sparsity:`), `generation:`, `precision:` and "
                   "`cache:` sections, or the name of a shipped one: " + ", ".join(shipped_configs("generate")) +
                   " (default: full attention, stock settings; for a checkpoint trained with NABLA, a Kandinsky 5 "
                   "of attention_type nabla, the sparsity it was trained with); see the README")
    p.add_argument("--precision", choices=PRECISIONS, help="fp8: torchao FP8 (dynamic, per-row) for the Linear layers "
                   "of the transformer blocks, on GPUs of compute capability >= 8.9 (default: the config's, else bf16, "
                   "i.e. --dtype as loaded)")
    p.add_argument("--model", help="hub id or local folder of a diffusers Wan pipeline: text to video (WanPipeline: "
                   "Wan2.1, or Wan2.2 A14B, both experts get NABLA; Wan2.2 TI2V with or without --image) or image to video "
                   "(WanImageToVideoPipeline, read from its model_index.json: Wan2.1 I2V and FLF2V, Wan2.2 I2V; give "
                   "--image) or Wan VACE (WanVACEPipeline: --video, --mask, --reference-image, or text alone), or "
                   "Wan2.2 Animate (WanAnimatePipeline: --image, --pose-video, --face-video; --video and --mask to "
                   "replace a character; one segment of --frames frames), or "
                   "Kandinsky 5 (Kandinsky5T2VPipeline, or Kandinsky5I2VPipeline with --image; its defaults "
                   "512x768, 121 frames, 24 fps; one process, no cache, no --transformer) "
                   f"(default: {DEFAULT_MODEL})")
    p.add_argument("--image", metavar="PATH", help="image to video: the first frame (an image file PIL reads; resized "
                   "to --height x --width); needed by a WanImageToVideoPipeline model, optional for a Wan2.2 TI2V one "
                   "(its image mode), refused for the others")
    p.add_argument("--last-image", metavar="PATH", help="the last frame too (first-last-frame to video, with --image): "
                   "for Wan2.1 FLF2V and Wan2.2 I2V models, not Wan2.1 I2V's, whose image encoder takes one image")
    _control_flags(p)
    p.add_argument("--transformer", type=Path, metavar="PATH", help="load the transformer from PATH instead of "
                   "--model's: an original-format Wan2.1 checkpoint (a .safetensors/.pt file or a folder of "
                   ".safetensors shards, keys like blocks.0.self_attn.q.weight, as the NABLA-finetuned checkpoints are "
                   "published; converted by diffusers) or a diffusers transformer folder; the architecture comes from "
                   "--model")
    p.add_argument("--lora", type=Path, metavar="PATH", action="append", help="apply a LoRA (finetune.py's output "
                   "folder, e.g. runs/fox/lora, or a Wan LoRA .safetensors in diffusers' format or the original one, "
                   "such as step-distillation LoRAs) to the transformer, fused into its weights before the patch (in "
                   "both runs of --compare); repeat it for several (a distillation LoRA and a style LoRA)")
    p.add_argument("--lora-scale", type=float, metavar="S", action="append", help="strength of --lora, a finite "
                   "number (default: 1.0; 0 gives the base model); with several LoRAs one --lora-scale each, in order")


def _control_flags(p: argparse.ArgumentParser) -> None:
    """Wan VACE's and Wan2.2 Animate's controls (refused for the other models)."""
    p.add_argument("--video", metavar="PATH", help="Wan VACE: the control video (an MP4, or .npy frames as --output "
                   "NAME.npy writes them), one frame per generated frame (--frames), resized to --height x --width; "
                   "with --mask the video is kept where the mask is black and generated where it is white, without "
                   "one it guides the whole video (a depth, pose or edge video, ...). Wan2.2 Animate: the background "
                   "video whose masked character --image replaces (its replacement mode)")
    p.add_argument("--mask", metavar="PATH", help="Wan VACE: the mask of --video, as many frames, greyscale: white "
                   "where to generate, black where to keep the video. Wan2.2 Animate: white where the character to "
                   "replace is")
    p.add_argument("--pose-video", metavar="PATH", help="Wan2.2 Animate: the pose video (the skeleton frames its "
                   "preprocessing draws) that moves --image's character, one frame per generated frame (--frames)")
    p.add_argument("--face-video", metavar="PATH", help="Wan2.2 Animate: the face video (the cropped face of each "
                   "frame) that drives its expression, as many frames as --pose-video")
    p.add_argument("--reference-image", metavar="PATH", action="append", help="Wan VACE: an image of a subject or a "
                   "look for the video to take; repeat it for several")
    p.add_argument("--conditioning-scale", type=float, metavar="S", help="Wan VACE: the strength of the controls' "
                   "hints, a finite number (default: 1.0)")


def _video_flags(p: argparse.ArgumentParser) -> None:
    """The video: seed, size, steps, guidance, fps and where it goes."""
    p.add_argument("--seed", type=int, help="seed of the initial noise (default: 0)")
    p.add_argument("--height", type=int, help="video height in pixels, a multiple of 16 (of 32 for a Wan2.2 TI2V "
                   f"model) (default: 480; TI2V: {TI2V_DEFAULTS['height']})")
    p.add_argument("--width", type=int, help="video width in pixels, a multiple of 16 (of 32 for a Wan2.2 TI2V model) "
                   f"(default: 832; TI2V: {TI2V_DEFAULTS['width']})")
    p.add_argument("--frames", type=int, help=f"number of frames, 4k+1 (default: 81; TI2V: {TI2V_DEFAULTS['frames']})")
    p.add_argument("--steps", type=int, help="denoising steps (default: 50)")
    p.add_argument("--guidance-scale", type=float, help="classifier-free guidance scale, >= 0 (default: 5.0)")
    p.add_argument("--scheduler", choices=SCHEDULERS, help="the sampler: unipc (Wan's own), euler (diffusers' "
                   "FlowMatchEulerDiscreteScheduler, what step-distilled Wan LoRAs sample with) or dpm++ (default: the "
                   "model's scheduler)")
    p.add_argument("--flow-shift", type=float, metavar="S", help="the scheduler's flow shift, a number > 0 (default: "
                   "the model's: 3.0 for 480p Wan2.1, 5.0 for 720p; step-distilled LoRAs ask for 5.0 or so)")
    p.add_argument("--sigmas", type=float, nargs="+", metavar="SIGMA", help="explicit sigmas before the shift, "
                   "decreasing in (0, 1], one a step (a distilled model's schedule, e.g. 1.0 0.75 0.5 0.25 for "
                   "timesteps 1000 750 500 250); unipc or euler (default: the scheduler's spacing)")
    p.add_argument("--cfg-truncation", type=float, metavar="F", help="skip the unconditional pass after this fraction "
                   "of the steps (0.8: the last 20%% of the steps run one pass; a speed lever that changes the video, "
                   "--compare shows how much) (default: guidance on every step)")
    p.add_argument("--fps", type=int, help=f"frames per second of the MP4 (default: 16; TI2V: {TI2V_DEFAULTS['fps']})")
    p.add_argument("--output", type=Path, default=Path("output.mp4"), help="file to write: NAME.mp4 (a video; needs "
                   "imageio-ffmpeg, checked before the model loads) or NAME.npy (raw frames, float32 [F, H, W, 3] in "
                   "[0, 1], no video encoder needed: for machines without ffmpeg). If MP4 encoding fails after the "
                   "run, the frames are saved as NAME.npy and the exit code is 1 (default: output.mp4)")
    p.add_argument("--overwrite", action="store_true", help="replace --output (or --prompts' outputs) if it exists "
                   "(default: refuse)")


def _run_flags(p: argparse.ArgumentParser) -> None:
    """Where and how it runs: device, dtype, offloading, GPUs, the comparison, statistics, compilation."""
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N, a GPU this machine has (default: cuda if "
                   "available, else cpu)")
    p.add_argument("--vae-dtype", choices=VAE_DTYPES, help="the VAE's dtype: float32 (Wan's reference) or bfloat16 "
                   "(decodes 81 frames of 720p in about 60%% of the time; PSNR against float32 in BENCHMARKS.md) "
                   "(default: float32)")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="transformer/text-encoder dtype (default: bfloat16 on "
                   "CUDA, float32 on CPU; the VAE stays float32)")
    p.add_argument("--cpu-offload", action="store_true", help="keep idle sub-models on the CPU to fit a smaller GPU")
    p.add_argument("--ulysses", type=int, default=1, metavar="N", help="split the sequence over N GPUs with "
                   "Ulysses sequence parallelism; launch with torchrun --nproc_per_node=N (default: 1)")
    p.add_argument("--cfg-parallel", action="store_true", help="run the conditional and unconditional passes on two "
                   "groups of GPUs at once; torchrun --nproc_per_node=2 (or 2 x --ulysses)")
    p.add_argument("--dist-backend", choices=DIST_BACKENDS, help=DIST_BACKEND_HELP)
    p.add_argument("--compare", action="store_true", help="run the stock model (full attention, no FP8, no cache) and "
                   "the configured one (sparsity, precision, cache) on the same seed; print both times, the speedup, "
                   "the configured video's PSNR, SSIM and mean absolute "
                   "difference against the full one, and the mean mask density; write both videos "
                   "(the full one beside --output as NAME.full.mp4, or NAME.full.npy)")
    p.add_argument("--stats", type=Path, metavar="PATH", help="write a JSON report of the sparse run to PATH (.json): "
                   "per step and layer the mean mask density per head and the mask-building and attention times in ms, "
                   "plus totals, config and settings; the block masks of every layer at the first sparse step and the "
                   "last step go beside it as PATH.masks.pt (plot both with scripts/plot_masks.py)")
    p.add_argument("--no-compile", action="store_true", help="on CUDA, do not torch.compile the transformer's "
                   "repeated blocks (compiled by default there, in both runs of --compare; never on the CPU)")
    p.add_argument("--no-warmup", action="store_true", help="on CUDA, skip the untimed one-step warm-up runs (one "
                   "per run of --compare) that keep compilation out of the timings")


OUT_OF_MEMORY = ("out of GPU memory; lower --height/--width/--frames, add --cpu-offload, use a sparser config or more "
                 "GPUs (--ulysses)")


def one_line(err: BaseException) -> str:
    """An error as the one line a run reports it in."""
    if isinstance(err, torch.OutOfMemoryError):
        return OUT_OF_MEMORY
    from wan.generate.run import NonFiniteLatentsError

    if isinstance(err, (ValueError, NonFiniteLatentsError)):  # ours: already one line that says what to do
        return str(err)
    return f"{type(err).__name__}: {' '.join(str(err).split())}"


def run(args: argparse.Namespace) -> int:
    """The whole run; returns the exit code: 0, or 1 when a video could not be encoded (its frames were saved) or,
    with --prompts, an entry failed."""
    plan = resolve(args)
    session = prepare(args, plan)
    if args.prompts is None:
        make(args, plan, session, plan.jobs[0])  # a single run's errors end it (exit code 2, from main)
        return 1 if session.unwritten else 0
    failed = []
    for job in plan.jobs:
        try:
            make(args, plan, session, job)
        except Exception as err:  # noqa: BLE001 - one entry's failure (NaN, out of memory, ...) must not end the others
            failed.append(job)
            print(f"error: {job.where} ({job.output}): {one_line(err)}", file=sys.stderr)
            if isinstance(err, torch.OutOfMemoryError):
                torch.cuda.empty_cache()
    made = len(plan.jobs) - len(failed) - len(session.unwritten)
    print(f"made {made} of {len(plan.jobs)} videos from {args.prompts}" +
          (f"; failed: {', '.join(job.where for job in failed)}" if failed else ""))
    return 1 if failed or session.unwritten else 0


def make(args: argparse.Namespace, plan: Plan, session: Session, job: Job) -> None:
    """Generate, write and report one video (the patch's records start afresh for each)."""
    from wan.generate.run import generate
    from wan.generate.stats import step_report

    settings, patch = job.settings, session.patch
    if session.main_rank:
        warn_long_prompt(session.pipe, settings.prompt, job.where if args.prompts else "prompt")
    if patch:
        patch.state.reset()
        patch.state.recorder = session.recorder
    phases: dict = {}
    frames, seconds = generate(session.pipe, settings, decode=session.main_rank, phases=phases)
    if not session.main_rank:
        return  # rank 0 writes the video and reports
    start = time.perf_counter()
    written = session.save(frames, job.output, settings.fps)
    phases["writing"] = time.perf_counter() - start
    records = patch.state.records if patch else None
    steps_report = step_report(records.passes, patch.state.layers, records.experts) if patch else None
    fidelity = None
    if session.full is not None:
        from wan.generate.fidelity import video_fidelity

        fidelity = video_fidelity(session.full[0], frames)
    outcome = report.Outcome(written, seconds, patch.state.mean_density() if patch else None,
                      [patch.state.mean_density(e) for e in range(len(session.names))] if patch else None,
                      steps_report, len(steps_report["computed_steps"]) if steps_report else settings.steps, fidelity,
                      phases)
    if args.stats is not None:
        report.write_run_stats(args.stats, plan, session, settings, outcome)
    print("\n".join(report.summary_lines(plan, session, settings, outcome)))


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """`generate.py` / `nabla-wan generate`: the exit code (2 for bad input, refused before any model loads)."""
    args = build_parser(prog).parse_args(argv)
    from wan.generate.run import NonFiniteLatentsError
    keep_compiled_kernels()

    main_rank = int(os.environ.get("RANK", "0")) == 0  # under torchrun, one rank speaks for all
    try:
        code = run(args)
        if torch.distributed.is_initialized():
            # ranks other than 0 finish first: tear the process group down together, not under rank 0's feet
            torch.distributed.barrier()
    except (ValueError, NonFiniteLatentsError, torch.OutOfMemoryError) as err:  # ModelNotFoundError is a ValueError
        if main_rank:
            print(f"error: {one_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # outputs are written whole or not at all: what was finished stays
        if main_rank:
            print("\ninterrupted: the video being made was not written", file=sys.stderr)
        return 130
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return code
