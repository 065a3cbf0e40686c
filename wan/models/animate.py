"""Wan2.2 Animate (WanAnimatePipeline's WanAnimateTransformer3DModel) as the attention patch sees it: Wan's blocks,
whose self-attention is Wan's, on a stream whose first latent frame is the character image's and whose other frames
carry the pose video's embedding; after every `inject_face_latents_blocks`-th block a face adapter cross-attends
each frame's tokens to that frame's motion features.

Every block's `attn1` is replaced, as on Wan. The face adapter and `attn2` (text and CLIP image tokens) stay stock:
the stream between blocks stays in raster order, as the face adapter's per-frame split needs.
"""

from __future__ import annotations

from typing import Any

from diffusers import WanAnimateTransformer3DModel

from wan.models.wan import WanFamily


class AnimateFamily(WanFamily):
    name = "Wan2.2 Animate"
    #: diffusers gives this transformer no context-parallel plan: there is no sequence split to pad for
    pads_stream = False

    @staticmethod
    def recognises(transformer: Any) -> bool:
        return isinstance(transformer, WanAnimateTransformer3DModel)


ANIMATE = AnimateFamily()
