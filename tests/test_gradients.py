"""Gradients through NABLA: the attention core against a float64 reference, and the patched tiny Wan2.1 training."""

import math

import pytest
import torch

from nabla import SparsityConfig, TileLayout, attend
from nabla.backend import check_trainable
from nabla.block_mask import attended_mask, build_block_mask
from wan.attention.patch import patch_transformer, unpatch
from wan.models.loading import load_pipeline


def reference_attention(q, k, v, keep, layout, block_size, merge):
    """Softmax attention written out in float64 under the token mask that `keep` expands to (not SDPA)."""
    S = layout.padded_length
    blocks = attended_mask(keep, merge)
    mask = blocks.repeat_interleave(block_size, -1).repeat_interleave(block_size, -2)[..., :S, :S] & layout.valid
    scores = (q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])).masked_fill(~mask, float("-inf"))
    return scores.softmax(-1) @ v


CONFIGS = [
    SparsityConfig(mode="nabla", threshold=0.5),
    SparsityConfig(mode="nabla", threshold=0.4, block_size=128),
    SparsityConfig(mode="sta", sta_window=(1, 3, 1)),
    SparsityConfig(mode="nabla+sta", threshold=0.2, sta_window=(3, 1, 1), block_size=128),
    SparsityConfig(mode="nabla", threshold=0.3, query_block_size=128),
]


@pytest.mark.parametrize("grid", [(2, 10, 13), (3, 9, 20)])
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"{c.mode}-{c.block_size}-{c.query_block_size}")
def test_gradients_match_float64_reference_on_padded_grids(grid, config, gen):
    layout = TileLayout(*grid)
    q, k, v = (torch.randn(2, 3, layout.padded_length, 8, generator=gen, dtype=torch.float64, requires_grad=True)
               for _ in range(3))
    result = attend(q, k, v, layout, config)
    assert not result.dense and 0 < float(result.density.mean()) < 1
    real = layout.valid
    grad_out = torch.randn(result.out.shape, generator=gen, dtype=torch.float64)
    grads = torch.autograd.grad(result.out[:, :, real], (q, k, v), grad_out[:, :, real])
    # the mask is the one inference picks from the same q, k (chosen without gradients)
    with torch.no_grad():
        assert torch.equal(result.mask, build_block_mask(q, k, layout, config))
        torch.testing.assert_close(result.out[:, :, real], attend(q, k, v, layout, config).out[:, :, real])
    ref = reference_attention(q, k, v, result.mask, layout, config.block_size, config.query_merge)
    ref_grads = torch.autograd.grad(ref[:, :, real], (q, k, v), grad_out[:, :, real])
    torch.testing.assert_close(result.out[:, :, real], ref[:, :, real])
    for grad, ref_grad in zip(grads, ref_grads):
        torch.testing.assert_close(grad, ref_grad)
    assert grads[1][:, :, ~real].abs().max() == 0  # padding keys take no part


def test_dense_fallback_gradients_are_dense_attention_over_real_tokens(gen):
    layout = TileLayout(2, 9, 12)
    q, k, v = (torch.randn(1, 2, layout.padded_length, 8, generator=gen, dtype=torch.float64, requires_grad=True)
               for _ in range(3))
    result = attend(q, k, v, layout, SparsityConfig(mode="nabla", threshold=0.5, dense_above=0.01))
    assert result.dense
    real = layout.valid
    everything = torch.ones_like(result.mask)
    ref = reference_attention(q, k, v, everything, layout, 64, 1)
    grad_out = torch.randn(ref.shape, generator=gen, dtype=torch.float64)
    for grad, ref_grad in zip(torch.autograd.grad(result.out[:, :, real], (q, k, v), grad_out[:, :, real]),
                              torch.autograd.grad(ref[:, :, real], (q, k, v), grad_out[:, :, real])):
        torch.testing.assert_close(grad, ref_grad)


def test_block_means_with_gradients_are_detached_for_the_mask(gen):
    from nabla.masks import pool_blocks

    layout = TileLayout(2, 8, 16)
    q, k, v = (torch.randn(1, 2, layout.padded_length, 8, generator=gen, requires_grad=True) for _ in range(3))
    means = tuple(pool_blocks(x, 64, layout.valid)[0] for x in (q, k))
    result = attend(q, k, v, layout, SparsityConfig(mode="nabla", threshold=0.5), means=means)
    result.out.sum().backward()
    assert torch.equal(result.mask, attend(q, k, v, layout, SparsityConfig(mode="nabla", threshold=0.5)).mask)
    assert q.grad is not None and torch.isfinite(q.grad).all()


