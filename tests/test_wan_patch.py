"""NABLA patched into a real diffusers Wan transformer (tiny random checkpoint, CPU, float32)."""

import pytest
import torch

import wan.attention.processor
from nabla import SparsityConfig
from nabla.block_mask import attended_mask, build_block_mask
from nabla.layout import gather_tiles
from wan.attention.fallback import FALLBACK_STEPS
from wan.attention.patch import patch_transformer, unpatch
from wan.attention.processor import NablaWanAttnProcessor
from wan.generate.run import generate
from wan.generate.settings import GenerationSettings
from wan.models.loading import load_pipeline
from wan.models.wan import rotate_pairwise as _apply_rotary_pairwise

# 128x160 px -> latent 16x20 -> token grid (3, 8, 10): W is not a multiple of the 8-token tile.
SETTINGS = GenerationSettings(prompt="a cat plays piano", height=128, width=160, frames=9, steps=3, guidance_scale=4.0)
GATHER = gather_tiles


@pytest.fixture(scope="module")
def pipe(tiny_model):
    return load_pipeline(str(tiny_model), device="cpu")


@pytest.fixture(scope="module")
def full_video(pipe):
    return generate(pipe, SETTINGS)[0]


def run_patched(pipe, config):
    handle = patch_transformer(pipe.transformer, config)
    try:
        frames, _ = generate(pipe, SETTINGS)
        return frames, handle.state
    finally:
        unpatch(pipe.transformer)


def test_threshold_one_reproduces_full_attention(pipe, full_video):
    frames, state = run_patched(pipe, SparsityConfig(mode="nabla", threshold=1.0))
    assert frames.shape == (9, 128, 160, 3)
    assert abs(state.mean_density() - 1.0) < 1e-6
    # steps x layers attention calls, CFG passes included: 3 steps, 2 passes, 2 layers
    assert len(state.records.densities) == 3 * 2 * 2 and {s for s, _, _ in state.records.densities} == {0, 1, 2}
    assert abs(frames - full_video).max() < 1e-4


def test_low_threshold_changes_the_video(pipe, full_video):
    frames, state = run_patched(pipe, SparsityConfig(mode="nabla", threshold=0.3))
    assert state.mean_density() < 0.9
    assert abs(frames - full_video).max() > 1e-3


@pytest.mark.parametrize(
    "config",
    [SparsityConfig(mode="sta", sta_window=(1, 1, 1)), SparsityConfig(mode="nabla+sta", threshold=0.2, sta_window=(3, 1, 1))],
    ids=["sta", "nabla+sta"],
)
def test_sta_modes_are_sparse(pipe, full_video, config):
    frames, state = run_patched(pipe, config)
    assert state.mean_density() < 1.0
    assert abs(frames - full_video).max() > 1e-4


