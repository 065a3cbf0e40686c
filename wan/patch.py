"""Route a diffusers WanTransformer3DModel's self-attention through NABLA, at load time, reversibly.

No model code is forked; hooks and an attention processor do the work:
- a forward pre-hook on the transformer reads the latent shape (-> TileLayout) and the timestep
  (-> denoising step index);
- each block's attn1 (self-attention; attn2, the cross-attention to text, is left alone) gets a
  processor that computes q, k, v like diffusers' WanAttnProcessor, but writes them in tile order
  (padded to whole tiles): on CUDA q and k by Triton kernels that read the projected raster rows,
  normalise, rotate, write tile order and take NABLA's block means in one pass (wan/tiled_qk.py),
  elsewhere by gathering the rows before the norm and the rotary embedding; it runs NABLA/STA
  block-sparse attention and puts the output back in raster order. Attention is one custom op inside the compiled block
  (`nabla::wan_self_attention`), not a graph break, so the block's activations are freed as in the
  stock compiled block. Every other op of the model runs on the raster-order tokens, unpadded,
  exactly as in stock diffusers, and dense steps are the stock computation (the rotary embedding without its
  stack: the same values, bit for bit, on the CPU; on CUDA the q, k kernels, the same arithmetic).
- Only for sequence parallelism over a sequence that the degree does not divide (`pad_dense`), a
  pre-hook on blocks[0] and a wrapper of rope.forward put the whole token stream in padded tile
  order, and a post-hook on proj_out undoes it, so that the stream splits evenly.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import weakref
from collections.abc import Callable
from typing import Any, NamedTuple, Optional

import torch
import torch.nn.functional as F
from diffusers.models.attention_dispatch import TemplatedUlyssesAttention
from diffusers.models.transformers.transformer_wan import WanTransformer3DModel, _get_qkv_projections

from nabla import SparsityConfig, TileLayout, dense_attention
from nabla.attention import attend_block_mask, kernel_density, make_block_mask, too_dense
from nabla.backend import dense_above, resolve_backend
from nabla.layout import gather_tiles
from nabla.masks import pool_blocks

try:  # the CUDA kernels for q and k; CPU-only installs may lack Triton
    from wan.tiled_qk import fused_applies, tiled_qk
except ImportError:
    fused_applies = tiled_qk = None

#: steps for which a layer that fell back to dense attention stays dense without building a mask; doubled at
#: each further fallback in a row (a mask too dense at 4 checks in a row is checked again 60 steps later)
FALLBACK_STEPS = 4


@dataclasses.dataclass
class NablaState:
    """What the hooks share during one transformer forward, and what a run records."""

    config: SparsityConfig
    #: the whole token stream runs in padded tile order, dense steps too (sequence parallelism splits the
    #: padded tiles evenly); otherwise it stays in raster order and only attention sees tile order
    pad_dense: bool = False
    layout: TileLayout | None = None
    step: int = -1
    last_timestep: float | None = None
    #: (step, layer, density per head [H] on the device) for every sparse attention call
    densities: list[tuple[int, int, torch.Tensor]] = dataclasses.field(default_factory=list)
    #: per sparse call that ran the sparse kernel, the fraction of blocks it computed per head [H]: the mask
    #: density, or more where kernel query blocks merge mask rows (config.query_block_size)
    kernel_densities: list[torch.Tensor] = dataclasses.field(default_factory=list)
    #: (step, layer) of sparse calls run dense instead: their mask was too dense for the sparse kernel to win,
    #: or the layer's was within the last FALLBACK_STEPS steps (then no mask is built)
    dense_fallbacks: list[tuple[int, int]] = dataclasses.field(default_factory=list)
    #: layer -> first step at which it builds a mask again after falling back to dense
    dense_until: dict[int, int] = dataclasses.field(default_factory=dict)
    #: layer -> its fallbacks to dense in a row (each doubles the steps it then skips its mask)
    dense_streak: dict[int, int] = dataclasses.field(default_factory=dict)
    #: the kernel that runs the sparse calls (nabla.backend.resolve_backend), set on the first one
    backend: str | None = None
    #: optional wan.stats.StatsRecorder: times mask build and attention per call, keeps chosen masks
    recorder: Any = None
    #: [step, self-attention calls] per transformer pass that reached the blocks; fewer calls than layers
    #: mean the other blocks came from a step cache (wan/cache.py)
    passes: list[list[int]] = dataclasses.field(default_factory=list)
    #: where the processor tiles q, k, v itself (sparse steps, raster stream), the layout's index tensors on the
    #: device, else None
    tile_indices: TileIndices | None = None
    #: where the processor tiles q, k, v: the rotary tables in tile order, a copy for k (see the processor), set by
    #: the patched rope.forward and dropped after the forward
    key_rotary: tuple[torch.Tensor, torch.Tensor] | None = None
    #: the transformer's blocks (self-attention layers)
    layers: int = 0
    #: torch config patched for the duration of one transformer forward (`_no_custom_op_check`)
    forward_context: Any = None
    #: this state's key for the attention op (`wan_self_attention`), which reaches the state through it
    key: int = dataclasses.field(default_factory=lambda: next(_KEYS))

    def __post_init__(self) -> None:
        _STATES[self.key] = self

    def start_forward(
        self, latents: torch.Tensor, patch_size: tuple[int, int, int], timestep: torch.Tensor, parallel: bool = False
    ) -> None:
        """Read the forward's token grid and step; `parallel`: under context parallelism (attention gets the
        stream split by diffusers, so the processor does not tile)."""
        T, H, W = (n // p for n, p in zip(latents.shape[2:], patch_size))
        if self.layout is None or self.layout.shape != (T, H, W):
            self.layout = TileLayout(T, H, W)
        if timestep.ndim != 1:
            raise ValueError("NABLA patch: per-token timesteps (Wan2.2 TI2V) are not supported; use a Wan2.1 model")
        t = float(timestep[0])
        # Flow-matching timesteps fall within a run: equal -> same step (CFG passes), higher -> new run.
        if self.last_timestep is None or t > self.last_timestep:
            self.step = 0
        elif t < self.last_timestep:
            self.step += 1
        self.last_timestep = t
        # Sparse steps get q, k, v tiled inside the compiled block; dense steps keep them in raster order (the
        # compiled block then has one graph for each, compiled in the warm-up; generate.py warms up both), and so
        # do steps on which every layer skips its mask after falling back to dense (no tiling to undo).
        tiles = self.sparse_now and not (self.pad_dense or parallel) and not self.all_layers_dense_now()
        on = functools.partial(self.layout.on, latents.device)
        if tiles:
            gather = on("raster_index")
            self.tile_indices = TileIndices(gather, on("tile_index"), on("valid"),
                                            gather.clamp(max=self.layout.length - 1), gather.clone())
        else:
            self.tile_indices = None
        self.key_rotary = None

    def all_layers_dense_now(self) -> bool:
        """Whether every layer runs dense this step without building a mask (each fell back recently)."""
        return 0 < self.layers == len(self.dense_until) and all(self.step < until for until in self.dense_until.values())

    @property
    def sparse_now(self) -> bool:
        return self.config.is_sparse and self.step >= self.config.dense_steps

    def reset(self) -> None:
        self.step, self.last_timestep = -1, None
        self.densities.clear()
        self.kernel_densities.clear()
        self.dense_fallbacks.clear()
        self.dense_until.clear()
        self.dense_streak.clear()
        self.passes.clear()
        if self.recorder is not None:
            self.recorder.reset()

    def mean_density(self) -> float | None:
        return _mean([d for _, _, d in self.densities])

    def mean_kernel_density(self) -> float | None:
        return _mean(self.kernel_densities)

    # Kept out of torch.compile'd blocks (compile_repeated_blocks): the mask builder and flex_attention
    # are compiled on their own, and the per-layer bookkeeping here would make dynamo recompile per layer.
    @torch.compiler.disable
    def attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        tiled: bool = False,
        means: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Self-attention of q, k, v [B, L, H, D] in stream order (raster, or padded tile order with
        `pad_dense`), or in padded tile order with `tiled`; the output [B, L, H, D] in the order of the input.
        `means`: NABLA's block means of q and k [B, H, nb, D] where the caller took them (`block_means`).
        The blocks call it in order: the calls of this pass so far give the layer."""
        layer = self.passes[-1][1]
        self.passes[-1][1] += 1
        if not self.sparse_now:
            return self._dense(q, k, v, tiled)
        if self.step < self.dense_until.get(layer, -1):
            # This layer's mask was too dense to win a few steps ago: masks change slowly over the steps,
            # so skip building one (dense attention is a superset of any mask).
            self.dense_fallbacks.append((self.step, layer))
            return self._dense(q, k, v, tiled)
        layout = self.layout
        # [B, L, H, D] -> tile order [B, S, H, D] -> [B, H, S, D] views: flex_attention reads the strides as they are
        qkv = [x if self.pad_dense or tiled else layout.tile(x, dim=1) for x in (q, k, v)]
        dense = functools.partial(self._dense, q, k, v, tiled)
        out, ran_dense = self.attend_tiled(*(x.transpose(1, 2) for x in qkv), layer, dense, means)
        if ran_dense:  # the mask was too dense to win: dense attention ran, its output in the order of the input
            return out
        out = out.transpose(1, 2)
        return out if self.pad_dense or tiled else layout.untile(out, dim=1)

    def _dense(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tiled: bool = False) -> torch.Tensor:
        if self.pad_dense:  # padding keys must not be attended
            return dense_attention(*(x.transpose(1, 2) for x in (q, k, v)), self.layout).transpose(1, 2)
        if tiled:  # in raster order (exactly: a permutation), as stock diffusers computes it
            q, k, v = (self.layout.untile(x, dim=1) for x in (q, k, v))
        out = F.scaled_dot_product_attention(*(x.transpose(1, 2) for x in (q, k, v))).transpose(1, 2)
        return self.layout.tile(out, dim=1) if tiled else out

    def attend_tiled(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        layer: int,
        dense: Callable[[], torch.Tensor],
        means: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, bool]:
        """Block-sparse attention of tile-ordered q, k, v [B, H, S, D] -> ([B, H, S, D], False); where the mask is
        too dense to win, `dense()` runs instead, timed like a sparse call -> (its output, True)."""
        compiled = q.is_cuda
        if self.backend is None:
            self.backend = resolve_backend(self.config.backend, q.device, q.dtype) if compiled else "eager"
        # in two timed halves: mask build, then flex_attention on it
        timer = self.recorder.timer(q.device) if self.recorder is not None else None
        block_mask, keep = make_block_mask(q, k, self.layout, self.config, compiled=compiled, means=means)
        if timer is not None:
            timer.split()
        ran_dense = too_dense(block_mask, dense_above(self.config, self.backend))
        out = dense() if ran_dense else attend_block_mask(q, k, v, block_mask, compiled, self.backend)
        if timer is not None:
            timer.stop()
        density = keep.float().mean(dim=(0, 2, 3))
        self.densities.append((self.step, layer, density))
        if ran_dense:
            self.dense_fallbacks.append((self.step, layer))
            streak = self.dense_streak[layer] = self.dense_streak.get(layer, 0) + 1
            self.dense_until[layer] = self.step + FALLBACK_STEPS * 2 ** (streak - 1)
        else:
            self.dense_streak.pop(layer, None)
            self.kernel_densities.append(kernel_density(block_mask))
        if timer is not None:
            self.recorder.record(self.step, layer, density, keep, timer, ran_dense)
        return out, ran_dense


