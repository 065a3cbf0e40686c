"""The self-attention processor of a NABLA-patched transformer, and the attention op it calls.

Each self-attention module the family names (Wan: every block's attn1; attn2, the cross-attention to text, is left
alone) gets a processor that computes q, k, v as the family says (Wan: like diffusers' WanAttnProcessor), but writes them in tile order (padded to whole tiles): on CUDA q
and k by Triton kernels that read the projected raster rows, normalise, rotate, write tile order and take NABLA's
block means in one pass (tiled_qk.py; under autograd too where the norms are frozen and their weights hold no
zero: their backward keeps no copy of the projections), elsewhere by gathering the rows before the norm and the
rotary embedding. `self_attention` then applies the run's policy (dense steps, dense fallback) around
`nabla.attention.attend` and records the call. At inference it runs in one custom op inside the compiled block
(`nabla::wan_self_attention`), not a graph break, so the block's activations are freed as in the stock compiled
block; under autograd it is called directly (a graph break), and its backward is flex_attention's (on the CPU,
SDPA's under the token-level mask).
"""

from __future__ import annotations

import contextlib
from typing import Any, Optional

import torch
import torch.nn.functional as F
from diffusers.models.attention_dispatch import TemplatedUlyssesAttention

from nabla.attention import attend, dense_attention
from nabla.layout import gather_tiles
from nabla.masks import pool_blocks
from wan.attention.family import AttentionFamily
from wan.attention.state import STATES, NablaState
from wan.models.wan import WAN

try:  # the CUDA kernels for q and k; CPU-only installs may lack Triton
    from wan.attention.tiled_qk import fused_applies, tiled_qk
except ImportError:
    fused_applies = tiled_qk = None


# Kept out of torch.compile'd blocks (compile_repeated_blocks): the mask builder and flex_attention are compiled on
# their own, and the per-layer bookkeeping here would make dynamo recompile per layer.
@torch.compiler.disable
def self_attention(
    state: NablaState,
    layer: int | torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    tiled: bool = False,
    means: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Self-attention of `layer` on q, k, v [B, L, H, D] in stream order (raster, or padded tile order with
    `state.pad_dense`), or in padded tile order with `tiled`; the output [B, L, H, D] in the order of the input.
    `means`: NABLA's block means of q and k [B, H, nb, D] where the caller took them (`block_means`)."""
    layer = int(layer)
    state.records.count_call()
    if not state.sparse_now:
        return _dense(state, q, k, v, tiled)
    if state.fallback.skips(state.step, layer):
        state.records.dense_fallbacks.append((state.step, layer))
        return _dense(state, q, k, v, tiled)
    layout, records = state.layout, state.records
    in_tiles = state.pad_dense or tiled
    # [B, L, H, D] -> tile order [B, S, H, D] -> [B, H, S, D] views: flex_attention reads the strides as they are
    qkv = [(x if in_tiles else layout.tile(x, dim=1)).transpose(1, 2) for x in (q, k, v)]
    timer = records.recorder.timer(q.device) if records.recorder is not None else None
    result = attend(*qkv, layout, state.config, means=means, timer=timer)
    state.backend = result.backend
    records.add(state.step, layer, result, timer)
    state.fallback.update(state.step, layer, result.dense)
    out = result.out.transpose(1, 2)
    return out if in_tiles else layout.untile(out, dim=1)


def _dense(state: NablaState, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tiled: bool) -> torch.Tensor:
    """Dense attention as stock diffusers computes it, in the order of the input."""
    if state.pad_dense:  # padding keys must not be attended
        return dense_attention(*(x.transpose(1, 2) for x in (q, k, v)), state.layout).transpose(1, 2)
    if tiled:  # in raster order (exactly: a permutation), as stock diffusers computes it
        q, k, v = (state.layout.untile(x, dim=1) for x in (q, k, v))
    out = F.scaled_dot_product_attention(*(x.transpose(1, 2) for x in (q, k, v))).transpose(1, 2)
    return state.layout.tile(out, dim=1) if tiled else out


# An opaque op inside the compiled block: inductor frees the block's activations as in the stock compiled block
# (a graph break instead keeps the block's normalised input alive while attention runs), and the per-call
# bookkeeping runs in Python, between the compiled kernels, without guards or recompiles. It has no autograd:
# under autograd the processor calls `self_attention` directly.
@torch.library.custom_op("nabla::wan_self_attention", mutates_args=())
def wan_self_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    query_means: Optional[torch.Tensor],  # noqa: UP045 (torch.library reads the annotation at runtime)
    key_means: Optional[torch.Tensor],  # noqa: UP045
    state: int,
    layer: torch.Tensor,
    tiled: bool,
) -> torch.Tensor:
    """`self_attention` of the state keyed `state`: [B, L, H, D] like `query`, contiguous, in its order."""
    means = None if query_means is None or key_means is None else (query_means, key_means)
    return self_attention(STATES[state], layer, query, key, value, tiled, means).contiguous()


