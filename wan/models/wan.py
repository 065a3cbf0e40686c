"""The Wan family (Wan2.1 and Wan2.2: T2V, I2V, FLF2V, A14B, TI2V) as the attention patch sees it: every block's
`attn1` is self-attention (`attn2`, the cross-attention to the text and image tokens, stays stock), the latents and
the timestep are the forward's first two arguments, q, k, v are diffusers' projections, RMS-normed over all heads
and rotated by `transformer.rope`'s tables."""

from __future__ import annotations

from typing import Any

import torch
from diffusers import WanTransformer3DModel
from diffusers.models.transformers.transformer_wan import _get_qkv_projections


class WanFamily:
    name = "Wan"

    @staticmethod
    def recognises(transformer: Any) -> bool:
        return isinstance(transformer, WanTransformer3DModel)

    def self_attention(self, transformer: torch.nn.Module) -> list[torch.nn.Module]:
        return [block.attn1 for block in transformer.blocks]

    def forward_inputs(self, args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor]:
        latents = args[0] if args else kwargs["hidden_states"]
        return latents, args[1] if len(args) > 1 else kwargs["timestep"]

    def patch_size(self, transformer: torch.nn.Module) -> tuple[int, int, int]:
        return tuple(transformer.config.patch_size)

    def rotary(self, transformer: torch.nn.Module) -> torch.nn.Module:
        return transformer.rope

    def stream_ends(self, transformer: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module]:
        return transformer.blocks[0], transformer.proj_out

    def projections(self, attn: Any, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return _get_qkv_projections(attn, hidden_states, None)

    def norms(self, attn: Any) -> tuple[torch.nn.Module, torch.nn.Module]:
        return attn.norm_q, attn.norm_k

    def heads(self, attn: Any) -> int:
        return attn.heads

    def output(self, attn: Any, out: torch.Tensor) -> torch.Tensor:
        return attn.to_out[1](attn.to_out[0](out))


WAN = WanFamily()
