"""CUDA-only checks, run on a machine with a CUDA GPU (`python -m pytest -q tests/test_gpu.py`); CI has no GPU and skips them."""

import pytest
import torch

from nabla.attention import sparse_attention
from nabla.backend import flash_unavailable_reason, resolve_backend
from nabla.block_mask import (
    _compiled_block_mask_tensors,
    attended_mask,
    build_block_mask,
    kernel_block_indices,
    mask_inputs,
)
from nabla.config import SparsityConfig
from nabla.layout import TileLayout
from nabla.logits_kernel import means_logits_tf32x3
from nabla.masks import cdf_keep_sorted, density_bounds, means_logits, pool_blocks, pooled_logits

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
# Wan2.1 1.3B 480p and 14B 720p token grids, 81 frames
WAN_SHAPES = {"1.3B-480p": (12, 21, 30, 52), "14B-720p": (40, 21, 45, 80)}


def small_transformer(heads: int = 4):
    """A two-block Wan transformer of the real head size (128), on the current device (float32)."""
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=heads, attention_head_dim=128, in_channels=16, out_channels=16,
        text_dim=64, freq_dim=256, ffn_dim=256, num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
        eps=1e-6, rope_max_seq_len=1024)


def qkv(heads: int, layout: TileLayout) -> list[torch.Tensor]:
    return [layout.tile(torch.randn(1, heads, layout.length, 128, device="cuda", dtype=torch.bfloat16), dim=2)
            for _ in range(3)]


@cuda
@pytest.mark.skipif(torch.cuda.is_available() and flash_unavailable_reason(torch.device("cuda", 0)) is not None,
                    reason="FlashAttention-4 cannot run on this GPU or is not installed")
@pytest.mark.parametrize("shape", WAN_SHAPES, ids=list(WAN_SHAPES))
@pytest.mark.parametrize("block_size", [128, 64])
def test_flash_matches_triton_at_wan_shapes(shape, block_size):
    heads, *grid = WAN_SHAPES[shape]
    layout = TileLayout(*grid)
    q, k, v = qkv(heads, layout)
    config = SparsityConfig(mode="nabla", threshold=0.4, block_size=block_size, dense_above=1.0)
    flash, stats = sparse_attention(q, k, v, layout, config.replace(backend="flash"), return_stats=True)
    triton = sparse_attention(q, k, v, layout, config.replace(backend="triton"))
    assert stats["backend"] == "flash" and 0 < stats["density"].mean() < 1
    real = layout.valid_on("cuda")
    diff = (flash - triton)[:, :, real].abs().max().item()
    assert diff <= 2e-3, f"FLASH vs Triton max abs diff {diff:.2e}"


@cuda
def test_auto_backend_picks_flash_where_it_runs():
    expected = "flash" if flash_unavailable_reason(torch.device("cuda", 0)) is None else "triton"
    assert resolve_backend("auto", "cuda") == expected


