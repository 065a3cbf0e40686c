"""NABLA: Neighborhood Adaptive Block-Level Attention on PyTorch FlexAttention (model-agnostic)."""

from importlib.metadata import version

from nabla.attention import AttentionResult, attend, dense_attention, sparse_attention
from nabla.config import SparsityConfig, load_config
from nabla.layout import TileLayout
from nabla.masks import nabla_block_mask, sta_block_mask

__version__ = version("nabla-wan")  # the installed distribution's, so one number lives in pyproject.toml

__all__ = [
    "AttentionResult",
    "SparsityConfig",
    "TileLayout",
    "__version__",
    "attend",
    "dense_attention",
    "load_config",
    "nabla_block_mask",
    "sparse_attention",
    "sta_block_mask",
]
