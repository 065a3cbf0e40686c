"""Few-step generation on the tiny model: LoRAs in the original Wan format (lora_down / lora_up / alpha / diff_b) and
in diffusers' format, several at once with a scale each; the sampler (scheduler, flow shift, sigmas) from the YAML and
from flags; guidance 1.0 as one transformer pass a step under the patch and a cache; every phase of a video timed."""

import json

import numpy as np
import pytest
import torch
from diffusers import WanPipeline
from safetensors.torch import save_file

import generate
import wan.generate.run
from nabla import SparsityConfig
from wan import disable_nabla, enable_nabla
from wan.generate.scheduler import scheduler_for
from wan.generate.settings import GenerationSettings
from wan.models.lora import load_lora
from wan.speedups.cache import cache_config, enable_cache

SMALL = ["--height", "64", "--width", "96", "--frames", "9"]
RANK, ALPHA = 4, 2.0
#: (original module, diffusers module) of each block's adapted Linear layers
TARGETS = [("self_attn.q", "attn1.to_q"), ("self_attn.o", "attn1.to_out.0"), ("cross_attn.k", "attn2.to_k"),
           ("ffn.0", "ffn.net.0.proj")]


def lora_tensors(transformer, seed: int) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Random (down, up, diff_b) for every target Linear of `transformer`, keyed by its diffusers name."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for index in range(len(transformer.blocks)):
        for _, name in TARGETS:
            linear = transformer.get_submodule(f"blocks.{index}.{name}")
            tensors[f"blocks.{index}.{name}"] = (torch.randn(RANK, linear.in_features, generator=g) * 0.3,
                                                 torch.randn(linear.out_features, RANK, generator=g) * 0.3,
                                                 torch.randn(linear.out_features, generator=g) * 0.1)
    return tensors


def write_original(path, tensors) -> None:
    """The original Wan key format, as LightX2V, CausVid and FusionX publish their LoRAs."""
    names = {f"blocks.{i}.{d}": f"blocks.{i}.{o}" for i in range(2) for o, d in TARGETS}
    state = {}
    for name, (down, up, bias) in tensors.items():
        key = f"diffusion_model.{names[name]}"
        state.update({f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up,
                      f"{key}.alpha": torch.tensor(ALPHA), f"{key}.diff_b": bias})
    save_file(state, str(path))


def write_diffusers(path, tensors) -> None:
    """The same LoRA in diffusers' format: alpha / rank folded into the down weights, the bias as lora_B.bias."""
    state = {}
    for name, (down, up, bias) in tensors.items():
        key = f"transformer.{name}"
        state.update({f"{key}.lora_A.weight": down * (ALPHA / RANK), f"{key}.lora_B.weight": up,
                      f"{key}.lora_B.bias": bias})
    save_file(state, str(path))


@pytest.fixture(scope="module")
def loras(tmp_path_factory, tiny_model):
    folder = tmp_path_factory.mktemp("loras")
    transformer = WanPipeline.from_pretrained(tiny_model).transformer
    first, second = lora_tensors(transformer, 1), lora_tensors(transformer, 2)
    write_original(folder / "distill.safetensors", first)
    write_diffusers(folder / "distill-diffusers.safetensors", first)
    write_original(folder / "style.safetensors", second)
    return folder, first, second


