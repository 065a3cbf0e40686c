"""Wan VACE (WanVACEPipeline's WanVACETransformer3DModel) as the attention patch sees it: Wan's blocks plus the VACE
blocks, which run first, on the control stream (the video, mask and reference-image latents), and whose hints are
added to the main stream after the main blocks of `vace_layers`.

Every self-attention is replaced: each main block's `attn1` (layers 0 .. L-1, numbered as in a Wan2.1 model of L
blocks) and each VACE block's `attn1` (layers L, L+1, ...). Both streams have the token grid of the latents and
the same rotary tables, and their attention modules are Wan's, so q, k, v, the norms and the output are the Wan
family's. The `attn2` of both, cross-attention to the text, stays stock.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import WanVACETransformer3DModel

from wan.models.wan import WanFamily


class VaceFamily(WanFamily):
    name = "Wan VACE"
    #: diffusers gives this transformer no context-parallel plan, so there is no sequence split to pad for; the VACE
    #: blocks' control stream would also need tiling beside the main one
    pads_stream = False

    @staticmethod
    def recognises(transformer: Any) -> bool:
        return isinstance(transformer, WanVACETransformer3DModel)

    def self_attention(self, transformer: torch.nn.Module) -> list[torch.nn.Module]:
        return super().self_attention(transformer) + [block.attn1 for block in transformer.vace_blocks]

    def stream_ends(self, transformer: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module]:
        # the VACE blocks run before the main ones: a pass starts at the first of them
        return transformer.vace_blocks[0], transformer.proj_out


VACE = VaceFamily()
