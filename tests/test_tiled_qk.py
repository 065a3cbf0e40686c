"""The Triton kernels that write Wan's q and k in tile order with their block means, by Triton's interpreter on the
CPU, against the processor's torch path (gather, RMSNorm, rotary, pool_blocks)."""

import pytest
import torch

from tests.triton_helpers import make_hopper_ir

CHECK = r"""
import torch
from nabla.layout import TileLayout, gather_tiles
from wan.attention.processor import block_means
from wan.models.wan import rotate_pairwise as _apply_rotary_pairwise
from wan.attention.tiled_qk import _tiled_qk
torch.manual_seed(int.from_bytes(__import__("os").urandom(4), "little"))
checked = 0
for grid, batch, heads, dim, block_size, dtype, affine, eps in (  # batch 2 once: the interpreter is slow
    ((2, 10, 13), 2, 2, 16, 64, torch.float32, True, 1e-6),  # padded rows and columns, S not a multiple of 128
    ((2, 10, 13), 1, 2, 16, 128, torch.bfloat16, True, 1e-6),
    ((1, 16, 16), 1, 3, 12, 64, torch.bfloat16, False, None),  # no padding; head dim not a power of two
    ((1, 9, 20), 1, 1, 32, 128, torch.float16, True, 1e-5),
):
    layout = TileLayout(*grid)
    L, S, C = layout.length, layout.padded_length, heads * dim
    x = (torch.randn(batch, L, C) * 3 + 0.5).to(dtype)
    norm = torch.nn.RMSNorm(C, eps=eps, elementwise_affine=affine).to(dtype)
    if affine:
        norm.weight.data = torch.randn(C).to(dtype)
    cos, sin = (layout.tile(torch.randn(1, L, 1, dim), dim=1) for _ in range(2))
    gather = layout.raster_index
    out, means, _ = _tiled_qk(x, norm.weight, cos.reshape(S, dim), sin.reshape(S, dim), gather,
                              eps if eps is not None else torch.finfo(torch.float32).eps, heads, block_size, True)
    ref = _apply_rotary_pairwise(norm(gather_tiles(x, gather, dim=1)).unflatten(2, (heads, -1)), cos, sin)
    ref_means = block_means(out, block_size, layout.valid)  # the means of what it wrote (compared to ref below)
    assert out.shape == ref.shape and out.dtype == dtype and means.shape == ref_means.shape, (grid, out.shape, means.shape)
    # at most a rounding or two of the output dtype apart (float32 sums in another order; the interpreter rounds
    # float32 to bfloat16 toward zero, the GPU to nearest: tests/test_gpu.py holds the GPU to tighter bounds)
    rtol = {torch.float32: 1e-5, torch.float16: 2.0 ** -9, torch.bfloat16: 2.0 ** -6}[dtype]
    err = (out.float() - ref.float()).abs()
    assert (err <= rtol * (ref.float().abs() + ref.float().abs().amax(-1, keepdim=True))).all(), (grid, dtype, float(err.max()))
    if dtype == torch.float16:  # mostly the same rounding
        assert (err > 0).float().mean() < 0.05, (grid, dtype, float((err > 0).float().mean()))
    assert not out[:, ~layout.valid].any(), grid
    assert torch.allclose(means, ref_means, rtol=1e-5, atol=1e-6), (grid, dtype, float((means - ref_means).abs().max()))
    no_means = _tiled_qk(x, norm.weight, cos.reshape(S, dim), sin.reshape(S, dim), gather, 1e-6, heads, block_size, False)[1]
    assert no_means.numel() == 0
    checked += 1
print("checked", checked)
"""


def test_tiled_qk_kernel_matches_the_torch_path(interpreted):
    assert "checked 4" in interpreted("tiled-qk").splitlines()