_KEYS = itertools.count()
_STATES: weakref.WeakValueDictionary[int, NablaState] = weakref.WeakValueDictionary()


# An opaque op inside the compiled block: inductor frees the block's activations as in the stock compiled block
# (a graph break instead keeps the block's normalised input alive while attention runs), and the per-call
# bookkeeping runs in Python, between the compiled kernels, without guards or recompiles.
@torch.library.custom_op("nabla::wan_self_attention", mutates_args=())
def wan_self_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    query_means: Optional[torch.Tensor],  # noqa: UP045 (torch.library reads the annotation at runtime)
    key_means: Optional[torch.Tensor],  # noqa: UP045
    state: int,
    tiled: bool,
) -> torch.Tensor:
    """`NablaState.attend` of the state keyed `state`: [B, L, H, D] like `query`, contiguous, in its order."""
    means = None if query_means is None or key_means is None else (query_means, key_means)
    return _STATES[state].attend(query, key, value, tiled, means).contiguous()


@wan_self_attention.register_fake
def _(query, key, value, query_means, key_means, state, tiled) -> torch.Tensor:
    return torch.empty_like(query, memory_format=torch.contiguous_format)


def _no_custom_op_check():
    # torch >= 2.12 checks the first call of each compiled graph for custom ops that alias their inputs, running
    # them under a dispatch mode in which eager flex_attention's vmap fails (the CPU path); the op never aliases.
    if hasattr(torch._functorch.config, "check_custom_op_aliasing"):
        return torch._functorch.config.patch(check_custom_op_aliasing=False)
    return contextlib.nullcontext()