def masked_reference(q, k, v, keep, layout, block_size, rows):
    """float64 attention of the query `rows` over the keys that the block mask `keep` and `layout.valid` allow,
    written out (no SDPA kernel choice): [B, H, len(rows), D]."""
    valid = layout.valid_on(q.device)
    allowed = keep[:, :, rows // block_size].repeat_interleave(block_size, -1)[..., : layout.padded_length] & valid
    scores = (q[:, :, rows].double() @ k.double().transpose(-1, -2)) / q.shape[-1] ** 0.5
    return scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ v.double()


@cuda
@pytest.mark.parametrize("backend", ["triton", "auto"])
@pytest.mark.parametrize("block_size", [128, 64])
@pytest.mark.parametrize("grid", [(3, 20, 28), (3, 20, 32)], ids=["padding-lookup", "padding-arithmetic"])
def test_compiled_kernel_matches_masked_reference(backend, block_size, grid):
    """The compiled CUDA path against a float64 token-level reference, on padded grids (the padding mask_mod
    looking `valid` up, and its arithmetic form), every real query."""
    layout = TileLayout(*grid)
    q, k, v = qkv(4, layout)
    config = SparsityConfig(mode="nabla", threshold=0.5, block_size=block_size, backend=backend, dense_above=1.0)
    out, stats = sparse_attention(q, k, v, layout, config, return_stats=True)
    assert 0 < stats["density"].mean() < 1
    rows = layout.valid_on("cuda").nonzero().flatten()
    ref = masked_reference(q, k, v, stats["mask"], layout, block_size, rows)
    diff = (out[:, :, rows].double() - ref).abs().max().item()
    assert diff <= 2e-2, f"{stats['backend']}: max abs diff {diff:.2e} against the masked float64 reference"


@cuda
@pytest.mark.parametrize("block_size", [128, 64])
def test_nabla_at_the_14b_shape_matches_masked_reference(block_size):
    """The real 14B 720p shape (80,640 tokens in tiles, 40 heads) on the auto backend, checked on 256 query rows."""
    heads, *grid = WAN_SHAPES["14B-720p"]
    layout = TileLayout(*grid)
    q, k, v = qkv(heads, layout)
    config = SparsityConfig(mode="nabla", threshold=0.4, block_size=block_size, dense_above=1.0)
    out, stats = sparse_attention(q, k, v, layout, config, return_stats=True)
    real = layout.valid_on("cuda").nonzero().flatten()
    rows = real[torch.randperm(len(real), device="cuda")[:256]]
    ref = masked_reference(q, k, v, stats["mask"], layout, block_size, rows)
    diff = (out[:, :, rows].double() - ref).abs().max().item()
    assert diff <= 2e-2, f"{stats['backend']}: max abs diff {diff:.2e} against the masked float64 reference"


@cuda
@pytest.mark.parametrize("shape", WAN_SHAPES, ids=list(WAN_SHAPES))
@pytest.mark.parametrize("block_size", [128, 64])
def test_pooled_logits_kernel_is_as_accurate_as_float32(shape, block_size):
    """The tensor-core (3xTF32) pooled logits against float64: no further off than cuBLAS's float32 matmul."""
    heads, *grid = WAN_SHAPES[shape]
    layout = TileLayout(*grid)
    q, k, _ = qkv(heads, layout)
    means = [pool_blocks(x, block_size, layout.valid_on("cuda"))[0] for x in (q, k)]
    ref = means_logits(*(m.double() for m in means))
    fp32_error = (means_logits(*means).double() - ref).abs().max().item()
    error = (means_logits_tf32x3(*means).double() - ref).abs().max().item()
    assert error <= 4 * fp32_error + 1e-7 * ref.abs().max().item(), (error, fp32_error)


@cuda
def test_mask_build_takes_head_dims_the_logits_kernel_does_not():
    """Head dim 96 (not a power of two) takes the torch matmul on CUDA: the same mask as the CPU path."""
    layout = TileLayout(3, 16, 24)
    q, k = (torch.randn(2, 3, layout.padded_length, 96, device="cuda") for _ in range(2))
    config = SparsityConfig(mode="nabla", threshold=0.7)
    on_cuda, on_cpu = build_block_mask(q, k, layout, config), build_block_mask(q.cpu(), k.cpu(), layout, config)
    assert 0 < on_cpu.float().mean() < 1
    assert (on_cuda.cpu() != on_cpu).float().mean() < 1e-3  # only near-ties at the cut may differ


@cuda
@pytest.mark.parametrize("shape", WAN_SHAPES, ids=list(WAN_SHAPES))
@pytest.mark.parametrize("mode", ["nabla", "nabla+sta"])
@pytest.mark.parametrize("query_block", [None, 128])
def test_fused_mask_kernel_matches_sorting_at_wan_shapes(shape, mode, query_block):
    """The one-kernel mask build (softmax, cut, STA union, indices) against sorting, on the GPU's own pooled logits."""
    heads, *grid = WAN_SHAPES[shape]
    layout = TileLayout(*grid)
    q, k, _ = qkv(heads, layout)
    config = SparsityConfig(mode=mode, threshold=0.4, block_size=64, sta_window=(3, 3, 3), max_density=0.2,
                            query_block_size=query_block)
    valid, _, partial, sta, *_ = inputs = mask_inputs(layout, config, q.device)
    keep, partial_counts, partial_idx, full_counts, full_idx = _compiled_block_mask_tensors()(q, k, False, inputs)
    # as the patched block runs it: from the block means of q and k, index rows as wide as FLASH needs
    means = [pool_blocks(x, 64, valid)[0] for x in (q, k)]
    keep_from_means, *compact = _compiled_block_mask_tensors()(*means, True, mask_inputs(layout, config, q.device, True))
    assert (keep != keep_from_means).float().mean().item() < 1e-5
    if torch.equal(keep, keep_from_means):
        for count, idx, narrow_count, narrow_idx in ((partial_counts, partial_idx, *compact[:2]),
                                                     (full_counts, full_idx, *compact[2:])):
            width = narrow_idx.shape[-1]
            assert torch.equal(narrow_count, count) and int(count.max()) <= width < idx.shape[-1]
            assert torch.equal(narrow_idx, idx[..., :width])
    logits, empty = pooled_logits(q, k, 64, valid)
    probs = logits.masked_fill(empty, float("-inf")).softmax(-1)
    ref = cdf_keep_sorted(probs, 0.4, *density_bounds(probs.shape[-1], None, 0.2))
    if sta is not None:
        ref = ref | sta
    mismatch = (keep != ref).float().mean().item()
    assert mismatch < 1e-5, f"{mismatch:.2e} of the blocks differ from sorting"  # near-ties at the cut only
    expected = kernel_block_indices(keep, partial, config.query_merge)
    for counts, idx, ref_counts, ref_idx in ((partial_counts, partial_idx, *expected[:2]),
                                             (full_counts, full_idx, *expected[2:])):
        assert torch.equal(counts, ref_counts)
        taken = torch.arange(idx.shape[-1], device="cuda") < counts.unsqueeze(-1)
        assert torch.equal(idx[taken], ref_idx[taken])


@cuda
@pytest.mark.parametrize("backend", ["triton", "auto"])
@pytest.mark.parametrize("shape", ["padded", "14B-720p"])
def test_merged_query_blocks_match_masked_reference(backend, shape):
    """64-token mask rows two by two in 128-row kernel blocks, attending their union, against float64."""
    heads, *grid = (4, 3, 20, 28) if shape == "padded" else WAN_SHAPES[shape]
    layout = TileLayout(*grid)
    q, k, v = qkv(heads, layout)
    config = SparsityConfig(mode="nabla", threshold=0.4, max_density=0.2, backend=backend, dense_above=1.0,
                            query_block_size=128)
    out, stats = sparse_attention(q, k, v, layout, config, return_stats=True)
    assert (stats["kernel_density"] > stats["density"]).all()
    rows = layout.valid_on("cuda").nonzero().flatten()
    if shape != "padded":
        rows = rows[torch.randperm(len(rows), device="cuda")[:256]]
    ref = masked_reference(q, k, v, attended_mask(stats["mask"], 2), layout, 64, rows)
    diff = (out[:, :, rows].double() - ref).abs().max().item()
    assert diff <= 2e-2, f"{stats['backend']}: max abs diff {diff:.2e} against the masked float64 reference"


@cuda
@pytest.mark.parametrize("block_size", [128, 64])
def test_compiled_patched_blocks_match_eager_blocks(block_size):
    """The patched transformer with compiled blocks (the processor's gathers, rotary and block means in inductor's
    kernels) against the same blocks run eagerly, float32 so that both keep the same blocks; a padded grid."""

    from wan.api import compile_blocks
    from wan.attention.patch import patch_transformer, unpatch

    torch.manual_seed(0)
    with torch.device("cuda"):
        transformer = small_transformer().eval()
        latents = torch.randn(1, 16, 3, 90, 64)  # token grid (3, 45, 32): padded to (3, 48, 32)
        text, timestep = torch.randn(1, 16, 64), torch.tensor([500.0])
    config = SparsityConfig(mode="nabla", threshold=0.7, block_size=block_size, max_density=0.3, backend="triton",
                            dense_above=1.0)
    handle = patch_transformer(transformer, config)
    try:
        with torch.inference_mode():
            eager = transformer(latents, timestep, text, return_dict=False)[0]
            eager_density = handle.state.mean_density()
            handle.state.reset()
            compile_blocks(transformer)
            compiled = transformer(latents, timestep, text, return_dict=False)[0]
    finally:
        unpatch(transformer)
    assert 0.05 < eager_density < 0.5 and handle.state.mean_density() == pytest.approx(eager_density)
    assert len(handle.state.records.densities) == 2 and not handle.state.records.dense_fallbacks
    torch.testing.assert_close(compiled, eager, atol=1e-3, rtol=1e-3)


@cuda
@pytest.mark.parametrize("shape", WAN_SHAPES, ids=list(WAN_SHAPES))
@pytest.mark.parametrize("block_size", [128, 64])
def test_tiled_qk_kernels_match_the_torch_path_at_wan_shapes(shape, block_size):
    """wan/attention/tiled_qk.py against the processor's torch ops (gather, RMSNorm across heads, rotary, pool_blocks), bf16."""
    from nabla.layout import gather_tiles
    from wan.attention.processor import block_means
    from wan.attention.tiled_qk import tiled_qk
    from wan.models.wan import rotate_pairwise as _apply_rotary_pairwise

    heads, *grid = WAN_SHAPES[shape]
    layout = TileLayout(*grid)
    L, dim = layout.length, 128
    torch.manual_seed(0)
    with torch.device("cuda"):
        x = (torch.randn(1, L, heads * dim) * 2 + 0.3).bfloat16()
        norm = torch.nn.RMSNorm(heads * dim, eps=1e-6).bfloat16()
        norm.weight.data = torch.randn(heads * dim).bfloat16()
        rotary = tuple(layout.tile(torch.randn(1, L, 1, dim), dim=1) for _ in range(2))
    gather = layout.on("cuda", "raster_index")
    with torch.inference_mode():
        out, means = tiled_qk(x, norm, rotary, gather, heads, block_size, True)
        ref = _apply_rotary_pairwise(norm(gather_tiles(x, gather, dim=1)).unflatten(2, (heads, -1)), *rotary)
        ref_means = block_means(ref, block_size, layout.on("cuda", "valid"))
    err = (out.float() - ref.float()).abs()
    # float32 sums in another order: a bf16 rounding apart, rarely
    assert (err <= 2.0 ** -7 * (ref.float().abs() + ref.float().abs().amax(-1, keepdim=True))).all(), float(err.max())
    assert (err > 0).float().mean() < 0.01, float((err > 0).float().mean())
    # a bf16 rounding (up to 0.125 at these magnitudes) in one of 64 or 128 tokens moves a mean by up to 2e-3
    torch.testing.assert_close(means, ref_means, atol=4e-3, rtol=1e-3)


# --- training: flex_attention's backward ---

def check_training_call(layout, config, heads=2):
    from nabla.attention import attend
    from wan.benchmarking import masked_reference

    q, k, v = (x.requires_grad_() for x in qkv(heads, layout))
    result = attend(q, k, v, layout, config)
    assert not result.dense and float(result.density.mean()) < 0.6
    real = layout.valid_on(q.device)
    grad_out = torch.randn_like(result.out)
    grads = torch.autograd.grad(result.out[:, :, real], (q, k, v), grad_out[:, :, real])
    ref, ref_grads = masked_reference(q, k, v, result.mask, layout, config, grad_out)
    assert (result.out[:, :, real].float() - ref).abs().max() < 2e-2 * ref.abs().max()
    for grad, ref_grad in zip(grads, ref_grads):
        assert (grad.float() - ref_grad).abs().max() < 2e-2 * ref_grad.abs().max()


@cuda
@pytest.mark.parametrize("backend", ["flash", "triton"])
@pytest.mark.parametrize("shape", list(WAN_SHAPES))
def test_gradients_match_float32_reference_at_wan_shapes(backend, shape):
    """Both kernels' backward at the real sequence lengths (2 heads), 128-token blocks, padded grids."""
    if backend == "flash" and flash_unavailable_reason(torch.device("cuda", 0)) is not None:
        pytest.skip("FlashAttention-4 does not run here")
    _, T, H, W = WAN_SHAPES[shape]
    check_training_call(TileLayout(T, H, W), SparsityConfig(mode="nabla", threshold=0.7, block_size=128,
                                                            max_density=0.1, backend=backend, dense_above=1.0))


@cuda
@pytest.mark.parametrize("mode", ["nabla", "nabla+sta"])
def test_flash_trains_on_a_grid_without_padding(mode):
    """No padding, so no key block is partial: FLASH must still apply the block mask forward and backward (with a
    trivial mask_mod torch 2.11's FLASH ignores it and computes dense attention)."""
    if flash_unavailable_reason(torch.device("cuda", 0)) is not None:
        pytest.skip("FlashAttention-4 does not run here")
    layout = TileLayout(3, 32, 48)
    assert not layout.has_padding
    check_training_call(layout, SparsityConfig(mode=mode, threshold=0.3, block_size=128, sta_window=(1, 1, 1),
                                               backend="flash", dense_above=1.0))


@cuda
def test_compiled_patched_blocks_train_without_recompiles():
    """The patched transformer with compiled blocks under autograd: three Adam steps, no recompile after the first,
    the loss falls, the masks are sparse."""

    from wan.api import disable_nabla, enable_nabla

    torch.manual_seed(0)
    with torch.device("cuda"):
        transformer = small_transformer().to(torch.bfloat16).train()
        latents, target = torch.randn(2, 1, 16, 3, 90, 64, dtype=torch.bfloat16)  # grid (3, 45, 32): padded
        text, timestep = torch.randn(1, 16, 64, dtype=torch.bfloat16), torch.tensor([500.0])
    transformer.enable_gradient_checkpointing()
    handle = enable_nabla(transformer, SparsityConfig(mode="nabla", threshold=0.5, block_size=128, max_density=0.3),
                          compile=True)
    optimizer = torch.optim.AdamW(transformer.parameters(), lr=1e-3)
    losses = []
    try:
        for step in range(3):
            torch._dynamo.config.error_on_recompile = step > 0
            out = transformer(latents, timestep, text, return_dict=False)[0]
            loss = torch.nn.functional.mse_loss(out.float(), target.float())
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
    finally:
        torch._dynamo.config.error_on_recompile = False
        disable_nabla(transformer)
    assert losses[-1] < losses[0] and all(map(torch.isfinite, map(torch.tensor, losses)))
    assert 0.05 < handle.state.mean_density() < 0.5


def training_batch() -> dict[str, torch.Tensor]:
    """A trainer's batch for `small_transformer`: 3 latent frames of 90 x 64 (45 x 32 tokens, padded to 48 rows)."""
    with torch.device("cuda"):
        return {"hidden_states": torch.randn(1, 16, 3, 90, 64, dtype=torch.bfloat16), "timestep": torch.tensor([700.0]),
                "encoder_hidden_states": torch.randn(1, 16, 64, dtype=torch.bfloat16),
                "target": torch.randn(1, 16, 3, 90, 64)}


@cuda
@pytest.mark.parametrize("mode", ["full", "sta", "nabla"])
def test_compiled_full_fine_tuning_gives_the_eager_gradients(mode):
    """Full fine-tuning as the trainer runs it (float32 weights, bf16 autocast, checkpointing, compiled blocks under
    TRAINING_COMPILE_OPTIONS) gives every parameter the gradient that the eager blocks give: inductor's mix-order
    reduction got Wan's scale_shift_table wrong (pytorch#193061; with the attention's graph break, a shape error).
    NABLA picks its mask from q and k, which compiling moves by rounding, so there only the run and finite
    gradients are checked; STA's mask is fixed."""
    import copy

    from wan.train.config import SparsitySchedule
    from wan.train.sparsity_schedule import SparseAttention
    from wan.train.trainer import sample_losses

    torch.manual_seed(0)
    with torch.device("cuda"):
        eager = small_transformer(heads=2).train()
    batch = training_batch()
    compiled = copy.deepcopy(eager)
    sparsity = {"full": SparsityConfig(), "sta": SparsityConfig(mode="sta", sta_window=(1, 3, 3), block_size=128),
                "nabla": SparsityConfig(mode="nabla", threshold=0.5, max_density=0.3, block_size=128)}[mode]
    grads = []
    for transformer, compile in ((eager, False), (compiled, True)):
        transformer.enable_gradient_checkpointing()
        SparseAttention(transformer, sparsity, SparsitySchedule(), compile=compile).start_step(0)
        sample_losses(transformer, batch).mean().backward()
        grads.append({name: p.grad for name, p in transformer.named_parameters()})
    for name, grad in grads[1].items():
        assert grad is not None and torch.isfinite(grad).all(), name
        if mode != "nabla":
            assert (grad - grads[0][name]).norm() <= 0.05 * grads[0][name].norm(), name


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tiled_qk_backward_matches_the_torch_path_at_the_14b_shape(dtype):
    """The q/k kernels' input gradient (from their output: the projections are not kept) against autograd through the
    processor's torch path, at 14B 720p's head layout on 3 frames (45 token rows padded to 48)."""
    from nabla.layout import gather_tiles
    from wan.attention.tiled_qk import tiled_qk
    from wan.models.wan import rotate_pairwise as _apply_rotary_pairwise

    torch.manual_seed(0)
    layout, heads, dim = TileLayout(3, 45, 80), 40, 128
    L, C = layout.length, heads * dim
    x = (torch.randn(1, L, C, device="cuda") * 3).to(dtype).requires_grad_()
    norm = torch.nn.RMSNorm(C, eps=1e-6).to("cuda", dtype).requires_grad_(False)
    norm.weight.data = (torch.rand(C, device="cuda") + 0.5).to(dtype)
    angles = torch.rand(1, L, 1, dim // 2, device="cuda") * 6.3
    cos, sin = (layout.tile(f(angles).repeat_interleave(2, -1), dim=1) for f in (torch.cos, torch.sin))
    out, _ = tiled_qk(x, norm, (cos, sin), layout.raster_index.cuda(), heads, 128, True)
    weights = torch.randn(out.shape, device="cuda") * layout.valid.cuda()[None, :, None, None]
    (out.float() * weights).sum().backward()
    ref_x = x.detach().float().requires_grad_()  # the float32 reference
    ref = _apply_rotary_pairwise(norm.float()(gather_tiles(ref_x, layout.raster_index.cuda(), dim=1))
                                 .unflatten(2, (heads, -1)), cos, sin)
    (ref * weights).sum().backward()
    err, scale = (x.grad.float() - ref_x.grad).abs().max(), ref_x.grad.abs().max()
    assert err <= {torch.float32: 1e-4, torch.bfloat16: 0.02}[dtype] * scale, (float(err), float(scale))


def saved_bytes(transformer, batch) -> int:
    """Bytes of the distinct storages that one forward saves for its backward, the weights left out."""
    from wan.train.trainer import sample_losses

    weights = {p.untyped_storage().data_ptr() for p in transformer.parameters()}
    saved = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = sample_losses(transformer, batch).mean()
    loss.backward()
    return sum(saved.values())


@cuda
def test_nabla_lora_training_saves_less_than_dense():
    """A compiled block training a LoRA under NABLA saves less than the stock compiled block, on a padded grid (45
    token rows a frame, 48 in tile order): the q/k kernels' backward keeps no copy of q's and k's projections, which
    outweighs the padding of q, k, v and the output and the BlockMask's index rows."""
    import copy

    from wan.models.loading import keep_fp32_modules
    from wan.train.config import SparsitySchedule, TrainingConfig
    from wan.train.sparsity_schedule import SparseAttention
    from wan.train.trainer import make_trainable

    torch.manual_seed(0)
    training = TrainingConfig(method="lora", rank=4, alpha=4, height=720, width=512, frames=9,
                              gradient_checkpointing=False)
    # bf16 weights, the modules that from_pretrained keeps in float32 (rope's tables among them) kept so
    stock = make_trainable(keep_fp32_modules(small_transformer(heads=4).cuda().to(torch.bfloat16)), training)
    patched = copy.deepcopy(stock)
    batch = training_batch()
    nabla = SparsityConfig(mode="nabla", threshold=0.5, max_density=0.3, block_size=128, backend="auto")
    sizes = []
    for transformer, sparsity in ((stock, SparsityConfig()), (patched, nabla)):
        SparseAttention(transformer, sparsity, SparsitySchedule(), compile=True).start_step(0)
        saved_bytes(transformer, batch)  # compiles
        sizes.append(saved_bytes(transformer, batch))
    assert sizes[1] < sizes[0], sizes