def test_cuda_training_refuses_64_token_blocks_in_one_line():
    with pytest.raises(ValueError, match=r"^config: block_size 64 cannot train on CUDA .*use block_size: 128") as err:
        check_trainable(SparsityConfig(mode="nabla", block_size=64, query_block_size=128), "cuda")
    assert "\n" not in str(err.value)
    check_trainable(SparsityConfig(mode="nabla", block_size=128), "cuda")
    check_trainable(SparsityConfig(mode="nabla", block_size=64), "cpu")
    check_trainable(SparsityConfig(mode="full", block_size=64), "cuda")


# --- the patched tiny Wan2.1 under autograd ---

@pytest.fixture(scope="module")
def transformer(tiny_model):
    return load_pipeline(str(tiny_model), device="cpu").transformer


def batch(gen, frames=3):
    # token grid (frames, 8, 10): W is not a multiple of the 8-token tile
    return (torch.randn(2, 16, frames, 16, 20, generator=gen), torch.tensor([700.0, 150.0]),
            torch.randn(2, 9, 32, generator=gen))


def loss_and_grads(transformer, inputs, target):
    transformer.zero_grad(set_to_none=True)
    out = transformer(*inputs, return_dict=False)[0]
    loss = torch.nn.functional.mse_loss(out, target)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in transformer.named_parameters() if p.grad is not None}


def patched(transformer, config, fn):
    handle = patch_transformer(transformer, config)
    try:
        return fn(handle)
    finally:
        unpatch(transformer)


def test_threshold_one_gives_the_unpatched_parameter_gradients(transformer, gen):
    inputs, target = batch(gen), torch.randn(2, 16, 3, 16, 20, generator=gen)
    loss, grads = loss_and_grads(transformer, inputs, target)
    config = SparsityConfig(mode="nabla", threshold=1.0)
    (p_loss, p_grads), density = patched(transformer, config, lambda h: (loss_and_grads(transformer, inputs, target),
                                                                         h.state.mean_density()))
    assert density == pytest.approx(1.0) and grads.keys() == p_grads.keys() and len(grads) > 20
    torch.testing.assert_close(p_loss, loss, atol=1e-6, rtol=1e-5)
    for name, grad in grads.items():
        torch.testing.assert_close(p_grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("config", [SparsityConfig(mode="nabla", threshold=0.4),
                                    SparsityConfig(mode="nabla+sta", threshold=0.2, sta_window=(1, 1, 1),
                                                   block_size=128)], ids=["nabla", "nabla+sta-128"])
def test_gradient_checkpointing_gives_the_same_gradients(transformer, config, gen):
    inputs, target = batch(gen), torch.randn(2, 16, 3, 16, 20, generator=gen)

    def run(handle):
        plain = loss_and_grads(transformer, inputs, target)
        density = handle.state.mean_density()
        transformer.enable_gradient_checkpointing()
        try:
            checkpointed = loss_and_grads(transformer, inputs, target)
        finally:
            transformer.disable_gradient_checkpointing()
        return plain, checkpointed, density, len(handle.state.records.densities)

    (loss, grads), (c_loss, c_grads), density, calls = patched(transformer, config, run)
    # 2 layers plain; 2 in the checkpointed forward and 2 more where backward recomputed the blocks
    assert density < 0.9 and calls == 2 + 2 * 2
    torch.testing.assert_close(c_loss, loss)
    for name, grad in grads.items():
        torch.testing.assert_close(c_grads[name], grad, msg=name)


def test_adam_steps_on_the_sparse_patched_model_lower_the_loss(tiny_model, gen):
    transformer = load_pipeline(str(tiny_model), device="cpu").transformer.train()
    inputs, target = batch(gen), torch.randn(2, 16, 3, 16, 20, generator=gen)
    optimizer = torch.optim.Adam(transformer.parameters(), lr=3e-3)

    def train(handle):
        losses = []
        for _ in range(6):
            loss, _ = loss_and_grads(transformer, inputs, target)
            optimizer.step()
            losses.append(float(loss))
        return losses, handle.state

    losses, state = patched(transformer, SparsityConfig(mode="nabla", threshold=0.4, dense_steps=10), train)
    # every forward under autograd is a step of its own, sparse (dense_steps counts denoising steps only)
    assert state.step == 5 and len(state.records.densities) == 6 * 2 and state.mean_density() < 0.9
    assert losses[-1] < 0.9 * losses[0]
