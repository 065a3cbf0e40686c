"""NABLA's pooled logits on CUDA: a float32-accurate batched q_means @ k_means^T on tensor cores.

NABLA.md asks for float32 in the mask build. cuBLAS runs float32 matmuls on the CUDA cores, where with
64-token blocks at 720p they take a large share of the mask build. Triton's "tf32x3" dot splits each float32
operand into a TF32 high part and the rest and sums three TF32 products (the two small ones first), which keeps
float32's accuracy on the tensor cores; plain TF32 would be faster but is not float32-accurate. The timings and
errors behind this choice: docs/GPU-FACTS.md ("Moved from code comments").
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl


@triton.jit
def _means_logits_kernel(q_ptr, k_ptr, out_ptr, n, scale, D: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    head = tl.program_id(2).to(tl.int64)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    logits = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for d in tl.range(0, D, BLOCK_D):  # in slices of the head dim, so that loads pipeline with the dots
        dims = d + tl.arange(0, BLOCK_D)
        q = tl.load(q_ptr + head * n * D + rows[:, None] * D + dims[None, :], mask=rows[:, None] < n, other=0.0)
        k = tl.load(k_ptr + head * n * D + cols[:, None] * D + dims[None, :], mask=cols[:, None] < n, other=0.0)
        logits = tl.dot(q, tl.trans(k), logits, input_precision="tf32x3")
    # cast: inductor passes Python floats as float64
    tl.store(out_ptr + head * n * n + rows[:, None] * n + cols[None, :], (logits * scale).to(tl.float32),
             mask=(rows[:, None] < n) & (cols[None, :] < n))


def supports_head_dim(head_dim: int) -> bool:
    """Whether the kernel runs this head dim: a power of two from 16 to 256 (others take the torch matmul)."""
    return 16 <= head_dim <= 256 and head_dim & (head_dim - 1) == 0


@torch.library.triton_op("nabla::means_logits", mutates_args=())
def means_logits_tf32x3(q_means: torch.Tensor, k_means: torch.Tensor) -> torch.Tensor:
    """mean_q @ mean_k^T / sqrt(D) [B, H, nb, nb] float32 from float32 block means [B, H, nb, D] (CUDA; D a power
    of two from 16 to 256). A torch custom op, so that torch.compile keeps the kernel in the compiled mask build."""
    *batch, n, D = q_means.shape
    if q_means.dtype != torch.float32 or k_means.dtype != torch.float32:
        raise ValueError(f"means_logits_tf32x3: block means of {q_means.dtype} and {k_means.dtype}; allowed: float32")
    if not supports_head_dim(D):
        raise ValueError(f"means_logits_tf32x3: head dim {D}; allowed: a power of two from 16 to 256")
    q_means, k_means = q_means.contiguous(), k_means.contiguous()
    out = q_means.new_empty((*batch, n, n))
    # the tile shape a sweep found fastest at the largest Wan mask (14B 720p, 64-token blocks; docs/GPU-FACTS.md)
    grid = (triton.cdiv(n, 128), triton.cdiv(n, 64), math.prod(batch))
    torch.library.wrap_triton(_means_logits_kernel)[grid](
        q_means, k_means, out, n, 1.0 / math.sqrt(D), D=D, BLOCK_M=128, BLOCK_N=64, BLOCK_D=min(D, 32),
        num_warps=8, num_stages=3,
    )
    return out