def test_an_original_format_lora_fuses_its_deltas_alpha_and_bias(tiny_model, loras):
    folder, first, second = loras
    pipe = WanPipeline.from_pretrained(tiny_model)
    before = {name: (m.weight.clone(), m.bias.clone()) for name, m in pipe.transformer.named_modules()
              if name in first}
    load_lora(pipe, folder / "distill.safetensors", 0.5)
    load_lora(pipe, folder / "style.safetensors", 2.0, adapter="lora1")
    for name, (weight, bias) in before.items():
        linear = pipe.transformer.get_submodule(name)
        expected = weight.clone()
        expected_bias = bias.clone()
        for scale, tensors in ((0.5, first), (2.0, second)):
            down, up, diff_b = tensors[name]
            expected += scale * (ALPHA / RANK) * up @ down
            expected_bias += scale * diff_b
        torch.testing.assert_close(linear.weight, expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(linear.bias, expected_bias, rtol=1e-5, atol=1e-5)
    assert not any("lora" in name for name, _ in pipe.transformer.named_modules())  # fused: plain Linear layers


def run(tmp_path, name, *args) -> np.ndarray:
    out = tmp_path / f"{name}.npy"
    assert generate.main(["--prompt", "a cat", *[str(a) for a in args], "--output", str(out), *SMALL]) == 0
    return np.load(out)


def test_both_formats_and_several_loras_through_the_command(tiny_model, loras, tmp_path):
    folder, _, _ = loras
    model = ["--model", tiny_model, "--steps", "2"]
    base = run(tmp_path, "base", *model)
    original = run(tmp_path, "original", *model, "--lora", folder / "distill.safetensors", "--lora-scale", 0.7)
    converted = run(tmp_path, "converted", *model, "--lora", folder / "distill-diffusers.safetensors",
                    "--lora-scale", 0.7)
    np.testing.assert_allclose(original, converted, atol=2e-6)
    assert np.abs(original - base).max() > 1e-3
    both = run(tmp_path, "both", *model, "--lora", folder / "distill.safetensors", "--lora-scale", 0.7,
               "--lora", folder / "style.safetensors", "--lora-scale", 0.3)
    assert np.abs(both - original).max() > 1e-4
    unscaled = run(tmp_path, "unscaled", *model, "--lora", folder / "distill.safetensors",
                   "--lora", folder / "style.safetensors", "--lora-scale", 0.0, "--lora-scale", 0.0)
    np.testing.assert_allclose(unscaled, base, atol=1e-6)  # scale 0 each: the base model


def test_the_sampler_reaches_the_pipeline(tiny_model, tmp_path, monkeypatch):
    seen = []
    real = wan.generate.run.generate

    def recording(pipe, settings, **kwargs):
        result = real(pipe, settings, **kwargs)
        seen.append((type(pipe.scheduler).__name__, pipe.scheduler.timesteps.tolist()))
        return result

    monkeypatch.setattr(wan.generate.run, "generate", recording)
    config = tmp_path / "distilled.yaml"
    config.write_text("generation: {scheduler: euler, flow_shift: 5.0, sigmas: [1.0, 0.75, 0.5, 0.25], "
                      "guidance_scale: 1.0}\n")
    run(tmp_path, "yaml", "--model", tiny_model, "--config", config)
    assert seen[-1][0] == "FlowMatchEulerDiscreteSchedulerWithSigmas"
    assert seen[-1][1] == pytest.approx([1000.0, 937.5, 833.3333, 625.0])  # shifted 5.0: LightX2V's 4 steps
    run(tmp_path, "flags", "--model", tiny_model, "--scheduler", "unipc", "--flow-shift", 2.0, "--sigmas", 1.0, 0.5)
    assert seen[-1] == ("UniPCMultistepSchedulerWithSigmas", [999, 666])
    run(tmp_path, "dpm", "--model", tiny_model, "--scheduler", "dpm++", "--steps", 3)
    assert seen[-1][0] == "DPMSolverMultistepScheduler" and len(seen[-1][1]) == 3


def test_the_sampler_at_its_off_setting_leaves_the_video_bit_identical(tiny_model, tmp_path):
    model = ["--model", tiny_model, "--steps", "3"]
    stock = run(tmp_path, "stock", *model)
    assert np.array_equal(run(tmp_path, "unipc", *model, "--scheduler", "unipc", "--flow-shift", 3.0), stock)
    assert not np.array_equal(run(tmp_path, "shift", *model, "--flow-shift", 5.0), stock)


def test_scheduler_for_keeps_the_stock_scheduler_when_nothing_is_set(tiny_model):
    pipe = WanPipeline.from_pretrained(tiny_model)
    assert scheduler_for(pipe.scheduler, None, None, None) is pipe.scheduler
    fixed = scheduler_for(pipe.scheduler, "euler", 5.0, [1.0, 0.5])
    fixed.set_timesteps(3)  # a warm-up's other step count: the scheduler's own spacing
    assert len(fixed.timesteps) == 3
    fixed.set_timesteps(2)
    assert fixed.timesteps.tolist() == pytest.approx([1000.0, 833.3333])


@pytest.mark.parametrize("args, message", [
    (["--scheduler", "lcm"], "argument --scheduler: invalid choice: 'lcm'"),
    (["--flow-shift", "0"], "flow_shift: 0.0 is not allowed; it must be a number in (0, 100]"),
    (["--sigmas", "1", "2"], "sigmas: [1.0, 2.0] is not allowed; it must be a decreasing list of numbers in (0, 1]"),
    (["--sigmas", "0.5", "0.9"], "sigmas: [0.5, 0.9] is not allowed"),
    (["--sigmas", "1", "0.5", "--steps", "3"], "steps: 3 is not allowed with 2 sigmas"),
    (["--sigmas", "1", "0.5", "--scheduler", "dpm++"], "sigmas: not allowed with scheduler dpm++"),
    (["--lora-scale", "0.5"], "--lora-scale 0.5 is not allowed; it must be a finite number, given with --lora"),
])
def test_bad_sampler_and_lora_values_are_one_line(tiny_model, tmp_path, capsys, args, message):
    try:
        code = generate.main(["--prompt", "a cat", "--model", str(tiny_model), "--output", str(tmp_path / "x.mp4"),
                              *args])
    except SystemExit as exit_:  # argparse's refusal of a choice, in one line too
        code = exit_.code
    err = capsys.readouterr().err
    assert code == 2 and message in err, err
    assert err.count("\n") == 1


def test_several_loras_need_one_scale_each(tiny_model, loras, tmp_path, capsys):
    folder, _, _ = loras
    lora = folder / "distill.safetensors"
    assert generate.main(["--prompt", "a cat", "--model", str(tiny_model), "--lora", str(lora), "--lora", str(lora),
                          "--lora-scale", "0.5", "--output", str(tmp_path / "x.mp4")]) == 2
    assert capsys.readouterr().err == ("error: --lora-scale: 1 scales for 2 LoRAs are not allowed; give one "
                                       "--lora-scale per --lora, in the same order (or none: 1.0 each)\n")


def test_yaml_sampler_values_are_checked(tiny_model, tmp_path, capsys):
    config = tmp_path / "bad.yaml"
    config.write_text("generation: {scheduler: ddim}\n")
    assert generate.main(["--prompt", "a cat", "--model", str(tiny_model), "--config", str(config)]) == 2
    assert capsys.readouterr().err == "error: scheduler: 'ddim' is not allowed; allowed: unipc, euler, dpm++\n"


@pytest.mark.parametrize("cache", [None, {"type": "taylorseer", "cache_interval": 2, "disable_cache_before_step": 1},
                                   {"type": "first_block", "threshold": 0.05}], ids=["no cache", "taylorseer",
                                                                                     "first block"])
def test_guidance_one_runs_one_transformer_pass_a_step(tiny_model, cache):
    pipe = WanPipeline.from_pretrained(tiny_model)
    calls = []
    pipe.transformer.register_forward_pre_hook(lambda module, args: calls.append(1))
    enable_nabla(pipe, SparsityConfig(mode="nabla", threshold=0.7), always=cache is not None)
    if cache is not None:
        enable_cache(pipe.transformer, cache_config(cache))
    for guidance, passes in ((1.0, 1), (5.0, 2)):
        calls.clear()
        settings = GenerationSettings(prompt="a cat", height=64, width=96, frames=9, steps=4,
                                      guidance_scale=guidance)
        wan.generate.run.generate(pipe, settings)
        assert len(calls) == 4 * passes, (guidance, len(calls))
    disable_nabla(pipe)


def test_every_phase_is_timed_and_they_add_up(tiny_model, tmp_path, capsys):
    stats = tmp_path / "run.json"
    run(tmp_path, "timed", "--model", tiny_model, "--config", "nabla-0.7", "--steps", "3", "--stats", stats)
    report = json.loads(stats.read_text())
    phases, seconds = report["phases"], report["seconds"]
    parts = phases["text_encoding"] + phases["preparing"] + phases["denoising"] + phases["decoding"]
    assert abs(parts - seconds) <= 0.05 * seconds and all(phases[name] >= 0 for name in ("preparing", "writing"))
    assert len(phases["steps"]) == 3 and abs(sum(phases["steps"]) - phases["denoising"]) <= 0.05 * seconds
    assert phases["text_encoding"] > 0 and phases["decoding"] > 0 and phases["writing"] > 0
    assert set(report["startup"]) == {"loading"} and report["startup"]["loading"] > 0  # CPU: no warm-up, no FP8
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("phases: "))
    assert "denoising" in line and "(3 steps: " in line and "start-up (once): loading" in line


