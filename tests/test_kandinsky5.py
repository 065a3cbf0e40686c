"""NABLA patched into a real diffusers Kandinsky 5 transformer (tiny random, CPU, float32), against the stock model
and against diffusers' own NABLA path (the authors' nablaT_v2) computed correctly."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import DiffusionPipeline, Kandinsky5T2VPipeline
from diffusers.models.attention_dispatch import _AttentionBackendRegistry
from diffusers.models.transformers import transformer_kandinsky
from diffusers.models.transformers.transformer_kandinsky import Kandinsky5AttnProcessor
from PIL import Image
from torch.nn.attention.flex_attention import BlockMask

import wan.attention.processor
from nabla import SparsityConfig
from scripts import bench_e2e, bench_kandinsky5
from wan.api import disable_nabla, enable_nabla
from wan.attention.patch import patch_transformer, unpatch
from wan.attention.processor import NablaWanAttnProcessor
from wan.models import make_tiny, random_kandinsky5, tiny_kandinsky5
from wan.models.kandinsky5 import trained_config
from wan.models.tiny_kandinsky5 import tiny_transformer

# latents 64x64 -> tokens 32x32 a frame -> 4x4 tiles: STA's 3x3 tile window is narrower than the grid
FRAMES, SIDE, TEXT_TOKENS = 2, 64, 5


@pytest.fixture(scope="module")
def transformer():
    torch.manual_seed(0)
    return tiny_transformer()


def forward_args(transformer, frames=FRAMES, height=SIDE, width=SIDE, seed=0):
    """The keyword arguments of one transformer forward, as Kandinsky5T2VPipeline passes them (its sparse_params
    included: the stock model then runs diffusers' NABLA path)."""
    gen = torch.Generator().manual_seed(seed)
    latents = torch.randn(1, frames, height, width, 4, generator=gen)
    owner = SimpleNamespace(transformer=transformer, fast_sta_nabla=Kandinsky5T2VPipeline.fast_sta_nabla)
    # diffusers' own path needs whole 8x8-token tiles
    whole = height // 2 % 8 == width // 2 % 8 == 0
    sparse = Kandinsky5T2VPipeline.get_sparse_params(owner, latents, "cpu") if whole else None
    return {"hidden_states": latents, "encoder_hidden_states": torch.randn(1, TEXT_TOKENS, 16, generator=gen),
            "timestep": torch.tensor([700.0]), "pooled_projections": torch.randn(1, 32, generator=gen),
            "visual_rope_pos": [torch.arange(frames), torch.arange(height // 2), torch.arange(width // 2)],
            "text_rope_pos": torch.arange(TEXT_TOKENS), "scale_factor": (1.0, 2.0, 2.0), "sparse_params": sparse}


def run(transformer, args, config=None, **patch):
    """The transformer's output for `args`, patched for `config` (None: stock)."""
    handle = None if config is None else patch_transformer(transformer, config, **patch)
    try:
        with torch.no_grad():
            return transformer(**args).sample, handle
    finally:
        unpatch(transformer)


def dense_args(args):
    return {**args, "sparse_params": None}


@pytest.fixture(scope="module")
def stock_dense(transformer):
    return run(transformer, dense_args(forward_args(transformer)))[0]


def test_mode_full_and_threshold_one_are_the_stock_model(transformer, stock_dense):
    args = forward_args(transformer)
    full, handle = run(transformer, args, SparsityConfig(mode="full"), always=True)
    assert torch.equal(full, stock_dense)  # raster order, diffusers' arithmetic: bit for bit
    assert handle.state.records.passes == [[0, 2]]  # both visual blocks went through the patch
    ones, handle = run(transformer, args, SparsityConfig(mode="nabla", threshold=1.0))
    assert abs(handle.state.mean_density() - 1.0) < 1e-6
    # tile order sums attention in another order (float32 rounding), which can flip the next block's bf16 rounding
    # of a q or k element (diffusers rounds them after the rotary embedding): a few elements move by more
    torch.testing.assert_close(ones, stock_dense, atol=2e-4, rtol=1e-4)


def _token_mask_attention(query, key, value, attn_mask=None, **_):
    """diffusers' dispatch_attention_fn as NABLA means it: SDPA under the token-level expansion of a BlockMask.
    (Eager flex_attention ignores the sparsity of nablaT_v2's BlockMask, whose mask_mod is None.)"""
    mask = None
    if isinstance(attn_mask, BlockMask):
        size = attn_mask.BLOCK_SIZE[0]
        mask = attn_mask.to_dense().bool().repeat_interleave(size, -1).repeat_interleave(size, -2)
    q, k, v = (x.transpose(1, 2) for x in (query, key, value))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2)


def test_trained_config_is_diffusers_nabla_path(transformer, stock_dense, monkeypatch):
    args = forward_args(transformer)
    theirs, ours = [], []
    nabla_t_v2 = transformer_kandinsky.nablaT_v2
    monkeypatch.setattr(transformer_kandinsky, "nablaT_v2",
                        lambda *a, **k: theirs.append(nabla_t_v2(*a, **k)) or theirs[-1])
    monkeypatch.setattr(transformer_kandinsky, "dispatch_attention_fn", _token_mask_attention)
    reference = run(transformer, args)[0]
    attend = wan.attention.processor.attend
    monkeypatch.setattr(wan.attention.processor, "attend", lambda *a, **k: ours.append(attend(*a, **k)) or ours[-1])
    out, handle = run(transformer, args, trained_config(transformer.config))

    assert len(theirs) == len(ours) == 2
    for block_mask, result in zip(theirs, ours):
        assert torch.equal(block_mask.to_dense().bool(), result.mask)
    assert handle.state.mean_density() < 0.99  # a mask that drops blocks: the reference is not dense attention
    assert (reference - stock_dense).abs().max() > 1e-3
    torch.testing.assert_close(out, reference, atol=2e-4, rtol=1e-4)


def test_only_the_visual_self_attention_changes(transformer, stock_dense):
    before = {name: module.processor for name, module in transformer.named_modules() if hasattr(module, "processor")}
    handle = enable_nabla(transformer)  # no config: the trained one
    try:
        assert handle.state.config == trained_config(transformer.config)
        after = {name: module.processor for name, module in transformer.named_modules() if hasattr(module, "processor")}
        changed = sorted(name for name in before if after[name] is not before[name])
        assert changed == [f"visual_transformer_blocks.{i}.self_attention" for i in range(2)]
        assert all(isinstance(after[name], NablaWanAttnProcessor) for name in changed)
        assert all(isinstance(after[name], Kandinsky5AttnProcessor) for name in after if name not in changed)
    finally:
        disable_nabla(transformer)
    assert all(module.processor is before[name] for name, module in transformer.named_modules() if name in before)


def test_a_grid_off_the_tile_runs_padded(transformer):
    # latents 24x40 -> tokens 12x20 a frame: padded to 16x24 (2x3 tiles); diffusers' own path needs multiples of 8
    args = dense_args(forward_args(transformer, height=24, width=40))
    stock = run(transformer, args)[0]
    covering, handle = run(transformer, args, SparsityConfig(mode="sta", sta_window=(3, 5, 5)))
    assert handle.state.layout.has_padding and abs(handle.state.mean_density() - 1.0) < 1e-6
    torch.testing.assert_close(covering, stock, atol=2e-4, rtol=1e-4)  # padding neither attended nor returned
    narrow, handle = run(transformer, args, SparsityConfig(mode="sta", sta_window=(1, 1, 1)))
    assert handle.state.mean_density() < 0.5 and (narrow - stock).abs().max() > 1e-3


def test_a_model_not_trained_with_nabla_needs_a_config():
    regular = tiny_transformer(attention={})
    assert trained_config(regular.config) is None
    with pytest.raises(ValueError, match="was not trained with NABLA, so it has no sparsity of its own; pass a config"):
        enable_nabla(regular)
    assert regular.visual_transformer_blocks[0].self_attention.processor.__class__ is Kandinsky5AttnProcessor


@pytest.mark.parametrize("family", ["kandinsky5-lite", "kandinsky5-lite-i2v"])
def test_tiny_pipelines_saved_by_the_command_run_under_their_trained_nabla(family, tmp_path, capsys):
    make_tiny.main([str(tmp_path), "--family", family])
    assert f"wrote a tiny Kandinsky 5 {'I2V' if family.endswith('i2v') else 'Lite T2V 10s'}" in capsys.readouterr().out
    pipe = DiffusionPipeline.from_pretrained(tmp_path)  # as a user loads a checkpoint before enable_nabla
    assert type(pipe) is tiny_kandinsky5.TINY[family][1]
    handle = enable_nabla(pipe)
    image = {"image": Image.new("RGB", (128, 128), (200, 120, 40))} if family.endswith("i2v") else {}
    # I2V renormalises the first 4 latent frames by the next ones: it needs 5 (17 frames), or gives NaN
    frames = 17 if image else 5
    video = pipe(prompt="a cat is playing piano", height=128, width=128, num_frames=frames, num_inference_steps=2,
                 guidance_scale=1.0, output_type="np", **image).frames
    assert video.shape == (1, frames, 128, 128, 3) and np.isfinite(video).all()
    assert {step for step, _, _ in handle.state.records.densities} == {0, 1}  # every step sparse, both blocks
    assert len(handle.state.records.densities) == 2 * 2


def test_the_benchmark_runs_every_variant_in_its_smoke_mode(capsys):
    before = _AttentionBackendRegistry.get_active_backend()[0]
    bench_kandinsky5.main(["--smoke"])
    # diffusers' set_attention_backend sets the process default too: the benchmark puts it back
    assert _AttentionBackendRegistry.get_active_backend()[0] == before
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| ")]
    assert rows[0] == "| variant | s/eval | vs dense | vs diffusers-nabla | first call s | density |"
    # FP8 needs a CUDA GPU of 8.9+: its row is skipped in one line on the CPU, the others run
    assert [row.split(" | ")[0] for row in rows[1:]] == [f"| {v}" for v in bench_kandinsky5.VARIANTS[:-2]]
    assert "skipping ours-trained-fp8: precision fp8 needs a CUDA GPU" in out
    assert "skipping ours-fast-fp8: precision fp8 needs a CUDA GPU" in out


def test_the_benchmark_prints_diffusers_density_as_ours(capsys):
    """diffusers' path's density comes from the BlockMasks nablaT_v2 builds; on the CPU (float32) its masks are ours,
    so the two columns agree but for blocks that rounding tips at the threshold. `--ours-thresholds` adds our rows at
    another P and leaves diffusers' at `--threshold`."""
    bench_kandinsky5.main(["--smoke", "--variants", "diffusers-nabla", "ours-trained", "--threshold", "0.2",
                           "--ours-thresholds", "0.1", "--height", "512", "--width", "512", "--frames", "1"])
    rows = [line.split(" | ") for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    densities = {row[0].strip("| "): float(row[-1].strip(" |")) for row in rows[1:]}
    assert list(densities) == ["diffusers-nabla", "ours-trained", "ours-trained P 0.1"]
    assert densities["ours-trained"] < 0.9 and abs(densities["diffusers-nabla"] - densities["ours-trained"]) < 0.01
    assert densities["ours-trained P 0.1"] < densities["ours-trained"] - 0.02


def test_the_benchmark_runs_fp8_last(capsys):
    for variants in (["ours-fast-fp8", "dense"], ["ours-trained-fp8", "ours-fast", "ours-fast-fp8"]):
        with pytest.raises(SystemExit):
            bench_kandinsky5.parse(["--variants", *variants])
        error = capsys.readouterr().err
        assert "quantize the transformer every variant shares, in place: put them after the others" in error
    variants = bench_kandinsky5.parse(["--variants", "dense", "ours-trained-fp8", "ours-fast-fp8"]).variants
    assert variants[-1] == "ours-fast-fp8"


def test_the_benchmarks_threshold_and_backend_reach_every_nabla_path():
    args = bench_kandinsky5.parse(["--smoke", "--threshold", "0.3", "--backend", "triton"])
    transformer = bench_kandinsky5.build(args, torch.device("cpu"))
    assert bench_kandinsky5.inputs(transformer, args, torch.device("cpu"))["sparse_params"]["P"] == 0.3
    for variant in ("ours-trained", "ours-fast"):
        handle = bench_kandinsky5.set_up(variant, transformer, args, args.threshold)[2]
        assert (handle.state.config.threshold, handle.state.config.backend) == (0.3, "triton")
        bench_kandinsky5.tear_down(variant, transformer, None)
        disable_nabla(transformer)


@pytest.mark.parametrize("arch, billions, threshold", [("k5-lite", 2.0, 0.9), ("k5-pro", 19.0, 0.7)])
def test_real_size_configs(arch, billions, threshold):
    model = random_kandinsky5.build_random_transformer(arch, "meta")  # the published sizes, without their memory
    assert abs(sum(p.numel() for p in model.parameters()) / 1e9 - billions) < 0.25 * billions
    # bf16 but what from_pretrained keeps in float32: the time embeddings and every modulation
    kept = {name for name, p in model.named_parameters() if p.dtype == torch.float32}
    assert model.dtype == torch.bfloat16 and kept == {name for name, _ in model.named_parameters()
                                                      if "time_embeddings" in name or "modulation" in name}
    assert len(random_kandinsky5.build_random_transformer(arch, "meta", layers=2).visual_transformer_blocks) == 2
    assert trained_config(model.config) == SparsityConfig(mode="nabla+sta", threshold=threshold, sta_window=(11, 3, 3),
                                                          dense_above=1.0)


def test_the_benchmarks_profile_splits_each_evaluation(capsys):
    bench_kandinsky5.main(["--smoke", "--variants", "dense", "ours-fast", "--profile"])
    lines = capsys.readouterr().out.splitlines()
    at = lines.index("| variant | kernels ms | idle ms | attention / matmul / other ms | largest kernels, ms |")
    rows = [line.split(" | ") for line in lines[at + 2:at + 4]]
    assert [row[0] for row in rows] == ["| dense", "| ours-fast"]
    for row in rows:  # on the CPU the top-level operators stand in for kernels; the groups share all of them
        groups = [float(ms) for ms in row[3].split(" / ")]
        assert float(row[1]) > 0 and sum(groups) > 0 and groups[1] > 0  # the Linear layers are matmuls


def test_the_benchmarks_flex_only_compile_is_undone():
    """`--diffusers-compile flex` compiles the flex_attention that diffusers' dispatch calls, and only for its row."""
    args = bench_kandinsky5.parse(["--smoke"])
    args.diffusers_compile = "flex"
    transformer = bench_kandinsky5.build(args, torch.device("cpu"))
    before = _AttentionBackendRegistry.get_active_backend()[0]
    model, _, handle = bench_kandinsky5.set_up("diffusers-nabla", transformer, args, args.threshold)
    assert model is transformer and bench_kandinsky5.FLEX.flex_attention is handle  # reads the masks' density
    assert handle.flex is not bench_kandinsky5.EAGER_FLEX
    bench_kandinsky5.tear_down("diffusers-nabla", transformer, before)
    assert bench_kandinsky5.FLEX.flex_attention is bench_kandinsky5.EAGER_FLEX
    assert _AttentionBackendRegistry.get_active_backend()[0] == before


def test_the_text_encoder_at_real_head_size_encodes():
    """The real-size random pipelines' Qwen2.5-VL (heads of 128 channels): its rotary sections must add up to half a
    head, which the tiny one's [1, 1, 2] did only at head size 8 (make_random_model's pipeline failed in generate)."""
    tokenizer = tiny_kandinsky5.qwen_tokenizer()
    encoder = tiny_kandinsky5.qwen_encoder(tokenizer, width=256)
    out = encoder(**tokenizer("a red fox", return_tensors="pt"), output_hidden_states=True)
    assert out.hidden_states[-1].shape == (1, len(tokenizer("a red fox").input_ids), 256)


def test_the_benchmark_gives_diffusers_flex_call_the_masks_block_sizes():
    seen = []
    flex = bench_kandinsky5.with_mask_block_sizes(lambda *args, **kwargs: seen.append(kwargs["kernel_options"]))
    mask = BlockMask.from_kv_blocks(torch.ones(1, 1, 2, dtype=torch.int32), torch.zeros(1, 1, 2, 2, dtype=torch.int32),
                                    BLOCK_SIZE=(64, 32))
    flex(None, block_mask=mask)
    flex(None, block_mask=mask, kernel_options={"BLOCK_M": 16})  # what the caller names stays
    flex(None, kernel_options={"BLOCK_M": 16})
    assert seen == [{"BLOCK_M": 64, "BLOCK_N": 32}, {"BLOCK_M": 16, "BLOCK_N": 32}, {"BLOCK_M": 16}]


def test_bench_e2e_hands_kandinsky5_architectures_to_their_benchmark(capsys):
    bench_e2e.main(["--arch", "k5-lite", "--smoke", "--variants", "dense"])
    rows = [line.split(" | ")[0] for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert rows[0] == "| variant" and rows[1:] == ["| dense"]
