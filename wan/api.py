"""The library entry point: NABLA on a diffusers WanPipeline (or its transformer) that the user built, and back.

    pipe = WanPipeline.from_pretrained(...)          # the user's own scheduler, offloading, dtype
    enable_nabla(pipe, "nabla-0.7")                  # a shipped config's name, a YAML path or a SparsityConfig
    ...
    disable_nabla(pipe)                              # the stock model again
"""

from __future__ import annotations

import os
from typing import Any

import torch
from diffusers import WanTransformer3DModel

from nabla.backend import resolve_backend
from nabla.config import SparsityConfig, read_yaml
from wan.patch import NablaPatch, patch_transformer, unpatch
from wan.settings import find_config


def _transformer(pipe_or_transformer: Any, caller: str) -> WanTransformer3DModel:
    if isinstance(pipe_or_transformer, WanTransformer3DModel):
        return pipe_or_transformer
    transformer = getattr(pipe_or_transformer, "transformer", None)
    if isinstance(transformer, WanTransformer3DModel):
        return transformer
    raise TypeError(f"{caller}: {type(pipe_or_transformer).__name__} is not allowed; pass a diffusers WanPipeline "
                    "(with a WanTransformer3DModel) or a WanTransformer3DModel")


def _config(config: SparsityConfig | str | os.PathLike) -> SparsityConfig:
    if isinstance(config, SparsityConfig):
        return config
    if isinstance(config, (str, os.PathLike)):
        # Only `sparsity:` matters here; sections such as generate.py's `generation:` belong to the caller.
        return SparsityConfig.from_dict(read_yaml(find_config(config)).get("sparsity") or {})
    raise TypeError(f"enable_nabla: config {config!r} is not allowed; pass a SparsityConfig, a YAML path or a shipped "
                    "config's name")


def _device(pipe_or_transformer: Any, transformer: WanTransformer3DModel) -> torch.device:
    # A pipeline with model or sequential CPU offload keeps the transformer on the CPU between calls; it runs
    # on the pipeline's execution device.
    return torch.device(getattr(pipe_or_transformer, "_execution_device", None) or transformer.device)


def _on_cuda(pipe_or_transformer: Any, transformer: WanTransformer3DModel) -> bool:
    return _device(pipe_or_transformer, transformer).type == "cuda"


#: inductor options of the compiled blocks. Without buffer reuse: inductor keeps a dead buffer to reuse its
#: storage for a later one of the same size, and across the attention op (an opaque call that allocates its
#: own q, k, v in tile order, mask and output) that held two activations for nothing: 1.7 GiB at 14B 720p.
BLOCK_COMPILE_OPTIONS = {"allow_buffer_reuse": False}


def enable_nabla(
    pipe_or_transformer: Any,
    config: SparsityConfig | str | os.PathLike,
    *,
    compile: bool | None = None,
    pad_dense: bool = False,
    always: bool = False,
) -> NablaPatch | None:
    """Patch the pipeline's (or the transformer's) self-attention for `config`.

    `config` is a SparsityConfig, or a YAML path or a shipped config's name (`"nabla-0.7"`, wan.settings.find_config)
    whose `sparsity:` section is read (other top-level sections are ignored here). `compile=None` compiles the transformer's repeated blocks
    (`transformer.compile_repeated_blocks(dynamic=False, options=BLOCK_COMPILE_OPTIONS)`) when the transformer runs on CUDA; True forces it,
    False never. A `backend: flash` that cannot run on that device is a one-line ValueError.
    Returns the handle (wan.patch.NablaPatch), or None for mode full: nothing is patched then, but the
    blocks are still compiled when asked. `pad_dense` (sequence parallelism) and `always` (count the
    attention calls) patch mode full too, see `wan.patch.patch_transformer`. Raises ValueError if the transformer is already patched.
    """
    transformer = _transformer(pipe_or_transformer, "enable_nabla")
    config = _config(config)
    if compile is not None and not isinstance(compile, bool):
        raise TypeError(f"enable_nabla: compile={compile!r} is not allowed; pass True, False or None")
    on_cuda = _on_cuda(pipe_or_transformer, transformer)
    if config.is_sparse:  # a backend that cannot run here fails now, in one line, not at the first step
        resolve_backend(config.backend, _device(pipe_or_transformer, transformer) if on_cuda else "cpu")
    handle = patch_transformer(transformer, config, pad_dense=pad_dense, always=always)
    if compile or (compile is None and on_cuda):
        # Static shapes: dense steps run unpadded in raster order, sparse ones in tile order, and a shape
        # change must give a second static graph, not one graph with dynamic shapes (slower kernels).
        transformer.compile_repeated_blocks(dynamic=False, options=BLOCK_COMPILE_OPTIONS)
        transformer._nabla_compiled = True
    return handle


def disable_nabla(pipe_or_transformer: Any) -> None:
    """Undo `enable_nabla`: unpatch the attention, and drop the compiled blocks if enable_nabla compiled them."""
    transformer = _transformer(pipe_or_transformer, "disable_nabla")
    unpatch(transformer)
    if getattr(transformer, "_nabla_compiled", False):
        for module in transformer.modules():
            if module.__class__.__name__ in transformer._repeated_blocks:
                module._compiled_call_impl = None  # what nn.Module.compile set
        transformer._nabla_compiled = False