CHECK_GRAD = r"""
import torch
from nabla.layout import TileLayout, gather_tiles
from wan.models.wan import rotate_pairwise as _apply_rotary_pairwise
from wan.attention.tiled_qk import _tiled_qk
torch.manual_seed(int.from_bytes(__import__("os").urandom(4), "little"))
checked = 0
for grid, heads, dim, dtype, affine in (
    ((2, 10, 13), 2, 16, torch.float32, True),  # padded rows and columns
    ((1, 16, 16), 3, 12, torch.float32, False),  # no padding, no weight
    ((2, 10, 13), 2, 16, torch.bfloat16, True),
):
    layout = TileLayout(*grid)
    L, S, C = layout.length, layout.padded_length, heads * dim
    x = (torch.randn(1, L, C) * 3 + 0.5).to(dtype).requires_grad_()
    norm = torch.nn.RMSNorm(C, eps=1e-6, elementwise_affine=affine).to(dtype).requires_grad_(False)
    if affine:
        norm.weight.data = (torch.randn(C).abs() + 0.2).to(dtype) * torch.sign(torch.randn(C)).to(dtype)
    cos, sin = (layout.tile(torch.randn(1, L, 1, dim), dim=1) for _ in range(2))
    gather = layout.raster_index
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = _tiled_qk(x, norm.weight, cos.reshape(S, dim), sin.reshape(S, dim), gather, 1e-6, heads, 64, True)[0]
    # what the backward keeps: the output, not the input (nor a copy of it)
    assert all(t.untyped_storage().data_ptr() != x.untyped_storage().data_ptr() and t.numel() != x.numel()
               or t.untyped_storage().data_ptr() == out.untyped_storage().data_ptr() for t in saved), grid
    assert any(t.untyped_storage().data_ptr() == out.untyped_storage().data_ptr() for t in saved), grid
    weights = torch.randn(out.shape) * layout.valid[None, :, None, None]  # padding rows are never read
    (out.float() * weights).sum().backward()
    ref_x = x.detach().clone().requires_grad_()
    ref = _apply_rotary_pairwise(norm(gather_tiles(ref_x, gather, dim=1)).unflatten(2, (heads, -1)), cos, sin)
    (ref.float() * weights).sum().backward()
    err, scale = float((x.grad.float() - ref_x.grad.float()).abs().max()), float(ref_x.grad.float().abs().max())
    assert err <= {torch.float32: 1e-4, torch.bfloat16: 0.05}[dtype] * scale, (grid, dtype, err, scale)
    checked += 1
print("checked", checked)
"""


def test_tiled_qk_backward_matches_the_torch_path_and_keeps_no_input_copy(interpreted):
    """The op's input gradient (the rotation undone on the output, the norm's input as its output over the weight)
    against autograd through the torch path, on padded grids, with and without a weight; and what it saves for the
    backward is its output, never its input."""
    assert "checked 3" in interpreted("tiled-qk").splitlines()


def test_tiled_qk_kernels_compile_for_hopper():
    """What the interpreter runs must also compile to Triton IR (the interpreter accepts code the compiler refuses)."""
    from wan.attention.tiled_qk import _rms_kernel, _tiled_qk_kernel

    types = {"x_ptr": "*bf16", "out_ptr": "*bf16", "w_ptr": "*bf16", "rstd_ptr": "*fp32", "cos_ptr": "*fp32",
             "sin_ptr": "*fp32", "means_ptr": "*fp32", "gather_ptr": "*i64", "eps": "fp32"}
    compiled = 0
    for kernel, variants in (
        (_rms_kernel, [{"BLOCK_C": 1024}]),
        (_tiled_qk_kernel, [{"H": 40, "D": 128, "D_P2": 128, "BLOCK": block, "SUB": 32, "HAS_WEIGHT": weight,
                             "HAS_MEANS": means} for block in (64, 128) for weight in (False, True)
                            for means in (False, True)]),
    ):
        for constants in variants:
            make_hopper_ir(kernel, constants, types)
            compiled += 1
    assert compiled == 1 + 8


# The processor with the kernels (forced on the CPU) against its torch path: same video, same masks.
# What both runs below share: `force_kernels(True)` makes the processor take the kernels on the CPU, recording each
# check; `force_kernels(False)` puts the CPU's choice back (the checks share one process with others).
FORCED = r"""
import sys, torch
import wan.attention.processor, wan.attention.tiled_qk
from nabla import SparsityConfig
from wan.models.loading import load_pipeline
from wan.attention.patch import patch_transformer, unpatch
calls = []

def on_cpu(x, norm, rotary):
    calls.append(x)
    return rotary is not None and isinstance(norm, torch.nn.RMSNorm)

unforced = wan.attention.processor.fused_applies, wan.attention.tiled_qk.fused_applies

def force_kernels(on):
    wan.attention.processor.fused_applies, wan.attention.tiled_qk.fused_applies = (on_cpu, on_cpu) if on else unforced
"""

