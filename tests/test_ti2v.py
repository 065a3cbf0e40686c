"""Wan2.2 TI2V-5B on the tiny `wan2.2-ti2v` checkpoint (48-channel 16x VAE, `expand_timesteps`): the step from
per-token timesteps, NABLA against the stock pipeline through the API and generate.py, a sparse run, TI2V's defaults
(local folder and hub id), its size rule, and its image mode through generate.py --image."""

import json
import shutil

import huggingface_hub.constants
import numpy as np
import pytest
import torch
from diffusers import WanImageToVideoPipeline, WanPipeline
from PIL import Image

import wan.generate.cli
import wan.generate.plan
import wan.models.loading
from nabla import SparsityConfig
from wan import disable_nabla, enable_nabla
from wan.attention.state import NablaState
from wan.models.spec import ModelSpec
from wan.models.tiny import save_tiny_model

TINY = {"height": 64, "width": 96, "num_frames": 5}
SMALL = ["--height", "64", "--width", "96", "--frames", "5", "--steps", "2"]


@pytest.fixture(scope="module")
def ti2v_model(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny_ti2v"), seed=0, family="wan2.2-ti2v")


@pytest.fixture(scope="module")
def pipe(ti2v_model):
    pipe = WanPipeline.from_pretrained(str(ti2v_model), dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run_cli(*args) -> int:
    return wan.generate.cli.main([str(a) for a in args])


def sample(pipe, steps: int = 2, **image) -> np.ndarray:
    return pipe(prompt="a cat plays piano", **TINY, **image, num_inference_steps=steps, guidance_scale=5.0,
                generator=torch.Generator().manual_seed(0), output_type="np").frames[0]


def plan_for(tmp_path, *args):
    """generate.py's checked input (nothing loads)."""
    flags = ["--prompt", "a cat", "--output", tmp_path / "v.npy", *args]
    return wan.generate.plan.resolve(wan.generate.cli.build_parser().parse_args(map(str, flags)))


def write_image(path):
    Image.fromarray(np.random.RandomState(0).randint(0, 256, (64, 96, 3), np.uint8)).save(path)
    return path


def round_trip(pipe, image_path) -> np.ndarray:
    """The image through the VAE and back: what diffusers' TI2V image mode makes the first frame (it holds the first
    latent frame at the image's latents, and the causal VAE decodes the first frame from that latent frame alone)."""
    with torch.inference_mode():
        pixels = pipe.video_processor.preprocess(Image.open(image_path), height=64, width=96).unsqueeze(2)
        latents = pipe.vae.encode(pixels).latent_dist.mode()
        return pipe.video_processor.postprocess_video(pipe.vae.decode(latents).sample, output_type="np")[0, 0]


def test_the_tiny_checkpoint_is_ti2v_shaped(ti2v_model, tiny_model):
    assert json.loads((ti2v_model / "model_index.json").read_text())["expand_timesteps"] is True
    vae = json.loads((ti2v_model / "vae/config.json").read_text())
    assert (vae["z_dim"], vae["scale_factor_spatial"], vae["patch_size"], vae["is_residual"]) == (48, 16, 2, True)
    transformer = json.loads((ti2v_model / "transformer/config.json").read_text())
    assert (transformer["in_channels"], transformer["out_channels"]) == (48, 48)
    ti2v, t2v = ModelSpec.from_folder(str(ti2v_model)), ModelSpec.from_folder(str(tiny_model))
    assert (ti2v.ti2v, t2v.ti2v, ModelSpec.from_folder("Wan-AI/x")) == (True, False, None)
    assert (ti2v.pixels_per_token, t2v.pixels_per_token) == (32, 16)


def test_the_step_comes_from_the_largest_per_token_timestep():
    """Per-token timesteps [batch, tokens] whose first frame carries 0 (an image-conditioned run): the first token's
    timestep would count every forward as step 0; the maximum counts the steps. The grid is the latents' over the
    patches: TI2V's 1280x704 x 121 gives 31 x 22 x 40 tokens, padded to whole 8x8 tiles."""
    state = NablaState(SparsityConfig(mode="full"))
    latents = torch.zeros(2, 48, 31, 44, 80)
    for step, t in enumerate((999.0, 750.0, 750.0, 500.0)):
        timestep = torch.full((2, 31 * 22 * 40), t)
        timestep[:, : 22 * 40] = 0  # the conditioning frame
        timestep[1] = 1000.0  # only the first batch element counts
        with torch.inference_mode():  # under autograd every forward is a step of its own
            state.start_forward(latents, (1, 2, 2), timestep)
        assert state.step == [0, 1, 1, 2][step] and state.clock.last_timestep == t
    assert state.layout.shape == (31, 22, 40) and state.layout.padded_shape == (31, 24, 40)


def test_nabla_at_threshold_one_is_the_stock_pipeline(pipe):
    stock = sample(pipe)
    handle = enable_nabla(pipe, SparsityConfig(mode="nabla", threshold=1.0))
    try:
        frames = sample(pipe)
        assert handle.state.layout.shape == (2, 2, 3)  # 64x96 pixels: 4x6 latents, 2x3 tokens a frame
        assert handle.state.mean_density() == pytest.approx(1.0)
    finally:
        disable_nabla(pipe)
    assert frames.shape == (5, 64, 96, 3) and np.abs(frames - stock).max() < 1e-4
    assert np.array_equal(sample(pipe), stock)  # stock again, bit for bit


def test_image_conditioned_steps_honour_dense_steps(pipe):
    """TI2V with an image (diffusers' WanImageToVideoPipeline over the same components): its first latent frame's
    tokens carry timestep 0, and dense_steps 1 of 3 leaves steps 1 and 2 sparse."""
    i2v = WanImageToVideoPipeline(**pipe.components, expand_timesteps=True)
    i2v.set_progress_bar_config(disable=True)
    image = Image.fromarray(np.random.RandomState(0).randint(0, 256, (64, 96, 3), np.uint8))
    handle = enable_nabla(i2v, SparsityConfig(mode="nabla", threshold=0.5, dense_steps=1))
    try:
        sample(i2v, steps=3, image=image)
        assert {step for step, _, _ in handle.state.records.densities} == {1, 2}
        assert [step for step, _ in handle.state.records.passes] == [0, 0, 1, 1, 2, 2]  # 2 CFG passes a step
    finally:
        disable_nabla(i2v)


def test_generate_at_threshold_one_is_the_stock_video_and_a_sparse_run(ti2v_model, tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("sparsity: {mode: nabla, threshold: 1.0}\n")
    common = ["--model", ti2v_model, "--prompt", "a cat", *SMALL]
    assert run_cli(*common, "--output", tmp_path / "stock.npy") == 0
    assert run_cli(*common, "--config", config, "--output", tmp_path / "nabla.npy") == 0
    assert "mean mask density: 1.000" in capsys.readouterr().out
    stock, nabla = np.load(tmp_path / "stock.npy"), np.load(tmp_path / "nabla.npy")
    assert stock.shape == (5, 64, 96, 3) and np.abs(nabla - stock).max() < 1e-4
    config.write_text("sparsity: {mode: nabla, threshold: 0.5}\n")
    assert run_cli(*common, "--frames", "9", "--config", config, "--output", tmp_path / "sparse.npy") == 0
    density = float(capsys.readouterr().out.rsplit("mean mask density: ", 1)[1])
    assert density < 1 and np.load(tmp_path / "sparse.npy").shape == (9, 64, 96, 3)


def test_ti2v_defaults_apply_where_nothing_gives_a_value(ti2v_model, tiny_model, tmp_path):
    settings = plan_for(tmp_path, "--model", ti2v_model).settings
    assert (settings.height, settings.width, settings.frames, settings.fps) == (704, 1280, 121, 24)
    config = tmp_path / "c.yaml"
    config.write_text(f"generation: {{model: {ti2v_model}, frames: 9, fps: 12}}\n")
    settings = plan_for(tmp_path, "--config", config, "--height", 64).settings  # flags and the config override
    assert (settings.height, settings.width, settings.frames, settings.fps) == (64, 1280, 9, 12)
    settings = plan_for(tmp_path, "--model", tiny_model).settings  # Wan2.1 keeps its own
    assert (settings.height, settings.width, settings.frames, settings.fps) == (480, 832, 81, 16)


def refusal(side: str, value: int, near: str) -> str:
    return (f"error: {side}: {value} is not allowed for a Wan2.2 TI2V model; it needs a multiple of 32 (its 16x VAE, "
            f"then 2x2 patches; e.g. {near})\n")


@pytest.mark.parametrize("side, value, near", [("height", 48, "32 or 64"), ("width", 720, "704 or 736")])
def test_sizes_off_the_32_pixel_grid_are_refused_before_loading(side, value, near, ti2v_model, tiny_model, tmp_path,
                                                                monkeypatch, capsys):
    monkeypatch.setattr(wan.models.loading, "load_pipeline", lambda *a, **k: pytest.fail("the model loaded"))
    flags = [f"--{side}", value]
    assert run_cli("--model", ti2v_model, "--prompt", "a cat", *flags, "--output", tmp_path / "v.npy") == 2
    assert capsys.readouterr().err == refusal(side, value, near)
    assert plan_for(tmp_path, "--model", tiny_model, *flags).settings  # a Wan2.1 model takes multiples of 16


def test_a_hub_ti2v_model_gets_its_defaults_once_loaded(ti2v_model, tmp_path, monkeypatch, capsys):
    """A hub id (here from a Hugging Face cache, offline) is known to be TI2V only once loaded: its defaults (fps
    here, beside the sizes given), its size rule and, with --image, its image mode apply then."""
    snapshot = tmp_path / "hub/models--tiny--wan-ti2v/snapshots" / ("0" * 40)
    shutil.copytree(ti2v_model, snapshot)
    (tmp_path / "hub/models--tiny--wan-ti2v/refs").mkdir()
    (tmp_path / "hub/models--tiny--wan-ti2v/refs/main").write_text("0" * 40)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    stats = tmp_path / "s.json"
    common = ["--model", "tiny/wan-ti2v", "--prompt", "a cat", "--config", "nabla-0.7", "--output", tmp_path / "v.npy"]
    image = write_image(tmp_path / "first.png")
    assert run_cli(*common, *SMALL, "--image", image, "--stats", stats) == 0  # a WanPipeline would refuse image=
    settings = json.loads(stats.read_text())["settings"]
    assert (settings["height"], settings["width"], settings["frames"], settings["fps"]) == (64, 96, 5, 24)
    assert settings["image"] == str(image)
    capsys.readouterr()
    assert run_cli(*common, "--height", "48", "--overwrite") == 2
    assert capsys.readouterr().err.endswith(refusal("height", 48, "32 or 64"))


def test_an_image_loads_the_image_mode(ti2v_model):
    """A local TI2V folder with an image is diffusers' WanImageToVideoPipeline over its components (no CLIP encoder)."""
    pipe = wan.models.loading.load_pipeline(str(ti2v_model), device="cpu", image=True)
    assert isinstance(pipe, WanImageToVideoPipeline) and pipe.config.expand_timesteps and pipe.image_encoder is None
    assert type(wan.models.loading.load_pipeline(str(ti2v_model), device="cpu")) is WanPipeline


def test_generate_with_an_image_at_threshold_one_is_the_stock_video(pipe, ti2v_model, tmp_path, capsys):
    """--compare's stock run is the unpatched image-conditioned video; NABLA at threshold 1.0 gives it again, and the
    first frame is the image's VAE round trip."""
    image, config, stats = write_image(tmp_path / "first.png"), tmp_path / "c.yaml", tmp_path / "s.json"
    config.write_text("sparsity: {mode: nabla, threshold: 1.0}\n")
    assert run_cli("--model", ti2v_model, "--prompt", "a cat", *SMALL, "--image", image, "--config", config,
                   "--compare", "--stats", stats, "--output", tmp_path / "v.npy") == 0
    assert capsys.readouterr().out.splitlines()[-1].endswith("| 1.000 |")  # the table's mean mask density
    full, nabla = np.load(tmp_path / "v.full.npy"), np.load(tmp_path / "v.npy")
    assert full.shape == (5, 64, 96, 3) and np.abs(nabla - full).max() < 1e-4
    assert np.abs(full[0] - round_trip(pipe, image)).max() < 1e-4
    assert json.loads(stats.read_text())["settings"]["image"] == str(image)


def test_generate_with_an_image_runs_sparse(pipe, ti2v_model, tmp_path, capsys):
    image, config = write_image(tmp_path / "first.png"), tmp_path / "c.yaml"
    config.write_text("sparsity: {mode: nabla, threshold: 0.5}\n")
    assert run_cli("--model", ti2v_model, "--prompt", "a dog", *SMALL, "--frames", "9", "--seed", "1", "--image", image,
                   "--config", config, "--output", tmp_path / "v.npy") == 0
    assert float(capsys.readouterr().out.rsplit("mean mask density: ", 1)[1]) < 1
    video = np.load(tmp_path / "v.npy")
    assert video.shape == (9, 64, 96, 3) and np.abs(video[0] - round_trip(pipe, image)).max() < 1e-4


def test_a_last_image_for_ti2v_is_refused_before_loading(ti2v_model, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(wan.models.loading, "load_pipeline", lambda *a, **k: pytest.fail("the model loaded"))
    image = write_image(tmp_path / "first.png")
    assert run_cli("--model", ti2v_model, "--prompt", "a cat", *SMALL, "--image", image, "--last-image", image,
                   "--output", tmp_path / "v.npy") == 2
    assert capsys.readouterr().err == (f"error: --last-image: {ti2v_model} is a Wan2.2 TI2V model, whose image mode "
                                       "takes one image, the first frame; a first and a last frame need a FLF2V model, "
                                       "such as Wan-AI/Wan2.1-FLF2V-14B-720P-Diffusers\n")
