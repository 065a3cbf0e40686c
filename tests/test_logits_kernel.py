"""The CUDA pooled-logits kernel (nabla/logits_kernel.py), run by Triton's interpreter on the CPU; its float32
accuracy on tensor cores is checked on the GPU (tests/test_gpu.py)."""

import pytest

from tests.triton_helpers import make_hopper_ir

CHECK = r"""
import torch
from nabla.logits_kernel import means_logits_tf32x3
from nabla.masks import means_logits
torch.manual_seed(int.from_bytes(__import__("os").urandom(4), "little"))
checked = 0
for shape in ((1, 2, 70, 128), (2, 1, 64, 16), (1, 3, 130, 64), (1, 1, 1, 32)):  # rows not a multiple of the tile
    q, k = torch.randn(shape) * 3, torch.randn(shape)
    ref = means_logits(q.double(), k.double())
    out = means_logits_tf32x3(q, k)
    assert out.dtype == torch.float32 and out.shape == ref.shape, (shape, out.shape)
    assert (out.double() - ref).abs().max() < 1e-5, shape
    checked += 1
print("checked", checked)
"""


def test_kernel_matches_the_matmul(interpreted):
    assert "checked 4" in interpreted("logits")


def test_kernel_compiles_for_hopper():
    from nabla.logits_kernel import _means_logits_kernel

    for d in (16, 128, 256):
        make_hopper_ir(_means_logits_kernel, {"D": d, "BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_D": min(d, 32)},
                       {"q_ptr": "*fp32", "k_ptr": "*fp32", "out_ptr": "*fp32", "scale": "fp32"})


@pytest.mark.parametrize(("shape", "dtype", "message"), [
    ((1, 1, 8, 96), "float32", "head dim 96; allowed: a power of two from 16 to 256"),
    ((1, 1, 8, 128), "bfloat16", "allowed: float32"),
])
def test_kernel_refuses_what_it_cannot_run(shape, dtype, message):
    import torch

    from nabla.logits_kernel import means_logits_tf32x3

    x = torch.zeros(shape, dtype=getattr(torch, dtype))
    with pytest.raises(ValueError, match=message):
        means_logits_tf32x3(x, x)


def test_supported_head_dims_are_the_ones_the_op_accepts():
    from nabla.logits_kernel import supports_head_dim

    assert [d for d in range(1, 513) if supports_head_dim(d)] == [16, 32, 64, 128, 256]
