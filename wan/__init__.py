"""Wan2.1 text-to-video integration of NABLA sparse attention."""

from wan.api import disable_nabla, enable_nabla
from wan.patch import NablaPatch

__all__ = ["NablaPatch", "disable_nabla", "enable_nabla"]
