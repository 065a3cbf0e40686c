"""The fine-tuning loop: flow matching on precomputed latents, LoRA or full, one process or FSDP2 under torchrun.

Global sample n (counted over optimizer steps, accumulation micro-steps, ranks and the per-rank batch, in
that order) takes clip `sample_clip(n)` and draws its noise level and noise from a generator seeded by
(seed, n): the draws do not depend on how many processes share the batch, nor on where a run resumed.
A Wan2.2 A14B run trains one expert or both; with both, optimizer steps alternate between them (even steps, counted
from 0, `transformer`; odd ones `transformer_2`), every sample of a step on its expert's side of the boundary, so
all ranks run the same expert (FSDP's collectives) and each expert sees the timesteps it runs at sampling time.
"""

from __future__ import annotations

import contextlib
import functools
import math
import shutil
import signal
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from diffusers import AutoModel, Kandinsky5Transformer3DModel, WanTransformer3DModel
from diffusers.optimization import get_scheduler
from tqdm import tqdm

from nabla.config import SparsityConfig
from wan.models import kandinsky5_facts
from wan.models.lora import add_lora, save_lora
from wan.models.spec import T2V, ModelSpec
from wan.train import flow_matching
from wan.train.checkpoints import EMA_FILE, list_checkpoints, load_checkpoint, save_checkpoint, trainable_state
from wan.train.checks import first_frame_prob, lora_targets, trained_experts
from wan.train.config import TrainingConfig
from wan.train.data_parallel import DataParallel, shard_transformer
from wan.train.ema import WeightAverage
from wan.train.run_folder import append_log, truncate_log
from wan.train.sparsity_schedule import SparseAttention
from wan.train.validation import Validator

EXIT_NAN, EXIT_INTERRUPTED = 1, 130


def sample_clip(n: int, clips: int, seed: int) -> int:
    """The clip of global sample n: epoch n // clips visits every clip once, in an order seeded by (seed, epoch)."""
    epoch, position = divmod(n, clips)
    return int(_epoch_order(clips, seed, epoch)[position])


@functools.lru_cache(maxsize=4)
def _epoch_order(clips: int, seed: int, epoch: int) -> torch.Tensor:
    return torch.randperm(clips, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))


def caption_dropped(n: int, training: TrainingConfig) -> bool:
    """Whether global sample n trains with the empty prompt (a draw of its own: the other draws stay as they are)."""
    generator = torch.Generator().manual_seed((training.seed * 7_000_003 + n) % 2**63 + 1)
    return bool(torch.rand((), generator=generator) < training.caption_dropout)


def sample_entry(n: int, count: int, shapes: tuple, training: TrainingConfig) -> int:
    """The entry (of `count`) of global sample n: each epoch visits every entry `repeats` times in a seeded order;
    with buckets (`shapes`: each entry's latent shape) the order runs in whole batches of one shape each."""
    if not training.buckets:
        return sample_clip(n, count * training.repeats, training.seed) % count
    length = len(_bucket_order(shapes, training.batch_size, training.repeats, training.seed, 0))
    epoch, position = divmod(n, length)
    return _bucket_order(shapes, training.batch_size, training.repeats, training.seed, epoch)[position]


@functools.lru_cache(maxsize=4)
def _bucket_order(shapes: tuple, batch: int, repeats: int, seed: int, epoch: int) -> tuple[int, ...]:
    """An epoch's entries in batches of one shape: each bucket shuffled and cut into batches (its last one filled
    from its own start), the batches shuffled."""
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    buckets: dict[tuple, list[int]] = {}
    for index, shape in enumerate(shapes):
        buckets.setdefault(shape, []).append(index)
    chunks = []
    for members in buckets.values():
        members = members * repeats
        shuffled = [members[k] for k in torch.randperm(len(members), generator=generator).tolist()]
        shuffled += (shuffled * batch)[:-len(shuffled) % batch]
        chunks += [shuffled[k:k + batch] for k in range(0, len(shuffled), batch)]
    return tuple(i for k in torch.randperm(len(chunks), generator=generator).tolist() for i in chunks[k])


def sample_generator(n: int, seed: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + n) % 2**63)


def sample_numbers(step: int, micro: int, training: TrainingConfig, parallel: DataParallel) -> range:
    """Global sample numbers of this rank's part of micro-step `micro` of optimizer step `step` (0-based)."""
    per_micro = training.batch_size * parallel.world_size
    start = (step * training.gradient_accumulation + micro) * per_micro + parallel.rank * training.batch_size
    return range(start, start + training.batch_size)


