"""Compiled kernels kept on disk between processes, so that a second run starts faster. torch's own caches (Inductor's
FX graphs and autotuning) are on by default; FlashAttention-4's JIT cache is opt-in, by an environment variable that
it reads once, when it is imported."""

from __future__ import annotations

import os

#: FlashAttention-4's switch for its on-disk JIT cache (a folder under the temporary directory, or
#: FLASH_ATTENTION_CUTE_DSL_CACHE_DIR); a user's own setting, "0" included, is kept
FA4_CACHE = "FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED"


def keep_compiled_kernels() -> None:
    """Turn FlashAttention-4's on-disk cache on for this process, unless the user set it; before it is imported."""
    os.environ.setdefault(FA4_CACHE, "1")
