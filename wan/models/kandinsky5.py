"""The Kandinsky 5 family (Lite and Pro, T2V and I2V: `Kandinsky5Transformer3DModel`) as the attention patch sees it.

Only `visual_transformer_blocks[i].self_attention` is NABLA's; the cross-attention to the text and the text blocks'
self-attention share the same processor class in diffusers and stay stock. What differs from Wan:
- the latents are channels-last [B, T, H, W, C];
- q and k are RMS-normed per head in float32, and rotated by a rotation-matrix table [B, S, 1, D/2, 2, 2] that
  `visual_rope_embeddings` gives as [B, T, H, W, 1, D/2, 2, 2] (the forward flattens it);
- diffusers rounds q and k to bf16 after the rotary embedding whatever the run's dtype: so do we, so that mode full
  is the stock computation and the trained mask is computed from the same q, k;
- the checkpoints of `attention_type: nabla` run the authors' NABLA themselves when the pipeline passes
  `sparse_params`: the patch drops them (its own NABLA replaces that path, in raster order for the rest of the model,
  padded where the grid is not whole tiles), and their default sparsity is the config they were trained with.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import Kandinsky5Transformer3DModel

from nabla import SparsityConfig, TileLayout
from wan.models.kandinsky5_facts import trained_config

__all__ = ["KANDINSKY5", "rotate", "trained_config"]


def rotate(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """diffusers' Kandinsky 5 rotary embedding of x [B, S, H, D] by a rotation-matrix table of S rows ([B, S, 1,
    D/2, 2, 2], or unflattened [B, T, H, W, 1, D/2, 2, 2]): in float32, rounded to bf16 as diffusers' `apply_rotary`
    ends, then back to x's dtype."""
    table = table.reshape(table.shape[0], x.shape[1], 1, -1, 2, 2)
    pairs = x.reshape(*x.shape[:-1], -1, 1, 2).to(torch.float32)
    return (table * pairs).sum(-1).reshape(x.shape).to(torch.bfloat16).type_as(x)


class Kandinsky5Family:
    name = "Kandinsky 5"
    #: the q/k Triton kernels (wan/attention/tiled_qk.py) compute Wan's norm and rotary only
    fused_qk = False
    #: the whole stream in padded tile order (sequence parallelism) is Wan's only
    pads_stream = False

    @staticmethod
    def recognises(transformer: Any) -> bool:
        return isinstance(transformer, Kandinsky5Transformer3DModel)

    def self_attention(self, transformer: torch.nn.Module) -> list[torch.nn.Module]:
        return [block.self_attention for block in transformer.visual_transformer_blocks]

    def forward_inputs(self, args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor]:
        latents = args[0] if args else kwargs["hidden_states"]
        timestep = args[2] if len(args) > 2 else kwargs["timestep"]
        return latents.movedim(-1, 1), timestep  # channels-last -> [B, C, F, H, W] (a view: only its shape is read)

    def without_own_sparsity(self, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """The forward's arguments without `sparse_params`: the model would tile its stream and run the authors'
        NABLA itself."""
        if len(args) > 7:
            return args[:7] + (None,) + args[8:], kwargs
        return args, {**kwargs, "sparse_params": None}

    def patch_size(self, transformer: torch.nn.Module) -> tuple[int, int, int]:
        return tuple(transformer.config.patch_size)

    def rotary(self, transformer: torch.nn.Module) -> torch.nn.Module:
        return transformer.visual_rope_embeddings

    def tile_rotary(self, layout: TileLayout, tables: torch.Tensor) -> torch.Tensor:
        """The rotary table [B, T, H, W, 1, D/2, 2, 2] in tile order, shaped [B, S, 1, 1, 1, D/2, 2, 2] so that the
        forward's own flatten of the grid axes (1 to 3) gives the [B, S, 1, D/2, 2, 2] the blocks read."""
        tiled = layout.tile(tables.flatten(1, 3), dim=1)
        return tiled.unflatten(1, (-1, 1, 1))

    def stream_ends(self, transformer: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module]:
        return transformer.visual_transformer_blocks[0], transformer.out_layer

    def projections(self, attn: Any, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return attn.to_query(hidden_states), attn.to_key(hidden_states), attn.to_value(hidden_states)

    def norms(self, attn: Any) -> tuple[torch.nn.Module, torch.nn.Module]:
        return attn.query_norm, attn.key_norm

    def normalise(self, attn: Any, query: torch.Tensor, key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q, k [B, L, heads * D] -> [B, L, heads, D], RMS-normed per head in float32 as diffusers does."""
        heads = attn.num_heads
        query, key = (x.unflatten(2, (heads, -1)) for x in (query, key))
        return attn.query_norm(query.float()).type_as(query), attn.key_norm(key.float()).type_as(key)

    def rotate(self, x: torch.Tensor, tables: torch.Tensor) -> torch.Tensor:
        return rotate(x, tables)

    def heads(self, attn: Any) -> int:
        return attn.num_heads

    def output(self, attn: Any, out: torch.Tensor) -> torch.Tensor:
        return attn.out_layer(out)

    def default_config(self, transformer: torch.nn.Module) -> SparsityConfig | None:
        return trained_config(transformer.config)


KANDINSKY5 = Kandinsky5Family()
