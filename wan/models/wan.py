"""The Wan family (Wan2.1 and Wan2.2: T2V, I2V, FLF2V, A14B, TI2V) as the attention patch sees it: every block's
`attn1` is self-attention (`attn2`, the cross-attention to the text and image tokens, stays stock), the latents and
the timestep are the forward's first two arguments, q, k, v are diffusers' projections, RMS-normed over all heads
and rotated by `transformer.rope`'s tables."""

from __future__ import annotations

from typing import Any

import torch
from diffusers import WanTransformer3DModel
from diffusers.models.transformers.transformer_wan import _get_qkv_projections

from nabla import SparsityConfig, TileLayout


def rotate_pairwise(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """diffusers' Wan rotary embedding without its stack, the same values: (x1 c - x2 s, x2 c + x1 s) as
    x c + swap(x) (-s, s), in float32 where cos is float32 (as from_pretrained loads the tables).

    Inductor writes the two halves of a stack to memory and stacks them in another kernel (two more passes over
    q and k); flip and broadcasts fuse into the kernel that writes q, k.
    """
    pairs = x.unflatten(-1, (-1, 2))
    cos = cos[..., 0::2].unsqueeze(-1)
    sin = sin[..., 1::2].unsqueeze(-1) * torch.tensor([-1.0, 1.0], dtype=sin.dtype, device=sin.device)
    return (pairs * cos + pairs.flip(-1) * sin).flatten(-2).type_as(x)


class WanFamily:
    name = "Wan"
    #: the q/k Triton kernels (wan/attention/tiled_qk.py) compute this family's norm and rotary embedding
    fused_qk = True
    #: sequence parallelism may run the whole stream in padded tile order (`pad_dense`)
    pads_stream = True

    @staticmethod
    def recognises(transformer: Any) -> bool:
        return isinstance(transformer, WanTransformer3DModel)

    def self_attention(self, transformer: torch.nn.Module) -> list[torch.nn.Module]:
        return [block.attn1 for block in transformer.blocks]

    def forward_inputs(self, args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor]:
        latents = args[0] if args else kwargs["hidden_states"]
        return latents, args[1] if len(args) > 1 else kwargs["timestep"]

    def without_own_sparsity(self, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        return args, kwargs  # Wan has no sparse attention of its own

    def patch_size(self, transformer: torch.nn.Module) -> tuple[int, int, int]:
        return tuple(transformer.config.patch_size)

    def rotary(self, transformer: torch.nn.Module) -> torch.nn.Module:
        return transformer.rope

    def tile_rotary(self, layout: TileLayout, tables: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        return tuple(layout.tile(t, dim=1) for t in tables)

    def stream_ends(self, transformer: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module]:
        return transformer.blocks[0], transformer.proj_out

    def projections(self, attn: Any, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return _get_qkv_projections(attn, hidden_states, None)

    def norms(self, attn: Any) -> tuple[torch.nn.Module, torch.nn.Module]:
        return attn.norm_q, attn.norm_k

    def normalise(self, attn: Any, query: torch.Tensor, key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return attn.norm_q(query).unflatten(2, (attn.heads, -1)), attn.norm_k(key).unflatten(2, (attn.heads, -1))

    def rotate(self, x: torch.Tensor, tables: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return rotate_pairwise(x, *tables)

    def heads(self, attn: Any) -> int:
        return attn.heads

    def output(self, attn: Any, out: torch.Tensor) -> torch.Tensor:
        return attn.to_out[1](attn.to_out[0](out))

    def default_config(self, transformer: torch.nn.Module) -> SparsityConfig | None:
        return None  # NABLA is training-free on Wan: the user picks the sparsity


WAN = WanFamily()