@wan_self_attention.register_fake
def _(query, key, value, query_means, key_means, state, layer, tiled) -> torch.Tensor:
    return torch.empty_like(query, memory_format=torch.contiguous_format)


def no_custom_op_check():
    """A context for one transformer forward: torch >= 2.12 checks the first call of each compiled graph for custom
    ops that alias their inputs, under a dispatch mode in which eager flex_attention's vmap fails (the CPU path);
    the op never aliases."""
    if hasattr(torch._functorch.config, "check_custom_op_aliasing"):
        return torch._functorch.config.patch(check_custom_op_aliasing=False)
    return contextlib.nullcontext()


def invertible(*norms: torch.nn.Module) -> bool:
    """Whether the q/k kernels' backward can recover these norms' inputs from their outputs: no weight holds a zero
    (a weight not in memory, as under sequential CPU offload, cannot be checked: False)."""
    weights = [getattr(norm, "weight", None) for norm in norms]
    return all(w is None or (not w.is_meta and bool((w != 0).all())) for w in weights)


def block_means(x: torch.Tensor, block_size: int, valid: torch.Tensor) -> torch.Tensor:
    """NABLA's block means [B, H, nb, D] (float32) of tile-ordered x [B, S, H, D]: `pool_blocks` on the heads-first
    view, so that in a compiled block they reduce in the graph that writes x."""
    return pool_blocks(x.transpose(1, 2), block_size, valid)[0]


