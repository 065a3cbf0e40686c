"""The fine-tuning loop: flow matching on precomputed latents, LoRA or full, one process or FSDP2 under torchrun.

Global sample n (counted over optimizer steps, accumulation micro-steps, ranks and the per-rank batch, in
that order) takes clip `sample_clip(n)` and draws its noise level and noise from a generator seeded by
(seed, n): the draws do not depend on how many processes share the batch, nor on where a run resumed.
"""

from __future__ import annotations

import functools
import math
import signal
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from diffusers import WanTransformer3DModel
from diffusers.optimization import get_scheduler
from tqdm import tqdm

from nabla.config import SparsityConfig
from wan import flow_matching
from wan.checkpoints import list_checkpoints, load_checkpoint, save_checkpoint, trainable_state
from wan.data_parallel import DataParallel, shard_transformer
from wan.lora import add_lora, save_lora
from wan.run_folder import append_log, truncate_log
from wan.sparsity_schedule import SparseAttention
from wan.train_config import TrainingConfig
from wan.validation import Validator

EXIT_NAN, EXIT_INTERRUPTED = 1, 130


def sample_clip(n: int, clips: int, seed: int) -> int:
    """The clip of global sample n: epoch n // clips visits every clip once, in an order seeded by (seed, epoch)."""
    epoch, position = divmod(n, clips)
    return int(_epoch_order(clips, seed, epoch)[position])


@functools.lru_cache(maxsize=4)
def _epoch_order(clips: int, seed: int, epoch: int) -> torch.Tensor:
    return torch.randperm(clips, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))


def sample_generator(n: int, seed: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + n) % 2**63)


def sample_numbers(step: int, micro: int, training: TrainingConfig, parallel: DataParallel) -> range:
    """Global sample numbers of this rank's part of micro-step `micro` of optimizer step `step` (0-based)."""
    per_micro = training.batch_size * parallel.world_size
    start = (step * training.gradient_accumulation + micro) * per_micro + parallel.rank * training.batch_size
    return range(start, start + training.batch_size)


def make_batch(entries: list[dict[str, torch.Tensor]], numbers: range, training: TrainingConfig, shift: float,
               device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Noisy latents, timesteps, text embeddings and flow targets of the samples `numbers`."""
    x0, noise, sigmas, embeds = [], [], [], []
    for n in numbers:
        entry, generator = entries[sample_clip(n, len(entries), training.seed)], sample_generator(n, training.seed)
        sigmas.append(flow_matching.sample_sigmas(1, training.weighting_scheme, training.logit_mean,
                                                  training.logit_std, training.mode_scale, shift, generator))
        noise.append(torch.randn(entry["latents"].shape, generator=generator))
        x0.append(entry["latents"])
        embeds.append(entry["prompt_embeds"])
    x0, noise, sigmas = torch.stack(x0).to(device), torch.stack(noise).to(device), torch.cat(sigmas).to(device)
    return {"hidden_states": flow_matching.noisy_latents(x0, noise, sigmas).to(dtype),
            "timestep": sigmas * flow_matching.NUM_TRAIN_TIMESTEPS,
            "encoder_hidden_states": torch.stack(embeds).to(device, dtype),
            "target": flow_matching.flow_target(x0, noise)}


def sample_losses(transformer: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean squared error of the predicted velocity, one value per sample (float32)."""
    inputs = {k: v for k, v in batch.items() if k != "target"}
    with torch.autocast(batch["target"].device.type, dtype=inputs["hidden_states"].dtype,
                        enabled=inputs["hidden_states"].dtype != torch.float32):
        prediction = transformer(**inputs, return_dict=False)[0]
    return (prediction.float() - batch["target"]).square().flatten(1).mean(1)


def optimizer_step(transformer: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler, batches: Iterator,
                   max_grad_norm: float, parallel: DataParallel) -> tuple[float, float | None]:
    """Forward and backward over the accumulation micro-batches, then clip and update (unless the loss is not
    finite). Returns the global batch's mean loss and the gradient norm before clipping (None: not updated)."""
    total, count, micro_batches = torch.zeros((), device=parallel.device), 0, list(batches)
    for batch in micro_batches:
        losses = sample_losses(transformer, batch)
        # mean over this rank's micro-batches; FSDP averages over the ranks
        (losses.mean() / len(micro_batches)).backward()
        total, count = total + losses.detach().sum(), count + losses.numel()
    loss = (parallel.sum(total) / (count * parallel.world_size)).item()
    if not math.isfinite(loss):
        optimizer.zero_grad(set_to_none=True)
        return loss, None
    params = [p for group in optimizer.param_groups for p in group["params"]]
    norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return loss, float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)


