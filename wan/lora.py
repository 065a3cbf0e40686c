"""Moved to `wan.models.lora`; this path re-exports it for one release (0.2) and then goes."""

from wan.models.lora import (  # noqa: F401
    ADAPTER,
    WEIGHT_NAME,
    add_lora,
    check_lora_path,
    load_lora,
    save_lora,
    transformer_linear_names,
)
