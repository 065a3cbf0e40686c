"""NABLA: Neighborhood Adaptive Block-Level Attention on PyTorch FlexAttention (model-agnostic)."""

from nabla.attention import AttentionResult, attend, dense_attention, sparse_attention
from nabla.config import SparsityConfig, load_config
from nabla.layout import TileLayout
from nabla.masks import nabla_block_mask, sta_block_mask

__all__ = [
    "AttentionResult",
    "SparsityConfig",
    "TileLayout",
    "attend",
    "dense_attention",
    "load_config",
    "nabla_block_mask",
    "sparse_attention",
    "sta_block_mask",
]