def make_trainable(transformer: WanTransformer3DModel, training: TrainingConfig) -> WanTransformer3DModel:
    """LoRA (frozen base, float32 adapter) or every weight trainable; training mode; gradient checkpointing."""
    if training.method == "lora":
        add_lora(transformer, training.rank, training.alpha, training.target_modules)
    else:
        transformer.requires_grad_(True)
    transformer.train()
    if training.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    return transformer


def load_trainable_transformer(model: str, training: TrainingConfig, device: torch.device) -> WanTransformer3DModel:
    """The transformer with its trainable weights: a float32 LoRA on bf16 (CUDA) base weights, or float32 masters."""
    dtype = torch.bfloat16 if device.type == "cuda" and training.method == "lora" else torch.float32
    torch.manual_seed(training.seed)  # LoRA's A matrices are random
    transformer = WanTransformer3DModel.from_pretrained(model, subfolder="transformer", dtype=dtype)
    return make_trainable(transformer, training).to(device)


def build_optimizer(transformer: torch.nn.Module, training: TrainingConfig):
    params = [p for p in transformer.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=training.learning_rate, betas=training.betas,
                                  weight_decay=training.weight_decay)
    scheduler = get_scheduler(training.lr_scheduler, optimizer, num_warmup_steps=training.warmup_steps,
                              num_training_steps=training.steps)
    return optimizer, scheduler


