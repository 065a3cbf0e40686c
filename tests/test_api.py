"""The README's Python API: enable_nabla / disable_nabla on a WanPipeline that the user built and configured."""

import numpy as np
import pytest
import torch
from diffusers import UniPCMultistepScheduler, WanPipeline

from nabla import SparsityConfig
from wan import NablaPatch, disable_nabla, enable_nabla


@pytest.fixture(scope="module")
def user_pipe(tiny_model):
    """Built the way a diffusers user builds theirs: from_pretrained, their own scheduler, model CPU offload
    (on the CPU as the execution device: the offload hooks run, with no accelerator to move to)."""
    pipe = WanPipeline.from_pretrained(str(tiny_model), dtype=torch.float32)
    pipe.scheduler = UniPCMultistepScheduler.from_config(pipe.scheduler.config, flow_shift=3.0)
    pipe.enable_model_cpu_offload(device="cpu")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sample(pipe) -> np.ndarray:
    return pipe("a cat plays piano", height=64, width=96, num_frames=9, num_inference_steps=2, guidance_scale=5.0,
                generator=torch.Generator().manual_seed(0), output_type="np").frames[0]


@pytest.fixture(scope="module")
def stock(user_pipe):
    return sample(user_pipe)


def test_enable_then_disable_on_the_users_pipeline(user_pipe, stock):
    assert user_pipe.scheduler.config.flow_shift == 3.0 and hasattr(user_pipe.transformer, "_hf_hook")  # offloaded
    handle = enable_nabla(user_pipe, SparsityConfig(mode="nabla", threshold=0.3))
    assert isinstance(handle, NablaPatch) and handle.transformer is user_pipe.transformer
    sparse = sample(user_pipe)
    # 2 steps x 2 CFG passes x 2 layers went through NABLA, with blocks left out
    assert len(handle.state.records.densities) == 8 and handle.state.mean_density() < 1
    assert np.abs(sparse - stock).max() > 1e-3
    disable_nabla(user_pipe)
    assert np.array_equal(sample(user_pipe), stock)  # bit for bit the stock model again


def test_yaml_config_at_threshold_one_is_full_attention(user_pipe, stock, tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("sparsity: {mode: nabla, threshold: 1.0}\ngeneration: {steps: 7}\n")  # generation: ignored
    handle = enable_nabla(user_pipe.transformer, config)
    try:
        frames = sample(user_pipe)
        assert handle.state.config.threshold == 1.0 and handle.state.mean_density() == pytest.approx(1.0)
        assert np.abs(frames - stock).max() < 1e-4
    finally:
        disable_nabla(user_pipe.transformer)
    assert np.array_equal(sample(user_pipe), stock)


def test_compile_flag_compiles_blocks_and_disable_undoes_it(user_pipe):
    blocks = list(user_pipe.transformer.blocks)
    assert enable_nabla(user_pipe, SparsityConfig(mode="full")) is None  # CPU: nothing compiled by default
    assert all(b._compiled_call_impl is None for b in blocks)
    disable_nabla(user_pipe)
    assert enable_nabla(user_pipe, SparsityConfig(mode="full"), compile=True) is None  # full: still compiled
    assert all(b._compiled_call_impl is not None for b in blocks)
    disable_nabla(user_pipe)
    assert all(b._compiled_call_impl is None for b in blocks)
    handle = enable_nabla(user_pipe, SparsityConfig(mode="nabla"), compile=True)
    assert all(b._compiled_call_impl is not None for b in blocks) and handle is not None
    with pytest.raises(ValueError, match="already patched"):
        enable_nabla(user_pipe, SparsityConfig(mode="nabla"))
    disable_nabla(user_pipe)
    assert all(b._compiled_call_impl is None for b in blocks) and user_pipe.transformer._nabla_patch is None


def test_a_transformer_in_training_mode_compiles_for_its_backward(user_pipe, monkeypatch):
    """Training mode (`.train()`) compiles without inductor's mix-order reduction, which gets Wan's scale_shift_table
    gradient wrong (pytorch#193061); inference keeps the options it was measured with."""
    from wan.api import BLOCK_COMPILE_OPTIONS, TRAINING_COMPILE_OPTIONS

    transformer, seen = user_pipe.transformer, []
    monkeypatch.setattr(transformer, "compile_repeated_blocks", lambda **kwargs: seen.append(kwargs["options"]))
    for train in (False, True):
        transformer.train(train)
        enable_nabla(transformer, SparsityConfig(mode="nabla"), compile=True)
        disable_nabla(transformer)
    transformer.eval()
    assert seen == [BLOCK_COMPILE_OPTIONS, TRAINING_COMPILE_OPTIONS]
    assert TRAINING_COMPILE_OPTIONS["triton.mix_order_reduction"] is False


@pytest.mark.parametrize("args, message", [
    (("not a pipeline", SparsityConfig()), "enable_nabla: str is not supported; pass a WanPipeline, "),
    ((None, 0.7), "enable_nabla: config 0.7 is not allowed; pass a SparsityConfig, a YAML path or a shipped config's name"),
], ids=["target", "config"])
def test_bad_arguments_are_named(user_pipe, args, message):
    target, config = args
    with pytest.raises(TypeError, match=message):
        enable_nabla(user_pipe if target is None else target, config)
    with pytest.raises(TypeError, match="compile='yes' is not allowed"):
        enable_nabla(user_pipe, SparsityConfig(), compile="yes")
    assert getattr(user_pipe.transformer, "_nabla_patch", None) is None