def _apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # diffusers' WanAttnProcessor rotary (interleaved pairs, float32 when cos is float32), as a reference
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = cos[..., 0::2], sin[..., 1::2]
    return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2).type_as(x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pairwise_rotary_is_diffusers_rotary_bit_for_bit(dtype, gen):
    x = torch.randn(1, 50, 3, 16, generator=gen).to(dtype)
    cos, sin = torch.randn(2, 1, 50, 1, 16, generator=gen)
    assert torch.equal(_apply_rotary_pairwise(x, cos, sin), _apply_rotary(x, cos, sin))
    assert not torch.equal(_apply_rotary_pairwise(x, cos, sin), _apply_rotary(x, cos, -sin))


@pytest.mark.parametrize("config", [SparsityConfig(mode="nabla", threshold=0.4),
                                    SparsityConfig(mode="nabla+sta", threshold=0.2, sta_window=(1, 1, 1), block_size=128),
                                    SparsityConfig(mode="nabla", threshold=0.3, query_block_size=128)],
                         ids=["nabla", "nabla+sta-128", "64-in-128"])
def test_processor_matches_stock_attention_under_the_token_mask(pipe, config, gen):
    """The processor (tile order, block means and untiling in its graph, the op between) against diffusers' own
    processor given the attended blocks as a raster-order token mask (the mask from q, k pooled separately)."""
    transformer = pipe.transformer
    attn, stock = transformer.blocks[0].attn1, transformer.blocks[0].attn1.processor
    latents = torch.randn(1, 16, 3, 16, 20, generator=gen)  # token grid (3, 8, 10): padded to (3, 8, 16)
    hidden = torch.randn(1, 240, attn.inner_dim, generator=gen)
    handle = patch_transformer(transformer, config)
    try:
        state = handle.state
        state.start_forward(latents, tuple(transformer.config.patch_size), torch.tensor([700.0]))
        with torch.no_grad():
            out = attn(hidden, rotary_emb=transformer.rope(latents))  # tiled tables: the patched rope.forward's
            rotary = type(transformer.rope).forward(transformer.rope, latents)
            q, k = (norm(x).unflatten(2, (attn.heads, -1)) for norm, x in ((attn.norm_q, attn.to_q(hidden)),
                                                                             (attn.norm_k, attn.to_k(hidden))))
            q, k = (state.layout.tile(_apply_rotary(x, *rotary), dim=1).transpose(1, 2) for x in (q, k))
            keep = attended_mask(build_block_mask(q, k, state.layout, config), config.query_merge)
            tiled = keep.repeat_interleave(config.block_size, -1).repeat_interleave(config.block_size, -2)
            raster = state.layout.on("cpu", "tile_index")
            token = tiled[..., raster, :][..., raster]
            assert 0.1 < token.float().mean() < 0.9
            reference = stock(attn, hidden, attention_mask=token, rotary_emb=rotary)
    finally:
        unpatch(transformer)
    torch.testing.assert_close(out, reference, atol=2e-5, rtol=1e-4)
    assert len(state.records.densities) == 1 and not state.records.dense_fallbacks


def test_dense_steps(pipe, full_video, monkeypatch):
    gathered = []
    monkeypatch.setattr(wan.attention.processor, "gather_tiles", lambda x, index, dim: gathered.append(x.shape) or GATHER(x, index, dim))
    frames, state = run_patched(pipe, SparsityConfig(mode="nabla", threshold=0.3, dense_steps=3))
    # dense steps stay in raster order, unpadded: the stock computation, bit for bit, and nothing tiled
    assert state.records.densities == [] and gathered == [] and (frames == full_video).all()
    _, state = run_patched(pipe, SparsityConfig(mode="nabla", threshold=0.3, dense_steps=2))
    assert {s for s, _, _ in state.records.densities} == {2}
    # only attention sees tile order: q, k of each layer (projected, before the norm), in the last step's two CFG
    # passes (v and the rotary tables are tiled otherwise); the token stream stays in raster order, unpadded
    assert gathered == [torch.Size([1, 240, 24])] * (2 * 2 * 2)


def test_layers_too_dense_to_win_run_dense_and_skip_their_masks(pipe, full_video):
    settings = SETTINGS
    config = SparsityConfig(mode="nabla", threshold=0.3, dense_above=0.01)  # every mask is denser than 1%
    handle = patch_transformer(pipe.transformer, config)
    tiled_steps = []
    hook = pipe.transformer.blocks[0].register_forward_pre_hook(
        lambda *_: tiled_steps.append((handle.state.step, handle.state.tile_indices is not None)))
    try:
        frames, _ = generate(pipe, settings.__class__(**{**vars(settings), "steps": 13}))
    finally:
        hook.remove()
        unpatch(pipe.transformer)
    state = handle.state
    # step 0 builds each layer's mask (first CFG pass) and falls back; the layer then skips its mask for
    # FALLBACK_STEPS steps; step 4 builds it again, falls back again and skips twice as long: step 12 next
    assert FALLBACK_STEPS == 4 and sorted({(s, layer) for s, layer, _ in state.records.densities}) == [
        (0, 0), (0, 1), (4, 0), (4, 1), (12, 0), (12, 1)]
    assert len(state.records.dense_fallbacks) == 13 * 2 * 2  # every call ran dense
    # q, k, v go to tile order only where a mask is built; the other steps keep the raster graph
    assert sorted({step for step, tiled in tiled_steps if tiled}) == [0, 4, 12]
    full, _ = generate(pipe, settings.__class__(**{**vars(settings), "steps": 13}))
    assert abs(frames - full).max() < 1e-4


def test_cross_attention_untouched_and_unpatch_restores(pipe):
    transformer = pipe.transformer
    before = [(b.attn1.processor, b.attn2.processor) for b in transformer.blocks]
    x = torch.randn(1, 16, 3, 16, 20)
    t, text = torch.tensor([700.0]), torch.randn(1, 9, 32)
    inner = transformer.config.num_attention_heads * transformer.config.attention_head_dim
    probe, probe_text = torch.randn(1, 50, inner), torch.randn(1, 9, inner)
    with torch.no_grad():
        reference = transformer(x, t, text, return_dict=False)[0]
        cross_reference = transformer.blocks[0].attn2(probe, probe_text)
        handle = patch_transformer(transformer, SparsityConfig(mode="nabla", threshold=0.2))
        for block, (self_attn, cross_attn) in zip(transformer.blocks, before):
            assert isinstance(block.attn1.processor, NablaWanAttnProcessor)
            assert block.attn2.processor is cross_attn
        assert torch.equal(transformer.blocks[0].attn2(probe, probe_text), cross_reference)
        patched = transformer(x, t, text, return_dict=False)[0]
        assert handle.state.mean_density() < 1 and not torch.allclose(patched, reference)
        with pytest.raises(ValueError, match="already patched"):
            patch_transformer(transformer, SparsityConfig(mode="nabla"))
        unpatch(transformer)
        assert [(b.attn1.processor, b.attn2.processor) for b in transformer.blocks] == before
        assert torch.equal(transformer(x, t, text, return_dict=False)[0], reference)


def test_full_mode_leaves_the_model_alone(pipe):
    assert patch_transformer(pipe.transformer, SparsityConfig(mode="full")) is None
    assert getattr(pipe.transformer, "_nabla_patch", None) is None


def test_a_zero_norm_weight_keeps_that_block_off_the_kernels_backward(tiny_model):
    """The q/k kernels' backward recovers the norm's input as its output over the weight: a block whose norm_q or
    norm_k weight holds a zero is marked at patch time (it then trains by the torch path)."""
    from wan.attention.processor import invertible

    transformer = load_pipeline(str(tiny_model), device="cpu").transformer
    transformer.blocks[1].attn1.norm_k.weight.data[3] = 0.0
    handle = patch_transformer(transformer, SparsityConfig(mode="nabla", threshold=0.5))
    try:
        assert [block.attn1.processor.invertible_norms for block in transformer.blocks] == [True, False]
    finally:
        unpatch(transformer)
    assert handle is not None and invertible(torch.nn.RMSNorm(4, elementwise_affine=False))
    assert not invertible(torch.nn.RMSNorm(4, device="meta"))  # offloaded: unknown values


def test_the_kernels_serve_training_only_with_frozen_invertible_norms(monkeypatch):
    """Under autograd (q's or k's projection trains) the q/k kernels' backward gives the norm weights no gradient and
    needs them free of zeros: the processor takes the kernels only then (here their device check is forced)."""
    from types import SimpleNamespace

    monkeypatch.setattr(wan.attention.processor, "fused_applies", lambda x, norm, rotary: True)
    attn = SimpleNamespace(norm_q=torch.nn.RMSNorm(8), norm_k=torch.nn.RMSNorm(8))
    plain, trains = torch.zeros(1, 2, 8), torch.zeros(1, 2, 8, requires_grad=True)

    def fused(invertible, query, key, frozen=True):
        attn.norm_q.requires_grad_(False)
        attn.norm_k.requires_grad_(not frozen)
        return NablaWanAttnProcessor(None, 0, invertible)._fused(attn, query, key, None)

    assert fused(False, plain, plain, frozen=False)  # inference: any norm
    assert fused(True, plain, trains) and fused(True, trains, plain)
    assert not fused(True, plain, trains, frozen=False)  # a norm weight that trains
    assert not fused(False, trains, plain)  # a zero in a norm weight
