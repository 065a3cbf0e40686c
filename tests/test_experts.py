"""Wan2.2 A14B's two experts (transformer, transformer_2) under NABLA, on the tiny two-expert checkpoint: the API,
generate.py, the shared step count, sparsity_2, the cache's schedule, and the pipelines NABLA refuses."""

import dataclasses
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers import (
    WanImageToVideoPipeline,
    WanPipeline,
    WanTransformer3DModel,
    WanVideoToVideoPipeline,
)
from diffusers.hooks import FirstBlockCacheConfig, TaylorSeerCacheConfig
from PIL import Image
from safetensors.torch import save_file

import wan.generate.cli
import wan.generate.session
import wan.models.loading
import wan.models.make_tiny
import wan.models.tiny
from nabla import SparsityConfig
from wan import disable_nabla, enable_nabla
from wan.generate.settings import GenerationSettings
from wan.models.experts import boundary_step, warmup_steps
from wan.speedups.cache import expert_cache

TINY = {"height": 32, "width": 32, "num_frames": 5}
SMALL = ["--height", "32", "--width", "32", "--frames", "5"]


@pytest.fixture(scope="module")
def pipe(a14b_model):
    pipe = WanPipeline.from_pretrained(str(a14b_model), dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sample(pipe, steps: int = 2) -> np.ndarray:
    return pipe("a cat plays piano", **TINY, num_inference_steps=steps, guidance_scale=5.0,
                generator=torch.Generator().manual_seed(0), output_type="np").frames[0]


@pytest.fixture(scope="module")
def stock(pipe):
    return sample(pipe)


def test_the_tiny_checkpoint_is_a14b_shaped(a14b_model, pipe):
    index = json.loads((a14b_model / "model_index.json").read_text())
    assert index["boundary_ratio"] == 0.875 and index["transformer_2"] == ["diffusers", "WanTransformer3DModel"]
    assert not torch.equal(pipe.transformer.blocks[0].attn1.to_q.weight, pipe.transformer_2.blocks[0].attn1.to_q.weight)
    # UniPC with flow shift 3 over 2 steps: timesteps 999 and 750, either side of 875
    assert boundary_step(pipe, 2) == 1 and boundary_step(pipe, 1) == 1
    assert warmup_steps(pipe, 1) == (2, 1) and warmup_steps(pipe, 2) == (4, 2)


def test_an_unknown_family_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        wan.models.make_tiny.main([str(tmp_path / "m"), "--family", "wan3"])
    assert exit_.value.code == 2 and "argument --family: invalid choice: 'wan3'" in \
        capsys.readouterr().err
    with pytest.raises(ValueError, match=("^family 'wan3' is not allowed; allowed: wan2.1-t2v, wan2.2-a14b, wan2.1-i2v, "
                                          "wan2.1-flf2v, wan2.2-ti2v, wan2.2-i2v-a14b, wan2.1-vace, wan2.2-animate$")):
        wan.models.tiny.build_tiny_pipeline(family="wan3")
    assert not (tmp_path / "m").exists()


def test_both_experts_at_threshold_one_match_the_stock_pipeline(pipe, stock):
    handle = enable_nabla(pipe, SparsityConfig(mode="nabla", threshold=1.0))
    try:
        assert [h.transformer for h in handle.experts] == [pipe.transformer, pipe.transformer_2]
        assert pipe.transformer_2._nabla_patch is handle.experts[1] and handle.experts[1].state.expert == 1
        frames = sample(pipe)
        records = handle.state.records
        assert records.experts == {0: 0, 1: 1}  # step 0 high noise, step 1 low noise
        assert records.passes == [[0, 2], [0, 2], [1, 2], [1, 2]]  # 2 CFG passes x 2 layers per step, each expert's
        assert handle.state.mean_density(0) == handle.state.mean_density(1) == pytest.approx(1.0)
        assert np.abs(frames - stock).max() < 1e-4
    finally:
        disable_nabla(pipe)
    assert pipe.transformer._nabla_patch is None and pipe.transformer_2._nabla_patch is None
    assert np.array_equal(sample(pipe), stock)  # both experts stock again, bit for bit


def test_one_step_count_for_both_experts(pipe):
    """dense_steps counts the whole run: with 3 steps (0 high noise, 1 and 2 low noise) and dense_steps 2, only step
    2 is sparse; a count of its own would have made the low-noise expert's both steps dense."""
    handle = enable_nabla(pipe, SparsityConfig(mode="nabla", threshold=0.5, dense_steps=2))
    try:
        sample(pipe, steps=3)
        assert {step for step, _, _ in handle.state.records.densities} == {2}
        assert handle.state.records.experts == {0: 0, 1: 1, 2: 1} and handle.state.mean_density(0) is None
        handle.state.reset()  # one reset forgets the run of both experts
        assert handle.experts[1].state.step == -1 and handle.experts[1].state.records.passes == []
    finally:
        disable_nabla(pipe)


def test_low_noise_config_and_a_dense_high_noise_expert(pipe, tmp_path):
    """sparsity_2 (merged over sparsity) is the low-noise expert's; with a dense high-noise expert both are still
    patched, so that step 1 is counted as step 1."""
    config = tmp_path / "c.yaml"
    config.write_text("sparsity: {mode: full, threshold: 0.5}\nsparsity_2: {mode: nabla}\n")
    handle = enable_nabla(pipe, config)
    try:
        assert handle.state.config.mode == "full" and handle.experts[1].state.config == SparsityConfig(
            mode="nabla", threshold=0.5)
        sample(pipe)
        assert {step for step, _, _ in handle.state.records.densities} == {1}
        assert [calls for _, calls in handle.state.records.passes] == [2, 2, 2, 2]  # the dense expert counted too
    finally:
        disable_nabla(pipe)


def test_warm_up_runs_a_dense_and_a_sparse_step_in_each_expert(pipe, monkeypatch):
    """...and decodes the first latent frame alone, the VAE's own decode restored after."""
    decoded, decode = [], type(pipe.vae).decode
    monkeypatch.setattr(type(pipe.vae), "decode", lambda vae, z, *a, **k: decoded.append(z.shape[2]) or decode(vae, z, *a, **k))
    handle = enable_nabla(pipe, SparsityConfig(mode="nabla", threshold=0.5, dense_steps=1))
    try:
        settings = GenerationSettings(prompt="a cat", height=32, width=32, frames=5, steps=9)
        wan.generate.session.warm_up(pipe, handle, settings, "cpu")
        records = handle.state.records
        assert records.experts == {0: 0, 1: 0, 2: 1, 3: 1}  # 4 steps, the boundary at 2
        assert {step for step, _, _ in records.densities} == {1, 3}  # steps 0 and 2 dense
        assert [h.state.config.dense_steps for h in handle.experts] == [1, 1]  # restored
        assert decoded == [1] and "decode" not in vars(pipe.vae)
    finally:
        disable_nabla(pipe)


@pytest.mark.parametrize("config, first_step, after", [
    (TaylorSeerCacheConfig(cache_interval=3, disable_cache_before_step=6, disable_cache_after_step=48), 12, 36),
    (TaylorSeerCacheConfig(disable_cache_after_step=4), 6, 0),
    (TaylorSeerCacheConfig(disable_cache_after_step=None), 6, None),
])
def test_the_low_noise_experts_cache_counts_the_runs_steps(config, first_step, after):
    shifted = expert_cache(config, first_step)
    assert shifted.disable_cache_after_step == after
    assert dataclasses.replace(shifted, disable_cache_after_step=config.disable_cache_after_step) == config
    assert expert_cache(config, 0) == config
    first_block = FirstBlockCacheConfig(threshold=0.1)
    assert expert_cache(first_block, first_step) is first_block


def run_cli(*args) -> int:
    return wan.generate.cli.main([str(a) for a in args])


def test_generate_with_sparsity_2_cache_and_stats(a14b_model, tmp_path, capsys):
    """generate.py on both experts: sparsity_2 (dense) honoured, --stats says which expert ran each step, and the TaylorSeer
    schedule (interval 2, from step 1, off from step 3) sees the run's steps: the low-noise expert's first step (2)
    is computed (it has no history), its second (3) too (the run's step 3, not the expert's)."""
    config = tmp_path / "c.yaml"
    config.write_text("sparsity: {mode: nabla, threshold: 0.5}\nsparsity_2: {mode: full}\n"
                      "cache: {type: taylorseer, cache_interval: 2, disable_cache_before_step: 1, "
                      "disable_cache_after_step: 3}\n")
    stats = tmp_path / "s.json"
    assert run_cli("--model", a14b_model, "--prompt", "a cat", "--config", config, *SMALL, "--steps", "4",
                   "--output", tmp_path / "v.npy", "--stats", stats) == 0
    printed = capsys.readouterr().out
    assert "nabla, threshold 0.5, 64-token blocks, eager kernel (transformer_2: full attention) + TaylorSeer" in printed
    assert "mean mask density: 0.500 (transformer 0.500, transformer_2 n/a)" in printed
    report = json.loads(stats.read_text())
    assert report["experts"] == ["transformer", "transformer_2"] and report["config_2"]["mode"] == "full"
    assert [(c["step"], c["expert"]) for c in report["attention_calls"]] == [(0, 0), (1, 0), (2, 1), (3, 1)]
    assert report["computed_steps"] == [0, 2, 3] and report["cached_steps"] == [1]
    assert {(r["step"], r["expert"]) for r in report["records"]} == {(0, 0)}  # step 1 cached, 2 and 3 dense
    assert np.load(tmp_path / "v.npy").shape == (5, 32, 32, 3)


def test_sparsity_2_for_one_transformer_is_refused_before_loading(tiny_model, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(wan.models.loading, "load_pipeline", lambda *a, **k: pytest.fail("the model loaded"))
    config = tmp_path / "c.yaml"
    config.write_text("sparsity: {mode: nabla}\nsparsity_2: {threshold: 0.3}\n")
    assert run_cli("--model", tiny_model, "--prompt", "a cat", "--config", config, "--output", tmp_path / "v.npy") == 2
    assert capsys.readouterr().err == (f"error: config: 'sparsity_2' is not allowed for {tiny_model}: it has one "
                                       "transformer, no transformer_2 (the low-noise expert of Wan2.2 A14B that "
                                       "sparsity_2 configures)\n")
    config.write_text("sparsity: {mode: nabla}\nsparsity_2: {threshold: 2}\n")
    assert run_cli("--model", tiny_model, "--prompt", "a cat", "--config", config, "--output", tmp_path / "v.npy") == 2
    assert "threshold" in capsys.readouterr().err


def test_config_2_for_one_transformer_is_refused(pipe):
    with pytest.raises(ValueError, match="^enable_nabla: a low-noise expert's config .* this has one transformer"):
        enable_nabla(pipe.transformer, SparsityConfig(mode="nabla"), config_2=SparsityConfig(mode="nabla"))
    assert getattr(pipe.transformer, "_nabla_patch", None) is None


def test_video_to_video_runs_under_nabla(pipe):
    v2v = WanVideoToVideoPipeline(tokenizer=pipe.tokenizer, text_encoder=pipe.text_encoder, transformer=pipe.transformer,
                                  vae=pipe.vae, scheduler=pipe.scheduler)
    v2v.set_progress_bar_config(disable=True)
    video = [np.full((32, 32, 3), i / 5, dtype=np.float32) for i in range(5)]

    def run():
        return v2v(video=video, prompt="a cat", height=32, width=32, num_inference_steps=4, strength=0.5,
                   generator=torch.Generator().manual_seed(0), output_type="np").frames[0]

    stock = run()
    handle = enable_nabla(v2v, SparsityConfig(mode="nabla", threshold=1.0))
    try:
        frames = run()
        assert {step for step, _, _ in handle.state.records.densities} == {0, 1}  # strength 0.5: 2 of 4 steps
        assert np.abs(frames - stock).max() < 1e-4
    finally:
        disable_nabla(v2v)


@pytest.mark.parametrize("target, named", [
    ("pipeline", "WanS2VPipeline (transformer: WanS2VTransformer3DModel)"),
    ("transformer", "WanS2VTransformer3DModel"),
])
def test_other_wan_pipelines_are_refused_in_one_line(target, named):
    transformer = type("WanS2VTransformer3DModel", (), {})()  # a class no family recognises
    # a stand-in of the pipeline's class name: enable_nabla reads its transformer only
    pipeline = transformer if target == "transformer" else type("WanS2VPipeline", (SimpleNamespace,), {})(
        transformer=transformer)
    for call in (enable_nabla, disable_nabla):
        with pytest.raises(TypeError) as err:
            call(pipeline, SparsityConfig(mode="nabla")) if call is enable_nabla else call(pipeline)
        assert str(err.value) == (f"{call.__name__}: {named} is not supported; pass a WanPipeline, "
                                  "WanImageToVideoPipeline or WanVideoToVideoPipeline (their transformers are "
                                  "WanTransformer3DModel, Wan2.2's transformer_2 included), a WanVACEPipeline, a "
                                  "WanAnimatePipeline, a Kandinsky5T2VPipeline or Kandinsky5I2VPipeline, or one of "
                                  "their transformers")


def test_image_to_video_runs_under_nabla(pipe):
    """WanImageToVideoPipeline (Wan2.2 I2V's layout: no image encoder; the transformer reads 16 noise + 20 condition
    channels): self-attention patched, the image condition untouched; at threshold 1.0 the stock video."""
    transformer = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12,
                                        in_channels=36, out_channels=16, text_dim=32, freq_dim=32, ffn_dim=32,
                                        num_layers=2, rope_max_seq_len=1024).eval()
    i2v = WanImageToVideoPipeline(tokenizer=pipe.tokenizer, text_encoder=pipe.text_encoder, vae=pipe.vae,
                                  scheduler=pipe.scheduler, transformer=transformer)
    i2v.set_progress_bar_config(disable=True)
    image = Image.fromarray(np.full((32, 32, 3), 128, np.uint8))

    def run():
        return i2v(image=image, prompt="a cat", **TINY, num_inference_steps=2,
                   generator=torch.Generator().manual_seed(0), output_type="np").frames[0]

    stock = run()
    handle = enable_nabla(i2v, SparsityConfig(mode="nabla", threshold=1.0))
    try:
        frames = run()
        assert handle.state.records.passes == [[0, 2], [0, 2], [1, 2], [1, 2]]
        assert np.abs(frames - stock).max() < 1e-4
    finally:
        disable_nabla(i2v)


def test_one_transformer_flags_are_refused_for_two_experts_before_loading(a14b_model, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(wan.models.loading, "load_pipeline", lambda *a, **k: pytest.fail("the model loaded"))
    lora = tmp_path / "pytorch_lora_weights.safetensors"
    save_file({"transformer.blocks.0.attn1.to_q.lora_A.weight": torch.zeros(1, 24)}, str(lora))  # a readable file
    assert run_cli("--model", a14b_model, "--prompt", "a cat", "--lora", lora, "--transformer", a14b_model / "transformer",
                   "--output", tmp_path / "v.npy") == 2
    assert capsys.readouterr().err == (f"error: --transformer and --lora: not supported for {a14b_model}, a two-expert "
                                       "pipeline (Wan2.2 A14B: transformer and transformer_2); they apply to "
                                       "one-transformer Wan models\n")
