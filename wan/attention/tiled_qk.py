"""Wan's q (or k) for NABLA in two Triton kernels: RMSNorm over all heads, rotary embedding, tile order, block means.

Inductor's own kernels for this (inside the compiled block) take about twice as long (docs/GPU-FACTS.md). Here one
kernel takes the RMS of each projected raster row, and a second reads the rows again in tile order, normalises,
rotates, writes them and sums the block means on the way (16 tokens x one head a step, two warps: the fastest tile
shape measured). Same arithmetic as the torch path (diffusers'
RMSNorm and WanAttnProcessor's rotary: float32, rounded to the input dtype after the norm and after the rotation),
up to the order of float32 sums.

The op has a backward that keeps no copy of its input: the rotation is undone on the output and the norm's input is
the output over the norm's weight (and the RMS the forward took). Under training the output is what flex_attention
saves anyway, so a block keeps neither q's nor k's projections. It gives the
weight no gradient and needs it free of zeros (`wan.attention.processor.invertible`).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@triton.jit
def _rms_kernel(x_ptr, rstd_ptr, L, C, stride_b, stride_l, eps, BLOCK_C: tl.constexpr):
    row = tl.program_id(0)  # b * L + l
    base = x_ptr + (row // L).to(tl.int64) * stride_b + (row % L).to(tl.int64) * stride_l
    acc = tl.zeros((BLOCK_C,), tl.float32)
    for start in range(0, C, BLOCK_C):
        col = start + tl.arange(0, BLOCK_C)
        x = tl.load(base + col, mask=col < C, other=0.0).to(tl.float32)
        acc += x * x
    tl.store(rstd_ptr + row, 1.0 / tl.sqrt(tl.sum(acc, axis=0) / C + eps))


@triton.jit
def _tiled_qk_kernel(x_ptr, rstd_ptr, w_ptr, cos_ptr, sin_ptr, gather_ptr, out_ptr, means_ptr,
                     L, S, nb, stride_b, stride_l,
                     H: tl.constexpr, D: tl.constexpr, D_P2: tl.constexpr, BLOCK: tl.constexpr, SUB: tl.constexpr,
                     HAS_WEIGHT: tl.constexpr, HAS_MEANS: tl.constexpr):
    # heads vary fastest: the programs of one block run together and read its rotary rows from L2
    h, j, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    dtype = out_ptr.dtype.element_ty
    d = tl.arange(0, D_P2)
    in_head = d < D
    if HAS_WEIGHT:
        w1, w2 = tl.split(tl.reshape(tl.load(w_ptr + h * D + d, mask=in_head, other=0.0).to(tl.float32), (D_P2 // 2, 2)))
    sums1 = tl.zeros((D_P2 // 2,), tl.float32)
    sums2 = tl.zeros((D_P2 // 2,), tl.float32)
    count = 0.0
    x_base = x_ptr + b.to(tl.int64) * stride_b
    for start in range(0, BLOCK, SUB):
        slot = j * BLOCK + start + tl.arange(0, SUB)
        inside = slot < S
        src = tl.load(gather_ptr + slot, mask=inside, other=L)  # raster row; L for padding
        real = src < L
        r = tl.load(rstd_ptr + b * L + src, mask=real, other=0.0)[:, None, None]
        x = tl.load(x_base + src.to(tl.int64)[:, None] * stride_l + h * D + d[None, :],
                    mask=real[:, None] & in_head[None, :], other=0.0)
        # (x1, x2): the interleaved pairs that the rotary embedding turns
        x1, x2 = tl.split(tl.reshape(x.to(tl.float32), (SUB, D_P2 // 2, 2)) * r)
        if HAS_WEIGHT:
            x1, x2 = x1 * w1[None, :], x2 * w2[None, :]
        x1, x2 = x1.to(dtype).to(tl.float32), x2.to(dtype).to(tl.float32)  # RMSNorm's output dtype
        table = slot.to(tl.int64)[:, None] * D + d[None, :]
        keep = inside[:, None] & in_head[None, :]
        cos, _ = tl.split(tl.reshape(tl.load(cos_ptr + table, mask=keep, other=0.0), (SUB, D_P2 // 2, 2)))
        _, sin = tl.split(tl.reshape(tl.load(sin_ptr + table, mask=keep, other=0.0), (SUB, D_P2 // 2, 2)))
        # out[2i] = x[2i] cos[2i] - x[2i+1] sin[2i+1];  out[2i+1] = x[2i+1] cos[2i] + x[2i] sin[2i+1]
        o1, o2 = (x1 * cos - x2 * sin).to(dtype), (x2 * cos + x1 * sin).to(dtype)
        out = tl.reshape(tl.join(o1, o2), (SUB, D_P2))
        tl.store(out_ptr + ((b * S + slot).to(tl.int64)[:, None] * H + h) * D + d[None, :], out, mask=keep)
        if HAS_MEANS:
            sums1 += tl.sum(tl.where(real[:, None], o1.to(tl.float32), 0.0), axis=0)
            sums2 += tl.sum(tl.where(real[:, None], o2.to(tl.float32), 0.0), axis=0)
            count += tl.sum(real.to(tl.float32), axis=0)
    if HAS_MEANS:
        means = tl.reshape(tl.join(sums1, sums2), (D_P2,)) / tl.maximum(count, 1.0)
        tl.store(means_ptr + ((b * H + h) * nb + j).to(tl.int64) * D + d, means, mask=in_head)


@torch.library.custom_op("nabla::wan_tiled_qk", mutates_args=())
def _tiled_qk(x: torch.Tensor, weight: Optional[torch.Tensor], cos: torch.Tensor, sin: torch.Tensor,  # noqa: UP045
              gather: torch.Tensor, eps: float, heads: int, block_size: int, with_means: bool,
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    B, L, C = x.shape
    S, D = gather.numel(), C // heads
    if x.stride(-1) != 1:
        x = x.contiguous()
    out = torch.empty(B, S, heads, D, dtype=x.dtype, device=x.device)
    nb = triton.cdiv(S, block_size)
    means = torch.empty((B, heads, nb, D) if with_means else (0,), dtype=torch.float32, device=x.device)
    rstd = torch.empty(B, L, dtype=torch.float32, device=x.device)
    _rms_kernel[(B * L,)](x, rstd, L, C, x.stride(0), x.stride(1), eps, BLOCK_C=1024, num_warps=4)
    _tiled_qk_kernel[(heads, nb, B)](
        x, rstd, weight if weight is not None else x, cos.contiguous(), sin.contiguous(), gather, out, means,
        L, S, nb, x.stride(0), x.stride(1), H=heads, D=D, D_P2=triton.next_power_of_2(D), BLOCK=block_size,
        SUB=16, HAS_WEIGHT=weight is not None, HAS_MEANS=with_means, num_warps=2)
    return out, means, rstd


@_tiled_qk.register_fake
def _(x, weight, cos, sin, gather, eps, heads, block_size, with_means):
    B, L, C = x.shape
    S, D = gather.numel(), C // heads
    nb = -(-S // block_size)
    out = x.new_empty(B, S, heads, D)
    means = x.new_empty((B, heads, nb, D) if with_means else (0,), dtype=torch.float32)
    return out, means, x.new_empty(B, L, dtype=torch.float32)


def _setup_context(ctx, inputs, output) -> None:
    _, weight, cos, sin, gather, *_ = inputs
    out, means, rstd = output
    ctx.mark_non_differentiable(means, rstd)  # the means choose the mask, which takes no gradient
    ctx.save_for_backward(out, rstd, weight, cos, sin, gather)


def _backward(ctx, grad_out: torch.Tensor, grad_means, grad_rstd):
    out, rstd, weight, cos, sin, gather = ctx.saved_tensors
    S, D = out.shape[1], out.shape[3]
    L = rstd.shape[1]
    c, s = cos.view(1, S, 1, D)[..., 0::2], sin.view(1, S, 1, D)[..., 1::2]

    def transpose(t: torch.Tensor) -> torch.Tensor:  # the rotation's transpose: (a, b) -> (a c + b s, b c - a s)
        a, b = t.float().unflatten(-1, (-1, 2)).unbind(-1)
        return torch.stack((a * c + b * s, b * c - a * s), -1)

    # in raster order (row l from the slot holding it: gather holds each row once, then L for padding) RMSNorm's
    # output, by the rotation's inverse (its transpose over c^2 + s^2, 1 for rotary tables), and the gradient there;
    # the slots by one scatter (padding slots all land on the dropped entry L), not a sort
    slots = torch.empty(L + 1, dtype=torch.long, device=gather.device).scatter_(
        0, gather.long(), torch.arange(S, device=gather.device))[:L]
    normed = (transpose(out) / (c * c + s * s).unsqueeze(-1)).flatten(-3).index_select(1, slots)
    grad_normed = transpose(grad_out).flatten(-3).index_select(1, slots)
    w = weight.float() if weight is not None else torch.ones((), device=out.device)
    # d/dx of x r w (r = 1 / rms(x)): r (g - x r mean(g x r)) with g = grad w, where x r = normed / w
    mean = (grad_normed * normed).mean(-1, keepdim=True)
    grad_x = rstd.unsqueeze(-1) * (grad_normed * w - normed / w * mean)
    return grad_x.to(out.dtype), None, None, None, None, None, None, None, None


_tiled_qk.register_autograd(_backward, setup_context=_setup_context)


def fused_applies(x: torch.Tensor, norm: torch.nn.Module, rotary: tuple[torch.Tensor, torch.Tensor] | None) -> bool:
    """Whether `tiled_qk` computes what the torch path does for projections `x` [B, L, H*D]: on CUDA, torch's
    RMSNorm (weight, if any, in x's dtype), float32 rotary tables."""
    return (x.is_cuda and x.dtype in _DTYPES and rotary is not None and isinstance(norm, torch.nn.RMSNorm)
            and (norm.weight is None or norm.weight.dtype == x.dtype)
            and all(t.dtype == torch.float32 for t in rotary))


def tiled_qk(
    x: torch.Tensor,
    norm: torch.nn.RMSNorm,
    rotary: tuple[torch.Tensor, torch.Tensor],
    gather: torch.Tensor,
    heads: int,
    block_size: int,
    with_means: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """q (or k) of Wan's self-attention from its projections `x` [B, L, H*D]: `norm` over all heads, the rotary
    embedding `rotary` (cos, sin, tile-ordered [1, S, 1, D], float32), in tile order `gather` [S] (raster row
    per slot, L for padding: zeros) -> [B, S, H, D]; with `with_means`, NABLA's block means [B, H, nb, D]
    (float32, over the real tokens of each `block_size` block, as `nabla.masks.pool_blocks`), else None."""
    if not fused_applies(x, norm, rotary):
        weight = getattr(getattr(norm, "weight", None), "dtype", None)
        tables = None if rotary is None else [t.dtype for t in rotary]
        raise ValueError(f"tiled_qk: x {x.dtype} on {x.device}, norm {type(norm).__name__} (weight {weight}), rotary "
                         f"tables {tables}: needs x on CUDA in bf16/fp16/fp32, a torch.nn.RMSNorm in x's dtype and "
                         "float32 tables")
    eps = norm.eps if norm.eps is not None else torch.finfo(torch.float32).eps  # torch's default: its compute dtype
    cos, sin = (t.reshape(gather.numel(), -1) for t in rotary)
    out, means, _ = _tiled_qk(x, norm.weight, cos, sin, gather, eps, heads, block_size, with_means)
    return out, means if with_means else None