def make_batch(entries: list[dict[str, torch.Tensor]], numbers: range, training: TrainingConfig, shift: float,
               device: torch.device, dtype: torch.dtype, spec: ModelSpec = T2V,
               timesteps: tuple[float, float] | None = None,
               empty_prompt: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The transformer's inputs and the flow targets of the samples `numbers`, as `spec`'s pipeline feeds it; their
    timesteps drawn within `timesteps` [low, high) (an A14B expert's side of the boundary) where given; a sample's
    caption replaced by `empty_prompt` (the empty prompt's embeddings) at the rate training.caption_dropout."""
    picked, noise, sigmas, conditioned = [], [], [], []
    shapes = tuple(tuple(entry["latents"].shape) for entry in entries) if training.buckets else ()
    for n in numbers:
        entry = entries[sample_entry(n, len(entries), shapes, training)]
        generator = sample_generator(n, training.seed)
        if training.caption_dropout and caption_dropped(n, training):
            entry = {**entry, "prompt_embeds": empty_prompt}
        sigmas.append(flow_matching.sample_sigma_in(timesteps, training.weighting_scheme, training.logit_mean,
                                                    training.logit_std, training.mode_scale, shift, generator))
        noise.append(torch.randn(entry["latents"].shape, generator=generator))
        if spec.ti2v:
            conditioned.append(bool(torch.rand((), generator=generator) < first_frame_prob(training)))
        picked.append(entry)

    def stacked(name: str) -> torch.Tensor:
        return torch.stack([entry[name] for entry in picked]).to(device)

    x0, noise, sigmas = stacked("latents"), torch.stack(noise).to(device), torch.cat(sigmas).to(device)
    hidden, timestep = flow_matching.noisy_latents(x0, noise, sigmas), sigmas * flow_matching.NUM_TRAIN_TIMESTEPS
    if spec.kandinsky5:  # its own arguments, channels-last latents
        from wan.train.kandinsky5_inputs import forward_inputs

        inputs = forward_inputs(hidden.to(dtype), timestep, stacked("prompt_embeds").to(dtype),
                                stacked("pooled_embeds").to(dtype), spec)
        return {**inputs, "target": flow_matching.flow_target(x0, noise)}
    batch = {"encoder_hidden_states": stacked("prompt_embeds").to(dtype), "target": flow_matching.flow_target(x0, noise)}
    if spec.ti2v:  # TI2V: a conditioned sample's first frame is the clean latent, at timestep 0
        mask = flow_matching.first_frame_mask(x0.shape, torch.tensor(conditioned, dtype=torch.bool)).to(device)
        hidden = (1 - mask) * x0 + mask * hidden
        timestep, batch["loss_mask"] = flow_matching.token_timesteps(mask, timestep, spec.patch_size), mask
    if spec.image_condition:  # I2V: the first frame's mask and latents along channels, as the pipeline does
        hidden = torch.cat([hidden, stacked("condition")], dim=1)
    if spec.image_embeds:
        batch["encoder_hidden_states_image"] = stacked("image_embeds").to(dtype)
    return {"hidden_states": hidden.to(dtype), "timestep": timestep, **batch}


def sample_losses(transformer: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean squared error of the predicted velocity, one value per sample (float32), over the frames that `loss_mask`
    keeps where the batch has one (TI2V: not the conditioning frame)."""
    inputs = {k: v for k, v in batch.items() if k not in ("target", "loss_mask")}
    with torch.autocast(batch["target"].device.type, dtype=inputs["hidden_states"].dtype,
                        enabled=inputs["hidden_states"].dtype != torch.float32):
        prediction = transformer(**inputs, return_dict=False)[0]
    error = (prediction.float() - batch["target"]).square()
    if "loss_mask" in batch:
        return flow_matching.masked_mean(error, batch["loss_mask"])
    return error.flatten(1).mean(1)


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
    """LoRA (frozen base, float32 adapter; Kandinsky 5's on its visual blocks) or every weight trainable; training
    mode; gradient checkpointing."""
    if training.method == "lora":
        kandinsky5 = isinstance(transformer, Kandinsky5Transformer3DModel)
        add_lora(transformer, training.rank, training.alpha, lora_targets(kandinsky5, training.target_modules),
                 blocks=kandinsky5_facts.VISUAL_BLOCKS if kandinsky5 else None)
    else:
        transformer.requires_grad_(True)
    transformer.train()
    if training.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    return transformer


def load_trainable_transformer(model: str, training: TrainingConfig, device: torch.device,
                               expert: str = "transformer") -> WanTransformer3DModel:
    """The transformer `expert` (the pipeline's component) with its trainable weights: a float32 LoRA on bf16 (CUDA)
    base weights, or float32 masters."""
    dtype = torch.bfloat16 if device.type == "cuda" and training.method == "lora" else torch.float32
    torch.manual_seed(training.seed)  # LoRA's A matrices are random
    # the class its config names: WanTransformer3DModel, Kandinsky5Transformer3DModel
    transformer = AutoModel.from_pretrained(model, subfolder=expert, dtype=dtype)
    return make_trainable(transformer, training).to(device)


def build_optimizer(transformer: torch.nn.Module, training: TrainingConfig):
    """The optimizer `training.optimizer` names over the trainable parameters, and its learning-rate schedule."""
    params = [p for p in transformer.parameters() if p.requires_grad]
    lr, betas, decay = training.learning_rate, training.betas, training.weight_decay
    if training.optimizer == "adamw8bit":
        import bitsandbytes

        optimizer = bitsandbytes.optim.AdamW8bit(params, lr=lr, betas=betas, weight_decay=decay)
    elif training.optimizer == "prodigy":
        import prodigyopt

        optimizer = prodigyopt.Prodigy(params, lr=lr, betas=betas, weight_decay=decay)
    elif training.optimizer == "sgd":
        optimizer = torch.optim.SGD(params, lr=lr, momentum=betas[0], weight_decay=decay)
    else:
        kind = torch.optim.AdamW if training.optimizer == "adamw" else torch.optim.Adam
        optimizer = kind(params, lr=lr, betas=betas, weight_decay=decay)
    scheduler = get_scheduler(training.lr_scheduler, optimizer, num_warmup_steps=training.warmup_steps,
                              num_training_steps=training.steps)
    return optimizer, scheduler


class _NoTracker:
    def close(self) -> None:
        pass


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
                 training: TrainingConfig, parallel: DataParallel, shift: float, validator: Validator | None = None,
                 spec: ModelSpec = T2V, empty_prompt: torch.Tensor | None = None):
        self.entries, self.output, self.training, self.parallel = entries, output, training, parallel
        self.shift, self.validator, self.lora, self.spec = shift, validator, training.method == "lora", spec
        self.empty_prompt = empty_prompt  # the empty prompt's embeddings, for caption dropout
        cuda = parallel.device.type == "cuda"
        self.compute_dtype = torch.bfloat16 if cuda else torch.float32
        self.experts = {name: load_trainable_transformer(model, training, parallel.device, name)
                        for name in trained_experts(spec, training.expert)}
        # One transformer is the model itself (its checkpoints' keys as ever); two are one module, keys by expert
        # name, whose attributes `transformer` and `transformer_2` are what enable_nabla patches in a pipeline.
        self.model = next(iter(self.experts.values())) if len(self.experts) == 1 else torch.nn.ModuleDict(self.experts)
        self.attention = SparseAttention(self.model, sparsity, training.sparsity_schedule, compile=cuda)
        if parallel.distributed:
            for transformer in self.experts.values():
                shard_transformer(transformer, self.compute_dtype)
        self.optimizer, self.scheduler = build_optimizer(self.model, training)
        # after sharding: each rank averages its own shards
        self.ema = WeightAverage(self.model, training.ema_decay) if training.ema_decay is not None else None
        self.checkpoints = output / "checkpoints"
        self.tracker = None
        if parallel.is_main and training.tracker == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            self.tracker = SummaryWriter(str(output / "tensorboard"))

    def parameter_counts(self) -> tuple[int, int]:
        """(trainable, all) parameters of the transformers that train."""
        params = list(self.model.parameters())
        return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)

    def resume(self, checkpoint: Path | None = None) -> int:
        """Continue from `checkpoint`, else the latest (0 if there is none); the log keeps the steps up to it, and
        the checkpoints after it are dropped (the run goes on from there)."""
        saved = list_checkpoints(self.checkpoints)
        checkpoint, extra = checkpoint or (saved[-1] if saved else None), {}
        step = load_checkpoint(checkpoint, self.model, self.optimizer, self.scheduler, self.lora, extra) if checkpoint \
            else 0
        if self.ema is not None and checkpoint:
            self.ema.load(checkpoint / EMA_FILE, extra["ema"], self.lora)
        self.parallel.barrier()  # every rank has read it before a newer one goes
        if self.parallel.is_main:
            truncate_log(self.output, step)
            for newer in saved[saved.index(checkpoint) + 1:] if checkpoint else []:
                shutil.rmtree(newer)
        return step

    def save(self, step: int) -> Path:
        ema = self.ema.full_state(self.lora) if self.ema is not None else None  # collective: before rank 0 writes
        extra = {"ema": self.ema.settings()} if self.ema is not None else None
        return save_checkpoint(self.checkpoints, step, self.model, self.optimizer, self.scheduler,
                               self.parallel, self.lora, self.training.keep_last, extra, ema)

    def expert_at(self, step: int) -> str:
        """The expert that optimizer step `step` trains: the only one, or both in turn."""
        names = list(self.experts)
        return names[step % len(names)]

    def batches(self, step: int, expert: str) -> Iterator[dict[str, torch.Tensor]]:
        timesteps = self.spec.timestep_range(expert)
        for micro in range(self.training.gradient_accumulation):
            numbers = sample_numbers(step, micro, self.training, self.parallel)
            yield make_batch(self.entries, numbers, self.training, self.shift, self.parallel.device,
                             self.compute_dtype, self.spec, timesteps, self.empty_prompt)

    def step(self, step: int) -> dict:
        """Optimizer step `step` (0-based); returns its log entry (step counted from 1; `expert` for Wan2.2 A14B)."""
        config = self.attention.start_step(step)
        start = time.perf_counter()
        lr, expert = self.scheduler.get_last_lr()[0], self.expert_at(step)
        loss, norm = optimizer_step(self.experts[expert], self.optimizer, self.scheduler, self.batches(step, expert),
                                    self.training.max_grad_norm, self.parallel)
        if self.ema is not None and norm is not None:
            self.ema.step()
        entry = {"step": step + 1, "loss": loss, "lr": lr, "grad_norm": norm, "density": self.attention.mean_density(),
                 "attention": config.mode, "max_density": config.max_density if config.is_sparse else None,
                 "s_per_step": round(time.perf_counter() - start, 4)}
        return {**entry, "expert": expert} if len(self.spec.experts) > 1 else entry

    def run(self, start: int) -> int:
        """Train from step `start` to the end; returns the exit code (0, EXIT_NAN or EXIT_INTERRUPTED)."""
        self.last_saved = list_checkpoints(self.checkpoints)[-1:]
        bar = tqdm(total=self.training.steps, initial=start, disable=not self.parallel.is_main, desc="training",
                   unit="step")
        with stop_requests() as stop_requested, bar, contextlib.closing(self.tracker or _NoTracker()):
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
        """The run's last word: after the progress bar's last line, not inside it."""
        bar.close()
        if self.parallel.is_main:
            print(message, file=sys.stderr, flush=True)

    def _record(self, bar: tqdm, entry: dict) -> None:
        if self.parallel.is_main:
            append_log(self.output, entry)
            if self.tracker is not None:
                for key in ("loss", "lr", "grad_norm", "density", "max_density", "s_per_step"):
                    if isinstance(entry.get(key), (int, float)):
                        self.tracker.add_scalar(f"train/{key}", entry[key], entry["step"])
                self.tracker.flush()
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
        self.model.eval()
        self.validator.run(self.model, step, self.output / "validation", self.parallel.is_main, self.tracker)
        self.model.train()

    def export(self) -> list[Path]:
        """Write the result of each trained expert: OUT/lora (a diffusers LoRA) or OUT/transformer (a diffusers
        transformer folder); Wan2.2's low-noise expert's go to OUT/lora_2 (loaded with load_into_transformer_2=True)
        or OUT/transformer_2. With EMA, its weights too: OUT/lora_ema, OUT/transformer_ema, ..."""
        targets = self._export("")
        if self.ema is not None:
            with self.ema.in_place():
                targets += self._export("_ema")
        return targets

    def _export(self, suffix: str) -> list[Path]:
        targets = []
        for name, transformer in self.experts.items():
            weights = trainable_state(transformer, self.lora)
            target = self.output / (result_folder(name, self.lora) + suffix)
            if self.parallel.is_main and self.lora:
                save_lora(target, transformer, weights)
            elif self.parallel.is_main:
                save_full_transformer(target, transformer.config, weights, self.compute_dtype)
            targets.append(target)
        self.parallel.barrier()
        return targets


def result_folder(expert: str, lora: bool) -> str:
    """The folder of an expert's result: named as its pipeline component (transformer, transformer_2), a LoRA's with
    lora in its place (lora, lora_2)."""
    return "lora" + expert.removeprefix("transformer") if lora else expert


def save_full_transformer(folder: Path, config, weights: dict[str, torch.Tensor], dtype: torch.dtype) -> None:
    """A diffusers transformer folder (what generate.py --transformer loads) from full weights, in `dtype`."""
    with torch.device("meta"):
        model = WanTransformer3DModel.from_config(config)
    model.load_state_dict(weights, strict=False, assign=True)
    model.to(dtype).save_pretrained(folder)
