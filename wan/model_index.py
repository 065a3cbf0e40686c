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
