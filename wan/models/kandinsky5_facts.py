"""What a Kandinsky 5 pipeline is from its files alone (no diffusers import: generate's checks read these before any
model loads): its pipeline classes, the video its pipelines make by default, and the sparsity a checkpoint of
`attention_type: nabla` was trained with."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from nabla.config import SparsityConfig

T2V_PIPELINE, I2V_PIPELINE = "Kandinsky5T2VPipeline", "Kandinsky5I2VPipeline"
PIPELINES = (T2V_PIPELINE, I2V_PIPELINE)
#: Kandinsky5T2VPipeline's and Kandinsky5I2VPipeline's own defaults (512x768, 121 frames: 5 s at the models' 24 fps)
GENERATION_DEFAULTS = {"height": 512, "width": 768, "frames": 121, "fps": 24}
#: the authors' NABLA blocks: 64 tokens, one 1 x 8 x 8 tile (nablaT_v2's BLOCK_SIZE, fractal_flatten's tile)
TRAINED_BLOCK_SIZE = 64


def trained_config(config: Mapping[str, Any]) -> SparsityConfig | None:
    """The sparsity a transformer of this config was trained with (`attention_type: nabla`: its P and STA window,
    64-token blocks, no dense steps, no dense fallback: the authors' mask exactly), or None (flash-attention
    checkpoints: NABLA is training-free there, as on Wan, and needs a config of the user's)."""
    if config.get("attention_type") != "nabla":
        return None
    window = (config["attention_wT"], config["attention_wH"], config["attention_wW"])
    # diffusers ORs the STA mask whatever attention_add_sta says; the authors' code reads it: we follow the authors
    mode = "nabla" if config.get("attention_add_sta") is False else "nabla+sta"
    return SparsityConfig(mode=mode, threshold=float(config["attention_P"]), sta_window=window,
                          block_size=TRAINED_BLOCK_SIZE, dense_steps=0, dense_above=1.0)


#: the visual blocks: the ModuleList whose self-attention is NABLA's and whose Linear layers a LoRA adapts
VISUAL_BLOCKS = "visual_transformer_blocks"
#: the Linear layers a LoRA adapts in each visual block: the self- and cross-attention projections and the feed-forward
#: (the modulations stay: diffusers keeps them in float32)
LORA_TARGETS = ("to_query", "to_key", "to_value", "self_attention.out_layer", "cross_attention.out_layer",
                "feed_forward.in_layer", "feed_forward.out_layer")