@contextmanager
def stop_requests() -> Iterator[Callable[[], bool]]:
    """SIGINT and SIGTERM set a flag (read at the end of each optimizer step) instead of killing the run."""
    requested = []
    previous = {sig: signal.signal(sig, lambda *_: requested.append(True)) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield lambda: bool(requested)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


class Trainer:
    """One run: the model, its optimizer and schedule, and the loop that never loses it."""

    def __init__(self, model: str, entries: list[dict[str, torch.Tensor]], output: Path, sparsity: SparsityConfig,
                 training: TrainingConfig, parallel: DataParallel, shift: float, validator: Validator | None = None):
        self.entries, self.output, self.training, self.parallel = entries, output, training, parallel
        self.shift, self.validator, self.lora = shift, validator, training.method == "lora"
        cuda = parallel.device.type == "cuda"
        self.compute_dtype = torch.bfloat16 if cuda else torch.float32
        self.transformer = load_trainable_transformer(model, training, parallel.device)
        self.attention = SparseAttention(self.transformer, sparsity, training.sparsity_schedule, compile=cuda)
        if parallel.distributed:
            shard_transformer(self.transformer, self.compute_dtype)
        self.optimizer, self.scheduler = build_optimizer(self.transformer, training)
        self.checkpoints = output / "checkpoints"

    def resume(self) -> int:
        """Continue from the latest checkpoint (0 if there is none); the log keeps the steps up to it."""
        saved = list_checkpoints(self.checkpoints)
        step = load_checkpoint(saved[-1], self.transformer, self.optimizer, self.scheduler, self.lora) if saved else 0
        if self.parallel.is_main:
            truncate_log(self.output, step)
        return step

    def save(self, step: int) -> Path:
        return save_checkpoint(self.checkpoints, step, self.transformer, self.optimizer, self.scheduler,
                               self.parallel, self.lora, self.training.keep_last)

    def batches(self, step: int) -> Iterator[dict[str, torch.Tensor]]:
        for micro in range(self.training.gradient_accumulation):
            numbers = sample_numbers(step, micro, self.training, self.parallel)
            yield make_batch(self.entries, numbers, self.training, self.shift, self.parallel.device,
                             self.compute_dtype)

    def step(self, step: int) -> dict:
        """Optimizer step `step` (0-based); returns its log entry (step counted from 1)."""
        config = self.attention.start_step(step)
        start = time.perf_counter()
        lr = self.scheduler.get_last_lr()[0]
        loss, norm = optimizer_step(self.transformer, self.optimizer, self.scheduler, self.batches(step),
                                    self.training.max_grad_norm, self.parallel)
        return {"step": step + 1, "loss": loss, "lr": lr, "grad_norm": norm, "density": self.attention.mean_density(),
                "attention": config.mode, "max_density": config.max_density if config.is_sparse else None,
                "s_per_step": round(time.perf_counter() - start, 4)}

    def run(self, start: int) -> int:
        """Train from step `start` to the end; returns the exit code (0, EXIT_NAN or EXIT_INTERRUPTED)."""
        self.last_saved = list_checkpoints(self.checkpoints)[-1:]
        bar = tqdm(total=self.training.steps, initial=start, disable=not self.parallel.is_main, desc="training",
                   unit="step")
        with stop_requests() as stop_requested, bar:
            for step in range(start, self.training.steps):
                entry = self.step(step)
                if not math.isfinite(entry["loss"]):
                    where = f"last good checkpoint: {self.last_saved[0]}" if self.last_saved else "no checkpoint yet"
                    self._say(bar, f"error: loss is {entry['loss']} at step {step + 1}; stopped before updating the "
                                   f"weights ({where}); lower training.learning_rate and --resume")
                    return EXIT_NAN
                self._record(bar, entry)
                stopping = self.parallel.any(stop_requested())
                self._after_step(step + 1, stopping)
                if stopping:
                    self._say(bar, f"interrupted: checkpoint {self.last_saved[0]} saved; continue with --resume")
                    return EXIT_INTERRUPTED
        return 0

    def _say(self, bar: tqdm, message: str) -> None:
        if self.parallel.is_main:
            bar.write(message, file=sys.stderr)

    def _record(self, bar: tqdm, entry: dict) -> None:
        if self.parallel.is_main:
            append_log(self.output, entry)
            bar.set_postfix(loss=f"{entry['loss']:.4f}", lr=f"{entry['lr']:.2e}", s_per_step=entry["s_per_step"])
            bar.update()

    def _after_step(self, done: int, stopping: bool) -> None:
        """Checkpoint when due, when stopping and at the end; validation videos when due."""
        if stopping or done % self.training.checkpoint_every == 0 or done == self.training.steps:
            self.last_saved = [self.save(done)]
        if self.validator is not None and self.validator.due(done):
            self.validate(done)

    def validate(self, step: int) -> None:
        self.attention.for_sampling()
        self.transformer.eval()
        self.validator.run(self.transformer, step, self.output / "validation", self.parallel.is_main)
        self.transformer.train()

    def export(self) -> Path:
        """Write the result: OUT/lora (diffusers LoRA) or OUT/transformer (diffusers transformer folder)."""
        weights = trainable_state(self.transformer, self.lora)
        if self.lora:
            target = self.output / "lora"
            if self.parallel.is_main:
                save_lora(target, self.transformer, weights)
        else:
            target = self.output / "transformer"
            if self.parallel.is_main:
                save_full_transformer(target, self.transformer.config, weights, self.compute_dtype)
        self.parallel.barrier()
        return target


def save_full_transformer(folder: Path, config, weights: dict[str, torch.Tensor], dtype: torch.dtype) -> None:
    """A diffusers transformer folder (what generate.py --transformer loads) from full weights, in `dtype`."""
    with torch.device("meta"):
        model = WanTransformer3DModel.from_config(config)
    model.load_state_dict(weights, strict=False, assign=True)
    model.to(dtype).save_pretrained(folder)
