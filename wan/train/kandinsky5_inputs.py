"""Kandinsky 5's training inputs, as Kandinsky5T2VPipeline makes them for its transformer: a clip's latents
channels-last [F, H, W, C] times the VAE's `scaling_factor` (the pipeline divides by it before decoding), the caption's
Qwen2.5-VL embeddings and CLIP pooled embedding (its `encode_prompt`), and a forward's keyword arguments (its denoising
loop's: the `visual_cond` channels, zeros for text to video, the rotary positions and scale factor; no `sparse_params`:
the attention is NABLA's patch or dense)."""

from __future__ import annotations

import torch
from diffusers import Kandinsky5T2VPipeline

from wan.models.spec import MAX_TEXT_TOKENS, ModelSpec


@torch.no_grad()
def encode_clip(encoders, video: torch.Tensor, caption: str) -> dict[str, torch.Tensor]:
    """One clip [3, F, H, W] in [-1, 1]: `latents` [F', H', W', C], `prompt_embeds` [L, D] and `pooled_embeds` [D2]
    (float32, on the CPU)."""
    vae = encoders.vae
    latents = vae.encode(video[None].to(vae.device, vae.dtype)).latent_dist.mode()[0].float()
    qwen, clip, _ = encoders.encode_prompt(caption, max_sequence_length=MAX_TEXT_TOKENS,
                                           device=encoders.text_encoder.device, dtype=torch.float32)
    tensors = {"latents": (latents * vae.config.scaling_factor).permute(1, 2, 3, 0), "prompt_embeds": qwen[0],
               "pooled_embeds": clip[0]}
    return {name: t.cpu().contiguous() for name, t in tensors.items()}


def forward_inputs(latents: torch.Tensor, timestep: torch.Tensor, prompt_embeds: torch.Tensor,
                   pooled_embeds: torch.Tensor, spec: ModelSpec) -> dict:
    """The transformer's keyword arguments for noisy `latents` [B, F, H, W, C] at `timestep` [B] (s x 1000), as the
    pipeline's denoising loop passes them."""
    frames, height, width = latents.shape[1:4]
    if spec.visual_cond:  # the first frame's latents and mask channels: none for text to video
        latents = torch.cat([latents, torch.zeros_like(latents), torch.zeros_like(latents[..., :1])], dim=-1)
    _, patch_h, patch_w = spec.patch_size
    device = latents.device
    # _get_scale_factor reads nothing of the pipeline: the rotary scale of this size in pixels
    scale = Kandinsky5T2VPipeline._get_scale_factor(None, height * spec.vae_scale, width * spec.vae_scale)
    return {"hidden_states": latents, "encoder_hidden_states": prompt_embeds, "pooled_projections": pooled_embeds,
            "timestep": timestep.to(latents.dtype),
            "visual_rope_pos": [torch.arange(frames, device=device), torch.arange(height // patch_h, device=device),
                                torch.arange(width // patch_w, device=device)],
            "text_rope_pos": torch.arange(prompt_embeds.shape[1], device=device), "scale_factor": scale}
