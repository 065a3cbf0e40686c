"""Wan2.1 text-to-video integration of NABLA sparse attention.

`from wan import enable_nabla, disable_nabla` is the library API (wan/api.py). It is loaded on first use, so
that modules such as wan.generate.settings and wan.io.files, which generate.py checks its input with, import no diffusers.
"""

from __future__ import annotations

import importlib
from importlib.metadata import version
from typing import Any

__version__ = version("nabla-wan")  # the installed distribution's, so one number lives in pyproject.toml
_API = {"enable_nabla": "wan.api", "disable_nabla": "wan.api", "NablaPatch": "wan.attention.patch"}
__all__ = ["NablaPatch", "__version__", "disable_nabla", "enable_nabla"]


def __getattr__(name: str) -> Any:
    if name not in _API:
        raise AttributeError(f"module 'wan' has no attribute {name!r}")
    return getattr(importlib.import_module(_API[name]), name)
