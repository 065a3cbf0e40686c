"""Validation videos during training: the configured prompts sampled with the current weights.

The prompts are encoded once at the start and the text encoder is freed; the VAE stays for decoding. Every
rank samples (FSDP's gathers need them all), rank 0 writes `validation/step-NNNNNNNN-I.mp4`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import WanPipeline

from wan.io.video import write_video_or_frames
from wan.models.spec import MAX_TEXT_TOKENS, T2V, ModelSpec
from wan.train.config import TrainingConfig


class Validator:
    def __init__(self, encoders: WanPipeline, training: TrainingConfig, device: torch.device, dtype: torch.dtype,
                 spec: ModelSpec = T2V):
        self.training, self.dtype = training, dtype
        with torch.no_grad():
            self.embeds = [encoders.encode_prompt(p, negative_prompt="", max_sequence_length=MAX_TEXT_TOKENS,
                                                  device=device, dtype=dtype)
                           for p in training.validation.prompts]
        self.vae, self.scheduler = encoders.vae.to(device), encoders.scheduler
        self.expand_timesteps = spec.ti2v  # Wan2.2 TI2V-5B: per-token timesteps there too

    def due(self, step: int) -> bool:
        every = self.training.validation.every
        return bool(every) and step % every == 0

    @torch.no_grad()
    def run(self, transformer: torch.nn.Module, step: int, folder: Path, write: bool, tracker=None) -> list[Path]:
        """Sample each prompt (every rank), write the videos (where `write`) and give the tracker (a TensorBoard
        SummaryWriter, where given) their first, middle and last frames; returns the files written."""
        config, training = self.training.validation, self.training
        pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=self.vae, scheduler=self.scheduler,
                           transformer=transformer, expand_timesteps=self.expand_timesteps)
        pipe.set_progress_bar_config(disable=True)
        written = []
        for index, (embeds, negative) in enumerate(self.embeds):
            video = pipe(prompt_embeds=embeds, negative_prompt_embeds=negative, height=training.height,
                         width=training.width, num_frames=training.frames, num_inference_steps=config.steps,
                         guidance_scale=config.guidance_scale, output_type="np",
                         generator=torch.Generator().manual_seed(config.seed)).frames[0]
            if write:
                folder.mkdir(parents=True, exist_ok=True)
                path, _ = write_video_or_frames(video, folder / f"step-{step:08d}-{index}.mp4", fps=training.fps)
                written.append(path)
            if write and tracker is not None:  # frames, not a video: TensorBoard's video summary needs moviepy 1
                frames = video[[0, len(video) // 2, len(video) - 1]]
                tracker.add_images(f"validation/{index}", frames, step, dataformats="NHWC")
        return written