def _mean(per_head: list[torch.Tensor]) -> float | None:
    return float(torch.stack([d.float().mean() for d in per_head]).mean()) if per_head else None


class TileIndices(NamedTuple):
    """A TileLayout's index tensors on the device, for the processor's gathers inside the compiled block."""

    gather: torch.Tensor  # raster_index: tile order from raster order (padding slots read a zero row appended)
    scatter: torch.Tensor  # tile_index: raster order from tile order
    valid: torch.Tensor  # the real tokens in tile order
    #: raster_index with padding slots reading the last real token: v needs no zero rows (padding keys are never
    #: attended, and the dense fallback drops them)
    gather_values: torch.Tensor
    gather_keys: torch.Tensor  # a copy of raster_index for k (see the processor)


def block_means(x: torch.Tensor, block_size: int, valid: torch.Tensor) -> torch.Tensor:
    """NABLA's block means [B, H, nb, D] (float32) of tile-ordered x [B, S, H, D]: `pool_blocks` on the heads-first
    view, so that in a compiled block they reduce in the graph that writes x."""
    return pool_blocks(x.transpose(1, 2), block_size, valid)[0]


def _apply_rotary_pairwise(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """diffusers' Wan rotary embedding without its stack, the same values: (x1 c - x2 s, x2 c + x1 s) as
    x c + swap(x) (-s, s), in float32 where cos is float32 (as from_pretrained loads the tables).

    Inductor writes the two halves of a stack to memory and stacks them in another kernel (two more passes over
    q and k); flip and broadcasts fuse into the kernel that writes q, k.
    """
    pairs = x.unflatten(-1, (-1, 2))
    cos = cos[..., 0::2].unsqueeze(-1)
    sin = sin[..., 1::2].unsqueeze(-1) * torch.tensor([-1.0, 1.0], dtype=sin.dtype, device=sin.device)
    return (pairs * cos + pairs.flip(-1) * sin).flatten(-2).type_as(x)


class NablaWanAttnProcessor:
    """Self-attention processor for WanAttention: diffusers' projections, NABLA attention.

    Under diffusers' Ulysses context parallelism (`enable_parallelism` sets `_parallel_config`),
    NABLA runs between diffusers' two all-to-alls, on the whole sequence and this rank's heads.
    """

    _parallel_config = None

    def __init__(self, state: NablaState) -> None:
        self.state = state

    def _attend(self, ctx, query, key, value, *args, **kwargs) -> torch.Tensor:
        """[B, S, H, D] in and out; the signature of a diffusers templated-attention `forward_op`."""
        return self.state.attend(query, key, value)

    @torch.compiler.disable  # collectives and NABLA's own compiled kernels stay outside compiled blocks
    def _ulysses(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        return TemplatedUlyssesAttention.apply(
            query, key, value, None, 0.0, False, None, False, False, self._attend, None, self._parallel_config
        )

    @staticmethod
    def _fused(attn: Any, query: torch.Tensor, rotary_emb: tuple[torch.Tensor, torch.Tensor] | None) -> bool:
        # the kernels have no backward
        return (fused_applies is not None and not query.requires_grad
                and all(fused_applies(query, norm, rotary_emb) for norm in (attn.norm_q, attn.norm_k)))

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        if encoder_hidden_states is not None or attention_mask is not None:
            raise ValueError("NablaWanAttnProcessor is for self-attention without a mask (attn1)")
        query, key, value = _get_qkv_projections(attn, hidden_states, None)
        tiles = self.state.tile_indices if self._parallel_config is None else None
        config, means = self.state.config, None
        with_means = tiles is not None and config.uses_nabla
        # On CUDA, q and k each by two Triton kernels that also take the block means (wan/tiled_qk.py); on the dense
        # steps of a sparse run too, in raster order (mode "full" stays diffusers' computation, bit for bit)
        if (self._parallel_config is None and (tiles is not None or config.is_sparse)
                and self._fused(attn, query, rotary_emb)):
            rows = tiles.gather if tiles is not None else torch.arange(query.shape[1], device=query.device)
            query, query_means = tiled_qk(query, attn.norm_q, rotary_emb, rows, attn.heads, config.block_size,
                                          with_means)
            key, key_means = tiled_qk(key, attn.norm_k, rotary_emb, rows, attn.heads, config.block_size, with_means)
            if tiles is not None:
                value = value.index_select(1, tiles.gather_values)
            value = value.unflatten(2, (attn.heads, -1))
            means = (query_means, key_means) if with_means else None
        else:
            if tiles is not None:
                # Tile order from here: q and k are gathered before the norm and the rotary embedding (per-token
                # ops; the patched rope.forward gave its tables in tile order), so that in a compiled block their
                # kernels read raster rows and write tile order. q, k and v read no input in common (k has its own
                # index and tables, v its own index): inductor fuses kernels that share an input, and one kernel
                # writing q, k and v in tile order holds all three projections and all three tiled copies at once
                # (+0.9 GiB at 14B 720p); apart, each projection is freed as its tiled copy is written.
                query, key = gather_tiles(query, tiles.gather, dim=1), gather_tiles(key, tiles.gather_keys, dim=1)
                value = value.index_select(1, tiles.gather_values)
            query, key = attn.norm_q(query), attn.norm_k(key)
            query, key, value = (x.unflatten(2, (attn.heads, -1)) for x in (query, key, value))
            if rotary_emb is not None:  # diffusers' arithmetic, without the stack that inductor writes out
                query = _apply_rotary_pairwise(query, *rotary_emb)
                key = _apply_rotary_pairwise(key, *(rotary_emb if tiles is None else self.state.key_rotary))
            if with_means:
                means = tuple(block_means(x, config.block_size, tiles.valid) for x in (query, key))
        if self._parallel_config is not None:
            cp = self._parallel_config.context_parallel_config
            if cp.ring_degree != 1 or cp.ulysses_anything:
                raise ValueError("NABLA runs under Ulysses context parallelism only (ring_degree 1, even split)")
            out = self._ulysses(query, key, value)
            return attn.to_out[1](attn.to_out[0](out.flatten(2, 3).type_as(query)))
        tiled = tiles is not None
        if torch.is_grad_enabled():  # the op has no backward: a graph break instead
            out = self.state.attend(query, key, value, tiled, means)
        else:
            out = wan_self_attention(query, key, value, *(means or (None, None)), self.state.key, tiled)
        if tiled:  # back to raster order (padding dropped) before the output projection, whose input it writes
            out = out.index_select(1, tiles.scatter)
        return attn.to_out[1](attn.to_out[0](out.flatten(2, 3).type_as(query)))


@dataclasses.dataclass
class NablaPatch:
    """Handle to a patched transformer: its shared state, and what `unpatch` must restore."""

    transformer: WanTransformer3DModel
    state: NablaState
    hooks: list[Any]
    processors: list[Any]


def _arg(args: tuple, kwargs: dict, index: int, name: str) -> Any:
    return args[index] if len(args) > index else kwargs[name]


def _with_arg(args: tuple, kwargs: dict, index: int, name: str, value: Any) -> tuple[tuple, dict]:
    if len(args) > index:
        return args[:index] + (value,) + args[index + 1 :], kwargs
    return args, {**kwargs, name: value}


def patch_transformer(
    transformer: WanTransformer3DModel, config: SparsityConfig, *, pad_dense: bool = False, always: bool = False
) -> NablaPatch | None:
    """Patch `transformer` in place for `config`; returns the handle, or None for mode "full" (untouched).

    With `pad_dense`, mode "full" is patched too: tokens still go to tile order with padding and
    attention stays dense; sequence parallelism uses it to split sequences that are not a multiple
    of the degree. With `always`, mode "full" is patched in raster order (the stock computation, bit for
    bit), so that the state counts the attention calls (how many blocks a step cache let run).
    """
    if getattr(transformer, "_nabla_patch", None) is not None:
        raise ValueError("patch_transformer: this transformer is already patched; unpatch it first")
    if transformer._parallel_config is not None:
        # rope.forward must be wrapped before context parallelism wraps it (tile, then split)
        raise ValueError("patch_transformer: patch before transformer.enable_parallelism(), not after")
    if not (config.is_sparse or pad_dense or always):
        return None
    state = NablaState(config, pad_dense=pad_dense, layers=len(transformer.blocks))
    patch_size = tuple(transformer.config.patch_size)

    def on_transformer(module, args, kwargs):
        state.start_forward(_arg(args, kwargs, 0, "hidden_states"), patch_size, _arg(args, kwargs, 1, "timestep"),
                            parallel=module._parallel_config is not None)
        state.forward_context = _no_custom_op_check()
        state.forward_context.__enter__()

    def after_transformer(module, args, output):
        state.key_rotary = None
        context, state.forward_context = state.forward_context, None
        if context is not None:
            context.__exit__(None, None, None)

    @torch.compiler.disable  # a plain gather: keep it out of compiled blocks (no graph, no guards)
    def on_first_block(module, args, kwargs):
        state.passes.append([state.step, 0])  # runs even when a step cache then skips the block's forward
        if not state.pad_dense:
            return None
        hidden = _arg(args, kwargs, 0, "hidden_states")
        tiled = state.layout.tile(hidden, dim=1)
        if not hidden.requires_grad:
            # The transformer's forward keeps its raster-ordered tensor alive until the first block
            # returns; pointing it at the tiled storage frees the raster copy now (0.8 GiB at 14B 720p).
            hidden.set_(tiled)
        return _with_arg(args, kwargs, 0, "hidden_states", tiled)

    # The rotary tables are tiled inside rope.forward itself (an instance attribute shadowing the class method), not
    # in a forward hook: context parallelism later wraps this forward and splits its output, which must already be
    # in tile order by then (pad_dense). On sparse steps of a raster stream they go to tile order for the processor,
    # once a forward, not in every block.
    rope_forward = transformer.rope.forward

    def tiled_rope_forward(hidden_states):
        rope = rope_forward(hidden_states)
        if not (state.pad_dense or state.tile_indices is not None):
            return rope
        rope = tuple(state.layout.tile(r, dim=1) for r in rope)
        if state.tile_indices is not None:  # the processor tiles q and k, and rotates k with a copy of its own
            state.key_rotary = tuple(r.clone() for r in rope)
        return rope

    transformer.rope.forward = tiled_rope_forward

    def on_proj_out(module, args, output):
        return state.layout.untile(output, dim=1) if state.pad_dense else output

    hooks = [
        transformer.register_forward_pre_hook(on_transformer, with_kwargs=True),
        transformer.register_forward_hook(after_transformer, always_call=True),
        transformer.blocks[0].register_forward_pre_hook(on_first_block, with_kwargs=True),
        transformer.proj_out.register_forward_hook(on_proj_out),
    ]
    processors = [block.attn1.processor for block in transformer.blocks]
    for block in transformer.blocks:
        block.attn1.set_processor(NablaWanAttnProcessor(state))
    handle = NablaPatch(transformer, state, hooks, processors)
    transformer._nabla_patch = handle
    return handle


def unpatch(transformer: WanTransformer3DModel) -> None:
    """Undo `patch_transformer`: remove the hooks and restore the original attention processors."""
    handle = getattr(transformer, "_nabla_patch", None)
    if handle is None:
        return
    for hook in handle.hooks:
        hook.remove()
    del transformer.rope.forward
    for block, processor in zip(transformer.blocks, handle.processors):
        block.attn1.set_processor(processor)
    transformer._nabla_patch = None
