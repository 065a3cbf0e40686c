"""The library entry point: NABLA on a diffusers WanPipeline or Kandinsky 5 pipeline (or its transformer) that the user
built, and back.

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
from wan.attention.patch import NablaPatch, patch_transformer, unpatch
from wan.defaults import find_config
from wan.models.experts import experts, low_noise_config
from wan.models.families import family_of


def trained_configs(transformers: list[Any], caller: str) -> list[SparsityConfig]:
    """Each transformer's own trained sparsity (its family's `default_config`: a Kandinsky 5 checkpoint of
    `attention_type: nabla`); a one-line ValueError where one has none (NABLA is training-free there)."""
    configs = [family_of(t, caller).default_config(t) for t in transformers]
    if any(c is None for c in configs):
        raise ValueError(f"{caller}: this {type(transformers[0]).__name__} was not trained with NABLA, so it has no "
                         "sparsity of its own; pass a config (a shipped config's name such as 'nabla-0.7', a YAML "
                         "path or a SparsityConfig)")
    return configs


def _configs(
    config: SparsityConfig | str | os.PathLike, config_2: SparsityConfig | None, count: int
) -> list[SparsityConfig]:
    """The config of each expert: `config`, and for Wan2.2's low-noise expert `config_2`, else the YAML's
    `sparsity_2:` (merged over `sparsity:`), else `config` too."""
    if isinstance(config, (str, os.PathLike)):
        # Only `sparsity:` and `sparsity_2:` matter here; sections such as generate.py's `generation:` belong to the caller.
        data = read_yaml(find_config(config))
        config = SparsityConfig.from_dict(data.get("sparsity") or {})
        config_2 = config_2 or low_noise_config(config, data.get("sparsity_2"))
    elif not isinstance(config, SparsityConfig):
        raise TypeError(f"enable_nabla: config {config!r} is not allowed; pass a SparsityConfig, a YAML path or a "
                        "shipped config's name")
    if config_2 is not None and not isinstance(config_2, SparsityConfig):
        raise TypeError(f"enable_nabla: config_2 {config_2!r} is not allowed; pass a SparsityConfig or None")
    if config_2 is not None and count == 1:
        raise ValueError("enable_nabla: a low-noise expert's config (config_2, or sparsity_2: in the YAML) is not "
                         "allowed here: this has one transformer, no transformer_2 (Wan2.2 A14B has both)")
    return [config, config_2 or config][:count]


def _device(pipe_or_transformer: Any, transformer: WanTransformer3DModel) -> torch.device:
    # A pipeline with model or sequential CPU offload keeps the transformer on the CPU between calls; it runs
    # on the pipeline's execution device.
    return torch.device(getattr(pipe_or_transformer, "_execution_device", None) or transformer.device)


#: inductor options of the compiled blocks. Without buffer reuse: inductor keeps a dead buffer to reuse its
#: storage for a later one of the same size, and across the attention op (an opaque call that allocates its
#: own q, k, v in tile order, mask and output) that held two activations for nothing (docs/GPU-FACTS.md).
BLOCK_COMPILE_OPTIONS = {"allow_buffer_reuse": False}

#: ... and of blocks that train. Inductor's mix-order reduction (torch 2.10 on, CUDA) computes the gradient of Wan's
#: `scale_shift_table` wrong: garbage where the blocks compile whole (pytorch/pytorch#193061, found on Wan2.1 14B), a
#: shape error where the attention breaks the graph ("invalid gradient at index 16 - got [1536] but expected shape
#: compatible with [1, 1, 1536]", bench_train's full fine-tuning with NABLA on torch 2.11).
TRAINING_COMPILE_OPTIONS = {**BLOCK_COMPILE_OPTIONS, "triton.mix_order_reduction": False}


def compile_blocks(transformer: WanTransformer3DModel) -> None:
    """Compile the transformer's repeated blocks: with TRAINING_COMPILE_OPTIONS where it is in training mode (`.train()`,
    a backward will run), else BLOCK_COMPILE_OPTIONS (inference's); disable_nabla drops them."""
    # Static shapes: dense steps run unpadded in raster order, sparse ones in tile order, and a shape change must
    # give a second static graph, not one graph with dynamic shapes (slower kernels).
    options = TRAINING_COMPILE_OPTIONS if transformer.training else BLOCK_COMPILE_OPTIONS
    transformer.compile_repeated_blocks(dynamic=False, options=options)
    transformer._nabla_compiled = True


def enable_nabla(
    pipe_or_transformer: Any,
    config: SparsityConfig | str | os.PathLike | None = None,
    *,
    config_2: SparsityConfig | None = None,
    compile: bool | None = None,
    pad_dense: bool = False,
    always: bool = False,
) -> NablaPatch | None:
    """Patch the self-attention of the pipeline's transformers (or of the transformer given) for `config`.

    `config` is a SparsityConfig, or a YAML path or a shipped config's name (`"nabla-0.7"`, wan.defaults.find_config)
    whose `sparsity:` section is read (and `sparsity_2:`, see below; other top-level sections are ignored here).
    None: the sparsity the model was trained with, for a checkpoint trained with NABLA (Kandinsky 5 of
    `attention_type: nabla`: its P, STA window and 64-token blocks); other models need a config.
    A Wan2.2 A14B pipeline's two experts are both patched, compiled and uncompiled alike: `transformer` takes
    `config`, the low-noise `transformer_2` takes `config_2`, else the YAML's `sparsity_2:` merged over `sparsity:`,
    else `config`. Their states share one step count and one record of the run; where one expert is sparse, every
    expert is patched (mode full ones in raster order, the stock computation) so that the count sees every step.
    `compile=None` compiles the transformers' repeated blocks (`compile_blocks`: training mode, `.train()` before this
    call, gets the options that give right gradients) when they run on CUDA; True forces it, False never. A
    `backend: flash` that cannot run on that device is a one-line ValueError.
    Returns the first transformer's handle (wan.attention.patch.NablaPatch; `handle.experts` lists every expert's, this one
    first, and `handle.state.mean_density()` is over the whole run), or None where every config is mode full:
    nothing is patched then, but the blocks are still compiled when asked. `pad_dense` (sequence parallelism) and
    `always` (count the attention calls) patch mode full too, see `wan.attention.patch.patch_transformer`; so does a
    model trained with NABLA (its own sparse path dropped: mode full is full attention there too). Raises ValueError
    if a transformer is already patched; a pipeline that is not a Wan one of WanTransformer3DModels is a TypeError.
    """
    transformers = experts(pipe_or_transformer, "enable_nabla")
    if config is None:
        configs = trained_configs(transformers, "enable_nabla")
    else:
        configs = _configs(config, config_2, len(transformers))
    if compile is not None and not isinstance(compile, bool):
        raise TypeError(f"enable_nabla: compile={compile!r} is not allowed; pass True, False or None")
    device = _device(pipe_or_transformer, transformers[0])
    for sparsity in configs:  # a backend that cannot run here fails now, in one line, not at the first step
        if sparsity.is_sparse:
            resolve_backend(sparsity.backend, device if device.type == "cuda" else "cpu")
    for transformer in transformers:  # before any is patched: all or none
        if getattr(transformer, "_nabla_patch", None) is not None:
            raise ValueError("enable_nabla: this transformer is already patched; call disable_nabla first")
    # a model whose own sparse attention runs unless the patch drops it (Kandinsky 5 of attention_type nabla): mode full
    # is patched too there, so that it is full attention
    own = any(family_of(t, "enable_nabla").default_config(t) is not None for t in transformers)
    always = always or own or any(c.is_sparse for c in configs)
    handle = None
    for transformer, sparsity in zip(transformers, configs):
        patched = patch_transformer(transformer, sparsity, pad_dense=pad_dense, always=always, expert_of=handle)
        handle = handle or patched
    if compile or (compile is None and device.type == "cuda"):
        for transformer in transformers:
            compile_blocks(transformer)
    return handle


def disable_nabla(pipe_or_transformer: Any) -> None:
    """Undo `enable_nabla` on every transformer of the pipeline: unpatch the attention, and drop the compiled blocks
    where enable_nabla compiled them."""
    for transformer in experts(pipe_or_transformer, "disable_nabla"):
        unpatch(transformer)
        if getattr(transformer, "_nabla_compiled", False):
            for module in transformer.modules():
                if module.__class__.__name__ in transformer._repeated_blocks:
                    module._compiled_call_impl = None  # what nn.Module.compile set
            transformer._nabla_compiled = False
