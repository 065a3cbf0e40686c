"""Compilation without recompiles (CPU inductor): the compiled sparse path across masks, and the patched
tiny Wan2.1 with compiled repeated blocks across denoising steps, layers and CFG passes."""

import pytest
import torch
import torch.nn.functional as F

from nabla import SparsityConfig, TileLayout, sparse_attention
from nabla.block_mask import build_block_mask
from wan.attention.patch import patch_transformer
from wan.models.tiny import build_tiny_pipeline


@pytest.fixture
def recompile_guard():
    """The test sets torch._dynamo.config.error_on_recompile once its first compilation is done; reset after."""
    yield
    torch._dynamo.config.error_on_recompile = False


def test_compiled_sparse_attention_compiles_once_across_masks(gen, recompile_guard):
    layout = TileLayout(2, 10, 13)  # padded: the padding mask_mod runs too
    config = SparsityConfig(mode="nabla+sta", threshold=0.5, sta_window=(1, 1, 3), max_density=0.6)

    def fresh():
        return [layout.tile(torch.randn(1, 2, layout.length, 16, generator=gen), dim=2) for _ in range(3)]

    sparse_attention(*fresh(), layout, config, compiled=True)  # compiles the mask builder and flex_attention
    torch._dynamo.config.error_on_recompile = True
    masks = []
    for _ in range(3):  # new inputs, so new masks of the same shape: no recompilation
        q, k, v = fresh()
        out = sparse_attention(q, k, v, layout, config, compiled=True)
        keep = build_block_mask(q, k, layout, config)
        token = keep.repeat_interleave(64, -1).repeat_interleave(64, -2) & layout.valid
        ref = F.scaled_dot_product_attention(q, k, v, attn_mask=token)
        torch.testing.assert_close(out[:, :, layout.valid], ref[:, :, layout.valid], atol=2e-5, rtol=1e-4)
        masks.append(keep)
    assert not torch.equal(masks[0], masks[1])


def test_compiled_blocks_run_every_step_without_recompiling(recompile_guard):
    pipe = build_tiny_pipeline()
    pipe.set_progress_bar_config(disable=True)

    def latents(steps):
        with torch.inference_mode():
            return pipe(prompt="a cat plays piano", height=64, width=96, num_frames=9, num_inference_steps=steps,
                        guidance_scale=5.0, generator=torch.Generator().manual_seed(0), output_type="latent").frames

    patch = patch_transformer(pipe.transformer, SparsityConfig(mode="nabla", threshold=0.5))
    eager = latents(3)
    pipe.transformer.compile_repeated_blocks()
    # one graph for both blocks: nothing per layer (such as the processor's layer index) may be guarded on
    torch._dynamo.config.error_on_recompile = True
    latents(1)  # the first call compiles
    patch.state.reset()
    compiled = latents(3)  # 3 steps x 2 CFG passes x 2 layers, each with its own mask
    assert len(patch.state.records.densities) == 12 and patch.state.mean_density() < 1
    torch.testing.assert_close(compiled, eager, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("config", [SparsityConfig(mode="nabla", threshold=0.5),
                                    SparsityConfig(mode="sta", sta_window=(1, 1, 1), dense_steps=1)],
                         ids=["nabla", "sta-dense-first"])
def test_patched_block_compiles_into_one_graph(config):
    """Attention is an op inside the compiled block, on sparse and dense steps: no graph break (which would keep
    the block's normalised input alive through attention), same output as eager."""
    pipe = build_tiny_pipeline()
    pipe.set_progress_bar_config(disable=True)

    def latents():
        with torch.inference_mode():
            return pipe(prompt="a cat plays piano", height=64, width=96, num_frames=9, num_inference_steps=2,
                        guidance_scale=5.0, generator=torch.Generator().manual_seed(0), output_type="latent").frames

    patch = patch_transformer(pipe.transformer, config)
    eager = latents()
    patch.state.reset()
    pipe.transformer.blocks[1].compile(fullgraph=True)  # blocks[0] carries the patch's pass-counting hook
    compiled = latents()
    torch.testing.assert_close(compiled, eager, atol=1e-4, rtol=1e-4)
    assert [calls for _, calls in patch.state.records.passes] == [2] * 4  # 2 steps x 2 CFG passes, both layers counted