def test_one_step_is_one_step():
    from wan.generate.phases import describe_phases

    assert describe_phases({"denoising": 1.5}, [1.5]) == "denoising 1.50 s (1 step: 1.50 s a step)"


def test_timing_the_phases_changes_nothing(tiny_model):
    pipe = WanPipeline.from_pretrained(tiny_model)
    settings = GenerationSettings(prompt="a cat", height=64, width=96, frames=9, steps=2)
    phases = {}
    timed, _ = wan.generate.run.generate(pipe, settings, phases=phases)
    with torch.inference_mode():
        plain = pipe("a cat", negative_prompt="", height=64, width=96, num_frames=9, num_inference_steps=2,
                     guidance_scale=5.0, generator=torch.Generator("cpu").manual_seed(0), output_type="np").frames[0]
    assert np.array_equal(timed, plain) and len(phases["steps"]) == 2


def count_passes(pipe, settings) -> int:
    calls = []
    hook = pipe.transformer.register_forward_pre_hook(lambda module, args: calls.append(1))
    frames, _ = wan.generate.run.generate(pipe, settings)
    hook.remove()
    return len(calls), frames


def test_cfg_truncation_skips_the_unconditional_pass_on_the_last_steps(tiny_model):
    pipe = WanPipeline.from_pretrained(tiny_model)
    settings = GenerationSettings(prompt="a cat", height=64, width=96, frames=9, steps=4)
    passes, stock = count_passes(pipe, settings)
    assert passes == 8
    for truncation, expected in ((0.5, 6), (0.75, 7), (0.0, 4)):
        passes, frames = count_passes(pipe, GenerationSettings(**{**vars(settings), "cfg_truncation": truncation}))
        assert passes == expected and not np.array_equal(frames, stock)
    passes, frames = count_passes(pipe, GenerationSettings(**{**vars(settings), "cfg_truncation": 1.0}))
    assert passes == 8 and np.array_equal(frames, stock)  # at its off setting: the same video, bit for bit


