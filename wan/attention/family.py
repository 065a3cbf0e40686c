"""What the attention patch needs to know of a model family, and nothing more.

The patch (wan/attention/patch.py) and its processor reach a transformer only through this interface: which modules
are the self-attention to replace, the token grid and timestep of a forward, how q, k, v and the output are computed
from an attention module, where the rotary tables come from, and where the token stream starts and ends (for
`pad_dense`). A family module (wan/models/wan.py for Wan2.1/2.2, wan/models/kandinsky5.py for Kandinsky 5)
implements it; adding a model family is one such module, registered in wan/models/families.py.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

from nabla import SparsityConfig, TileLayout


class AttentionFamily(Protocol):
    name: str
    #: the q/k Triton kernels (wan/attention/tiled_qk.py, Wan's norm and rotary arithmetic) may compute q and k
    fused_qk: bool
    #: the whole token stream may run in padded tile order (`pad_dense`, sequence parallelism)
    pads_stream: bool

    def self_attention(self, transformer: torch.nn.Module) -> list[torch.nn.Module]:
        """The self-attention modules whose processor NABLA's replaces, one per block, in order."""

    def forward_inputs(self, args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """The latents [B, C, F, H, W] and the timestep ([B], or [B, tokens] per token) of a transformer forward."""

    def without_own_sparsity(self, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """The forward's arguments with the model's own sparse attention (if it has one) off: NABLA's replaces it."""

    def patch_size(self, transformer: torch.nn.Module) -> tuple[int, int, int]:
        """The latents' (frames, rows, columns) a token covers."""

    def rotary(self, transformer: torch.nn.Module) -> torch.nn.Module:
        """The module whose forward gives the rotary tables of the forward (tiled on sparse steps)."""

    def tile_rotary(self, layout: TileLayout, tables: Any) -> Any:
        """The rotary module's output in tile order, as the blocks are to receive it."""

    def stream_ends(self, transformer: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module]:
        """The first block (its input is the whole token stream) and the output projection (its output is)."""

    def projections(self, attn: Any, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v [B, L, heads * D] of `attn`, raster order, before the norms and the rotary embedding."""

    def norms(self, attn: Any) -> tuple[torch.nn.Module, torch.nn.Module]:
        """The norms of q and k."""

    def normalise(self, attn: Any, query: torch.Tensor, key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q, k [B, L, heads * D] normed as the model does, split into heads [B, L, heads, D]."""

    def rotate(self, x: torch.Tensor, tables: Any) -> torch.Tensor:
        """x [B, L, heads, D] rotated by the rotary tables the blocks receive, as the model does."""

    def heads(self, attn: Any) -> int:
        """The attention heads of `attn`."""

    def output(self, attn: Any, out: torch.Tensor) -> torch.Tensor:
        """The attention module's output from attention's [B, L, heads * D]."""

    def default_config(self, transformer: torch.nn.Module) -> SparsityConfig | None:
        """The sparsity `transformer` was trained with (its checkpoint's own NABLA), or None (training-free)."""