CHECK_PROCESSOR = FORCED + r"""
from wan.generate.run import generate
from wan.generate.settings import GenerationSettings

settings = GenerationSettings(prompt="a cat", height=128, width=160, frames=5, steps=2, guidance_scale=1.0)
pipe = load_pipeline(sys.argv[1], device="cpu")
results = []
for fused in (False, True):
    force_kernels(fused)
    # step 0 dense (raster order through the kernels), step 1 sparse (tile order)
    handle = patch_transformer(pipe.transformer, SparsityConfig(mode="nabla", threshold=0.5, dense_steps=1))
    frames, _ = generate(pipe, settings)
    results.append((frames, torch.stack([d for _, _, d in handle.state.records.densities])))
    unpatch(pipe.transformer)
(ref, ref_density), (out, density) = results
assert len(calls) == 4 * 2 * 2, len(calls)  # (checks for q, k; q, k run) x 2 layers x 2 steps (guidance 1: one pass)
assert torch.equal(density, ref_density) and float(density.mean()) < 0.9, (density, ref_density)
err = abs(out - ref).max()
assert err < 1e-4, err
print("fused", len(calls), "max diff", err)
"""


def test_processor_with_the_kernels_matches_its_torch_path(interpreted):
    assert "fused" in interpreted("tiled-qk-processor")


# Training through the kernels (forced on the CPU; frozen norms, as under LoRA) against the torch path: the same loss
# and parameter gradients.
CHECK_TRAINING = FORCED + r"""
transformer = load_pipeline(sys.argv[1], device="cpu").transformer
for block in transformer.blocks:
    block.attn1.norm_q.requires_grad_(False)
    block.attn1.norm_k.requires_grad_(False)
gen = torch.Generator().manual_seed(0)
inputs = (torch.randn(2, 16, 2, 16, 20, generator=gen), torch.tensor([700.0, 150.0]), torch.randn(2, 9, 32, generator=gen))
target = torch.randn(2, 16, 2, 16, 20, generator=gen)
results = []
for fused in (False, True):
    force_kernels(fused)
    handle = patch_transformer(transformer, SparsityConfig(mode="nabla", threshold=0.4))
    assert all(block.attn1.processor.invertible_norms for block in transformer.blocks)
    transformer.zero_grad(set_to_none=True)
    loss = torch.nn.functional.mse_loss(transformer(*inputs, return_dict=False)[0], target)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in transformer.named_parameters() if p.grad is not None}
    results.append((loss.detach(), grads, torch.stack([d for _, _, d in handle.state.records.densities])))
    unpatch(transformer)
(loss, grads, density), (f_loss, f_grads, f_density) = results
assert calls and all(x.requires_grad for x in calls)  # the kernels ran, under autograd
assert torch.equal(density, f_density) and float(density.mean()) < 0.9, (density, f_density)
torch.testing.assert_close(f_loss, loss, atol=1e-6, rtol=1e-5)
assert grads.keys() == f_grads.keys() and len(grads) > 20
for name, grad in grads.items():
    torch.testing.assert_close(f_grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)
print("trained", len(calls))
"""


def test_training_through_the_kernels_matches_the_torch_path(interpreted):
    assert "trained" in interpreted("tiled-qk-training")


def test_tiled_qk_refuses_what_it_does_not_compute():
    from wan.attention.tiled_qk import tiled_qk

    x, rotary = torch.randn(1, 4, 32), (torch.ones(1, 4, 1, 16),) * 2
    with pytest.raises(ValueError, match=r"x torch.float32 on cpu, norm RMSNorm .*needs x on CUDA"):
        tiled_qk(x, torch.nn.RMSNorm(32), rotary, torch.arange(4), 2, 64, False)
    with pytest.raises(ValueError, match=r"norm LayerNorm"):
        tiled_qk(x, torch.nn.LayerNorm(32), rotary, torch.arange(4), 2, 64, False)
