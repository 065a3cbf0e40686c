"""Route a diffusers transformer's self-attention through NABLA, at load time, reversibly.

No model code is forked; hooks and an attention processor (processor.py) do the work, and they reach the model only
through its family (family.py; Wan's: wan/models/wan.py):
- a forward pre-hook on the transformer reads the latent shape (-> TileLayout) and the timestep (-> denoising step
  index) into the shared state (state.py);
- each self-attention module (Wan: every block's attn1) gets the NABLA processor; cross-attention is left alone;
- the rotary module's forward gives the rotary tables in tile order on sparse steps, once a forward.
Every other op of the model runs on the raster-order tokens, unpadded, exactly as in stock diffusers, and dense
steps are the stock computation (the rotary embedding without its stack: the same values, bit for bit, on the CPU;
on CUDA the q, k kernels, the same arithmetic).
Only for sequence parallelism over a sequence that the degree does not divide (`pad_dense`), a pre-hook on the
first block and the wrapped rotary forward put the whole token stream in padded tile order, and a post-hook on the
output projection undoes it, so that the stream splits evenly.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from nabla import SparsityConfig
from wan.attention.family import AttentionFamily
from wan.attention.processor import NablaWanAttnProcessor, invertible, no_custom_op_check
from wan.attention.state import NablaState
from wan.models.families import family_of


@dataclasses.dataclass
class NablaPatch:
    """Handle to a patched transformer: its shared state, and what `unpatch` must restore.

    `experts` lists the handles of every patched transformer of the pipeline, in the pipeline's order (`transformer`,
    then Wan2.2's `transformer_2`), this one included; their states share one step count and one record of the run.
    """

    transformer: torch.nn.Module
    family: AttentionFamily
    state: NablaState
    hooks: list[Any]
    processors: list[Any]
    experts: list[NablaPatch] = dataclasses.field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        self.experts.append(self)

    @property
    def backend(self) -> str | None:
        """The kernel of the sparse calls (wan.attention.state.NablaState.backend) of whichever expert ran them, or None."""
        return next((h.state.backend for h in self.experts if h.state.backend is not None), None)

    def set_config(self, config: SparsityConfig) -> None:
        """Run the next forwards under `config` (a trainer's sparsity schedule, a benchmark's variants); the records
        are kept. The patch was made for a sparse config or with `always`/`pad_dense`, so mode full runs dense."""
        self.state.config, self.state.backend = config, None


def _arg(args: tuple, kwargs: dict, index: int, name: str) -> Any:
    return args[index] if len(args) > index else kwargs[name]


def _with_arg(args: tuple, kwargs: dict, index: int, name: str, value: Any) -> tuple[tuple, dict]:
    if len(args) > index:
        return args[:index] + (value,) + args[index + 1 :], kwargs
    return args, {**kwargs, name: value}


def patch_transformer(
    transformer: torch.nn.Module,
    config: SparsityConfig,
    *,
    pad_dense: bool = False,
    always: bool = False,
    expert_of: NablaPatch | None = None,
    family: AttentionFamily | None = None,
) -> NablaPatch | None:
    """Patch `transformer` in place for `config`; returns the handle, or None for mode "full" (untouched). The
    model is reached through `family` (default: the registered family that recognises it, wan.models.families).

    With `expert_of`, `transformer` is another expert of that handle's pipeline (Wan2.2's low-noise transformer_2):
    its state shares the handle's step count and records, and the new handle joins `expert_of.experts`. With
    `pad_dense`, mode "full" is patched too: tokens still go to tile order with padding and attention stays dense;
    sequence parallelism uses it to split sequences that are not a multiple of the degree. With `always`, mode "full" is patched in raster order (the stock computation, bit for
    bit), so that the state counts the attention calls (how many blocks a step cache let run).
    """
    if getattr(transformer, "_nabla_patch", None) is not None:
        raise ValueError("patch_transformer: this transformer is already patched; unpatch it first")
    if transformer._parallel_config is not None:
        # rope.forward must be wrapped before context parallelism wraps it (tile, then split)
        raise ValueError("patch_transformer: patch before transformer.enable_parallelism(), not after")
    if not (config.is_sparse or pad_dense or always):
        return None
    shared = {} if expert_of is None else {"clock": expert_of.state.clock, "records": expert_of.state.records,
                                           "expert": len(expert_of.experts)}
    family = family or family_of(transformer, "patch_transformer")
    if pad_dense and not family.pads_stream:
        raise ValueError(f"patch_transformer: pad_dense (sequence parallelism) is for Wan; {family.name} runs on one GPU")
    attentions = family.self_attention(transformer)
    state = NablaState(config, pad_dense=pad_dense, layers=len(attentions), **shared)
    hooks = _register_hooks(transformer, family, state)
    _tile_rotary_tables(family, family.rotary(transformer), state)
    processors = [attn.processor for attn in attentions]
    for layer, attn in enumerate(attentions):
        attn.set_processor(NablaWanAttnProcessor(state, layer, invertible(*family.norms(attn)), family))
    handle = NablaPatch(transformer, family, state, hooks, processors,
                        expert_of.experts if expert_of is not None else [])
    transformer._nabla_patch = handle
    return handle


def _register_hooks(transformer: torch.nn.Module, family: AttentionFamily, state: NablaState) -> list[Any]:
    """The hooks that feed `state` each forward (grid, step), count the passes, and under `pad_dense` tile the
    whole stream after the patch embedding and untile it after proj_out."""
    patch_size = family.patch_size(transformer)
    first_block, proj_out = family.stream_ends(transformer)

    def on_transformer(module, args, kwargs):
        latents, timestep = family.forward_inputs(args, kwargs)
        state.start_forward(latents, patch_size, timestep, parallel=module._parallel_config is not None)
        state.forward_context = no_custom_op_check()
        state.forward_context.__enter__()
        return family.without_own_sparsity(args, kwargs)

    def after_transformer(module, args, output):
        state.key_rotary = None
        context, state.forward_context = state.forward_context, None
        if context is not None:
            context.__exit__(None, None, None)

    @torch.compiler.disable  # a plain gather: keep it out of compiled blocks (no graph, no guards)
    def on_first_block(module, args, kwargs):
        state.records.start_pass(state.step)  # runs even when a step cache then skips the block's forward
        if not state.pad_dense:
            return None
        hidden = _arg(args, kwargs, 0, "hidden_states")
        tiled = state.layout.tile(hidden, dim=1)
        if not hidden.requires_grad:
            # The transformer's forward keeps its raster-ordered tensor alive until the first block
            # returns; pointing it at the tiled storage frees the raster copy now (one activation of the stream).
            hidden.set_(tiled)
        return _with_arg(args, kwargs, 0, "hidden_states", tiled)

    def on_proj_out(module, args, output):
        return state.layout.untile(output, dim=1) if state.pad_dense else output

    return [
        transformer.register_forward_pre_hook(on_transformer, with_kwargs=True),
        transformer.register_forward_hook(after_transformer, always_call=True),
        first_block.register_forward_pre_hook(on_first_block, with_kwargs=True),
        proj_out.register_forward_hook(on_proj_out),
    ]


def _tile_rotary_tables(family: AttentionFamily, module: torch.nn.Module, state: NablaState) -> None:
    # The rotary tables are tiled inside rope.forward itself (an instance attribute shadowing the class method), not
    # in a forward hook: context parallelism later wraps this forward and splits its output, which must already be
    # in tile order by then (pad_dense). On sparse steps of a raster stream they go to tile order for the processor,
    # once a forward, not in every block.
    rope_forward = module.forward

    def tiled_rope_forward(*args, **kwargs):
        rope = rope_forward(*args, **kwargs)
        if not (state.pad_dense or state.tile_indices is not None):
            return rope
        rope = family.tile_rotary(state.layout, rope)
        if state.tile_indices is not None and not torch.is_grad_enabled():  # inference: k rotates with its own copy
            state.key_rotary = torch.utils._pytree.tree_map(torch.clone, rope)
        return rope

    module.forward = tiled_rope_forward


def unpatch(transformer: torch.nn.Module) -> None:
    """Undo `patch_transformer`: remove the hooks and restore the original attention processors."""
    handle = getattr(transformer, "_nabla_patch", None)
    if handle is None:
        return
    for hook in handle.hooks:
        hook.remove()
    del handle.family.rotary(transformer).forward
    for attn, processor in zip(handle.family.self_attention(transformer), handle.processors):
        attn.set_processor(processor)
    handle.experts[:] = [h for h in handle.experts if h is not handle]  # by identity: == compares the fields
    transformer._nabla_patch = None