class NablaWanAttnProcessor:
    """Self-attention processor for WanAttention: diffusers' projections, NABLA attention.

    Under diffusers' Ulysses context parallelism (`enable_parallelism` sets `_parallel_config`),
    NABLA runs between diffusers' two all-to-alls, on the whole sequence and this rank's heads.
    """

    _parallel_config = None

    def __init__(self, state: NablaState, layer: int, invertible_norms: bool = False,
                 family: AttentionFamily = WAN) -> None:
        # a tensor, not an int: compiled blocks guard on int attributes (one graph per layer, past dynamo's limit of
        # 8 graphs), while a tensor is an input to the one graph all blocks share
        self.state, self.layer, self.family = state, torch.tensor(layer), family
        # the q/k kernels' backward recovers the norms' inputs from their outputs over the weights: none may be 0
        # (`invertible`, checked when patching; a frozen weight keeps its values)
        self.invertible_norms = invertible_norms

    def _attend(self, ctx, query, key, value, *args, **kwargs) -> torch.Tensor:
        """[B, S, H, D] in and out; the signature of a diffusers templated-attention `forward_op`."""
        return self_attention(self.state, self.layer, query, key, value)

    @torch.compiler.disable  # collectives and NABLA's own compiled kernels stay outside compiled blocks
    def _ulysses(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        return TemplatedUlyssesAttention.apply(
            query, key, value, None, 0.0, False, None, False, False, self._attend, None, self._parallel_config
        )

    def _fused(self, attn: Any, query: torch.Tensor, key: torch.Tensor,
               rotary_emb: tuple[torch.Tensor, torch.Tensor] | None) -> bool:
        if not self.family.fused_qk:
            return False
        norms = self.family.norms(attn)
        # under autograd (q's or k's projection trains) the kernels' backward serves frozen norms without zeros: it
        # gives the weights no gradient
        trains = self.invertible_norms and all(n.weight is None or not n.weight.requires_grad for n in norms)
        return (fused_applies is not None and (not (query.requires_grad or key.requires_grad) or trains)
                and all(fused_applies(query, norm, rotary_emb) for norm in norms))

    def _qkv_by_kernels(self, attn: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                        rotary_emb: tuple[torch.Tensor, torch.Tensor], tiles: Any, with_means: bool) -> tuple:
        """q, k (normalised, rotated) and v [B, S, H, D] from the projections by the Triton kernels, in tile order
        where `tiles` is given (else raster), and the block means of q and k where `with_means` (else None)."""
        block_size = self.state.config.block_size
        rows = tiles.gather if tiles is not None else torch.arange(query.shape[1], device=query.device)
        (norm_q, norm_k), heads = self.family.norms(attn), self.family.heads(attn)
        query, query_means = tiled_qk(query, norm_q, rotary_emb, rows, heads, block_size, with_means)
        key, key_means = tiled_qk(key, norm_k, rotary_emb, rows, heads, block_size, with_means)
        if tiles is not None:
            value = value.index_select(1, tiles.gather_values)
        return query, key, value.unflatten(2, (heads, -1)), (query_means, key_means) if with_means else None

    def _qkv_by_torch(self, attn: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      rotary_emb: tuple[torch.Tensor, torch.Tensor] | None, tiles: Any, with_means: bool) -> tuple:
        """What `_qkv_by_kernels` gives, by torch ops (compiled with the block where it is)."""
        if tiles is not None:
            # Tile order from here: q and k are gathered before the norm and the rotary embedding (per-token ops; the
            # patched rope.forward gave its tables in tile order), so that in a compiled block their kernels read
            # raster rows and write tile order. q, k and v read no input in common (k has its own index and tables,
            # v its own index): inductor fuses kernels that share an input, and one kernel writing q, k and v in tile
            # order holds all three projections and all three tiled copies at once (a third more of them); apart,
            # each projection is freed as its tiled copy is written.
            query, key = gather_tiles(query, tiles.gather, dim=1), gather_tiles(key, tiles.gather_keys, dim=1)
            value = value.index_select(1, tiles.gather_values)
        query, key = self.family.normalise(attn, query, key)
        value = value.unflatten(2, (self.family.heads(attn), -1))
        if rotary_emb is not None:  # the model's arithmetic (Wan's without the stack that inductor writes out)
            query = self.family.rotate(query, rotary_emb)
            # k's own copy of the tiled tables at inference; under autograd (and in the recomputation of gradient
            # checkpointing, after the forward dropped that copy) the tables the block was given
            key = self.family.rotate(key, rotary_emb if self.state.key_rotary is None else self.state.key_rotary)
        block_size = self.state.config.block_size
        means = tuple(block_means(x, block_size, tiles.valid) for x in (query, key)) if with_means else None
        return query, key, value, means

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        rotary_emb: Any = None,
        sparse_params: Any = None,
    ) -> torch.Tensor:
        # Kandinsky 5's attention passes `sparse_params` by name; the patch's forward hook has set them to None
        if encoder_hidden_states is not None or attention_mask is not None or sparse_params is not None:
            raise ValueError("NablaWanAttnProcessor is for self-attention without a mask (attn1)")
        query, key, value = self.family.projections(attn, hidden_states)
        tiles = self.state.tile_indices if self._parallel_config is None else None
        config = self.state.config
        with_means = tiles is not None and config.uses_nabla
        # On CUDA, q and k each by two Triton kernels that also take the block means (tiled_qk.py); on the dense
        # steps of a sparse run too, in raster order (mode "full" stays diffusers' computation, bit for bit)
        if (self._parallel_config is None and (tiles is not None or config.is_sparse)
                and self._fused(attn, query, key, rotary_emb)):
            query, key, value, means = self._qkv_by_kernels(attn, query, key, value, rotary_emb, tiles, with_means)
        else:
            query, key, value, means = self._qkv_by_torch(attn, query, key, value, rotary_emb, tiles, with_means)
        if self._parallel_config is not None:
            cp = self._parallel_config.context_parallel_config
            if cp.ring_degree != 1 or cp.ulysses_anything:
                raise ValueError("NABLA runs under Ulysses context parallelism only (ring_degree 1, even split)")
            out = self._ulysses(query, key, value)
            return self.family.output(attn, out.flatten(2, 3).type_as(query))
        tiled = tiles is not None
        if torch.is_grad_enabled():  # the op has no autograd: a graph break instead, with flex_attention's backward
            out = self_attention(self.state, self.layer, query, key, value, tiled, means)
        else:
            out = wan_self_attention(query, key, value, *(means or (None, None)), self.state.key, self.layer, tiled)
        if tiled:  # back to raster order (padding dropped) before the output projection, whose input it writes
            out = out.index_select(1, tiles.scatter)
        return self.family.output(attn, out.flatten(2, 3).type_as(query))
