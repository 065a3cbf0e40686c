"""What a local diffusers pipeline folder says about itself (its model_index.json, a component's config.json), read
before anything loads: generate.py's checks use it without importing diffusers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def local_config(model: str, part: str = "model_index.json") -> dict[str, Any] | None:
    """The JSON file `part` of the local pipeline folder `model`, parsed; None for a hub id or a folder without it."""
    path = Path(model).expanduser() / part
    if not path.is_file():
        return None
    return json.loads(path.read_text())


def local_ti2v(model: str) -> bool | None:
    """Whether the local pipeline folder `model` is Wan2.2 TI2V: its model_index.json sets `expand_timesteps` (the
    per-token timesteps of TI2V-5B); None for a hub id (known once loaded: `pipe.config.expand_timesteps`)."""
    index = local_config(model)
    return None if index is None else bool(index.get("expand_timesteps"))
