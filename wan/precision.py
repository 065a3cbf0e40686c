"""Moved to `wan.speedups.precision`; this path re-exports it for one release (0.2) and then goes."""

from wan.speedups.precision import (  # noqa: F401
    FP8_CAPABILITY,
    PRECISIONS,
    apply_precision,
    check_precision,
    is_block_linear,
)