def test_the_vae_in_bfloat16_decodes_close_to_float32(tiny_model, tmp_path):
    model = ["--model", tiny_model, "--steps", "2"]
    stock = run(tmp_path, "stock", *model)
    assert np.array_equal(run(tmp_path, "fp32", *model, "--vae-dtype", "float32"), stock)
    bf16 = run(tmp_path, "bf16", *model, "--vae-dtype", "bfloat16")
    mse = float(np.mean((bf16 - stock) ** 2))
    assert 0 < mse and 10 * np.log10(1 / mse) > 30


@pytest.mark.parametrize("key, value, message", [
    ("vae_dtype", "float16", "vae_dtype: 'float16' is not allowed; allowed: float32, bfloat16"),
    ("cfg_truncation", 1.5, "cfg_truncation: 1.5 is not allowed; it must be a number in [0, 1]"),
])
def test_bad_speed_settings_are_one_line(tiny_model, tmp_path, capsys, key, value, message):
    config = tmp_path / "bad.yaml"
    config.write_text(f"generation: {{{key}: {value}}}\n")
    assert generate.main(["--prompt", "a cat", "--model", str(tiny_model), "--config", str(config)]) == 2
    assert capsys.readouterr().err.startswith(f"error: {message}")


def test_a_trained_lora_is_also_written_in_the_wan_layout_and_round_trips(tiny_model, tmp_path):
    """save_lora (what finetune exports) writes the adapter in diffusers' format and in the original Wan layout
    (ComfyUI's); both load through diffusers' load_lora_weights to the same fused weights."""
    from safetensors.torch import load_file

    from wan.models.lora import WAN_WEIGHT_NAME, WEIGHT_NAME, add_lora, save_lora

    transformer = WanPipeline.from_pretrained(tiny_model).transformer
    add_lora(transformer, rank=4, alpha=8.0, target_modules=("to_q", "to_out.0", "add_k_proj", "ffn.net.0.proj"))
    with torch.no_grad():
        for name, param in transformer.named_parameters():
            if "lora_" in name:
                param.normal_(0, 0.2, generator=torch.Generator().manual_seed(len(name)))
    save_lora(tmp_path, transformer, transformer.state_dict())
    wan = load_file(str(tmp_path / WAN_WEIGHT_NAME))
    assert "diffusion_model.blocks.1.self_attn.o.lora_down.weight" in wan
    assert "diffusion_model.blocks.0.ffn.0.lora_up.weight" in wan
    assert float(wan["diffusion_model.blocks.0.self_attn.q.alpha"]) == 8.0
    fused = []
    for name in (WEIGHT_NAME, WAN_WEIGHT_NAME):
        pipe = WanPipeline.from_pretrained(tiny_model)
        load_lora(pipe, tmp_path / name, 1.0)
        fused.append(pipe.transformer.state_dict())
    assert fused[0].keys() == fused[1].keys()
    for key in fused[0]:
        torch.testing.assert_close(fused[0][key], fused[1][key], rtol=1e-5, atol=1e-6)
    base = WanPipeline.from_pretrained(tiny_model).transformer.state_dict()
    assert not torch.equal(base["blocks.0.attn1.to_q.weight"], fused[1]["blocks.0.attn1.to_q.weight"])


def test_fastest_60_computes_the_passes_its_comment_promises(tiny_model):
    """configs/fastest-60.yaml: TaylorSeer and CFG truncation together, over 50 steps: 12 steps computed, the
    unconditional pass in the first 40% of them only, 18 transformer passes (counted where a cached step skips)."""
    import yaml

    from wan.defaults import find_config

    data = yaml.safe_load(find_config("fastest-60").read_text())
    pipe = WanPipeline.from_pretrained(tiny_model)
    computed = []
    pipe.transformer.blocks[0].attn1.to_q.register_forward_pre_hook(lambda module, args: computed.append(1))
    enable_nabla(pipe, SparsityConfig(mode="nabla", threshold=0.7), always=True)
    enable_cache(pipe.transformer, cache_config(data["cache"]))
    settings = GenerationSettings(prompt="a cat", height=32, width=32, frames=5, steps=50,
                                  cfg_truncation=data["generation"]["cfg_truncation"])
    wan.generate.run.generate(pipe, settings)
    assert len(computed) == 18
