"""The model families the attention patch knows (wan/attention/family.py's interface), and which one a transformer
is. A new family is one module beside wan.py (kandinsky5.py), added to FAMILIES."""

from __future__ import annotations

from typing import Any

from wan.models.animate import ANIMATE
from wan.models.kandinsky5 import KANDINSKY5
from wan.models.vace import VACE
from wan.models.wan import WAN

#: every family, asked in order
FAMILIES = (WAN, VACE, ANIMATE, KANDINSKY5)
SUPPORTED = ("a WanPipeline, WanImageToVideoPipeline or WanVideoToVideoPipeline (their transformers are "
             "WanTransformer3DModel, Wan2.2's transformer_2 included), a WanVACEPipeline, a WanAnimatePipeline, "
             "a Kandinsky5T2VPipeline or Kandinsky5I2VPipeline, or one of their transformers")


def find_family(transformer: Any) -> Any | None:
    """The family that recognises `transformer`, or None."""
    return next((family for family in FAMILIES if family.recognises(transformer)), None)


def family_of(transformer: Any, caller: str) -> Any:
    """The family of `transformer`; anything else is a one-line TypeError naming what is supported."""
    family = find_family(transformer)
    if family is None:
        raise TypeError(f"{caller}: {type(transformer).__name__} is not supported; pass {SUPPORTED}")
    return family
