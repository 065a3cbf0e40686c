"""`nabla-wan generate` on the tiny Kandinsky 5 checkpoints (CPU, float32): text and image to video under the
checkpoint's own trained NABLA, --stats over the visual blocks, --compare against full attention, and what it does
not take refused in one line before the model loads."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

import wan.generate.cli
import wan.models.loading
from wan.models.spec import ModelSpec
from wan.models.tiny_kandinsky5 import tiny_transformer
from wan.speedups.precision import is_block_linear

SMALL = ["--height", "64", "--width", "64", "--steps", "1", "--device", "cpu"]


def run_cli(*args) -> int:
    return wan.generate.cli.main([str(a) for a in args])


def test_the_spec_reads_the_pipeline_its_defaults_and_its_trained_sparsity(kandinsky5_model, kandinsky5_i2v_model):
    spec, i2v = ModelSpec.from_folder(str(kandinsky5_model)), ModelSpec.from_folder(str(kandinsky5_i2v_model))
    assert (spec.name, spec.image_frames, i2v.name, i2v.image_frames) == ("Kandinsky 5 T2V", 0, "Kandinsky 5 I2V", 1)
    assert spec.pixels_per_token == 16 and spec.generation_defaults["fps"] == 24
    trained = spec.trained_sparsity
    assert (trained.mode, trained.threshold, trained.sta_window, trained.block_size) == ("nabla+sta", 0.9, (11, 3, 3), 64)


def test_text_to_video_runs_its_trained_nabla_over_the_visual_blocks(kandinsky5_model, tmp_path):
    out, stats = tmp_path / "fox.npy", tmp_path / "fox.json"
    assert run_cli("--model", kandinsky5_model, "--prompt", "a red fox", "--frames", "5", *SMALL, "--output", out,
                   "--stats", stats) == 0
    video = np.load(out)
    assert video.shape == (5, 64, 64, 3) and np.isfinite(video).all()
    report = json.loads(stats.read_text())
    config = report["config"]  # no --config: the checkpoint's own
    assert (config["mode"], config["threshold"], config["sta_window"], config["block_size"]) == (
        "nabla+sta", 0.9, [11, 3, 3], 64)
    assert report["layers"] == [0, 1]  # the two visual blocks' self-attention; the text block stays stock
    assert report["attention_calls"] == [{"step": 0, "expert": 0, "per_pass": [2, 2]}]  # guidance: two passes
    assert report["settings"]["fps"] == 24  # Kandinsky 5's own, not Wan's 16


def test_image_to_video_compares_with_full_attention(kandinsky5_i2v_model, tmp_path, capsys):
    image, out = tmp_path / "first.png", tmp_path / "cat.npy"
    Image.new("RGB", (80, 48), (200, 120, 40)).save(image)
    # I2V renormalises the first 4 latent frames by the next ones: it needs 5 (17 frames)
    assert run_cli("--model", kandinsky5_i2v_model, "--image", image, "--prompt", "a cat", "--frames", "17", *SMALL,
                   "--output", out, "--compare") == 0
    video, full = np.load(out), np.load(tmp_path / "cat.full.npy")
    assert video.shape == full.shape == (17, 64, 64, 3) and np.isfinite(video).all() and np.isfinite(full).all()
    rows = capsys.readouterr().out.splitlines()[-2:]
    assert rows[0].startswith("| full | ") and rows[1].startswith("| nabla+sta, threshold 0.9, STA window 11x3x3")


def _config(tmp_path, text: str):
    path = tmp_path / "k5.yaml"
    path.write_text(text)
    return path


REFUSED = {
    "image-for-t2v": (False, lambda t: ["--image", t / "first.png"],
                      "takes no image; image to video needs a Kandinsky5I2VPipeline model"),
    "no-image-for-i2v": (True, lambda t: [], "is an image-to-video model (Kandinsky5I2VPipeline); give its first frame"),
    "last-image": (True, lambda t: ["--image", t / "first.png", "--last-image", t / "first.png"],
                   "takes one image, the first frame (Kandinsky 5 I2V)"),
    "ulysses": (False, lambda t: ["--ulysses", "2"], "--ulysses/--cfg-parallel: not supported for"),
    "transformer": (False, lambda t: ["--transformer", t / "other.safetensors"], "--transformer: not supported for"),
    "cache": (False, lambda t: ["--config", _config(t, "sparsity: {mode: nabla}\ncache: {type: first_block}\n")],
              "cache: not supported for"),
    "sparsity_2": (False, lambda t: ["--config", _config(t, "sparsity: {mode: nabla}\nsparsity_2: {threshold: 0.5}\n")],
                   "'sparsity_2' is not allowed"),
}


@pytest.mark.parametrize("name", list(REFUSED))
def test_what_it_does_not_take_is_refused_before_loading(name, kandinsky5_model, kandinsky5_i2v_model, tmp_path,
                                                         capsys, monkeypatch):
    i2v, extra, message = REFUSED[name]
    Image.new("RGB", (16, 16)).save(tmp_path / "first.png")
    (tmp_path / "other.safetensors").write_bytes(b"")
    monkeypatch.setattr(wan.models.loading, "load_pipeline", lambda *a, **k: pytest.fail("the model was loaded"))
    model = kandinsky5_i2v_model if i2v else kandinsky5_model
    assert run_cli("--model", model, "--prompt", "a cat", *SMALL, "--output", tmp_path / "v.npy", *extra(tmp_path)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err, err


def test_fp8_takes_the_visual_blocks_linear_layers_but_their_float32_modulations():
    with torch.device("meta"):
        transformer = tiny_transformer()
    taken = {name.split(".", 2)[2] for name, module in transformer.named_modules() if is_block_linear(module, name)}
    assert taken == {f"{attention}.{layer}" for attention in ("self_attention", "cross_attention")
                     for layer in ("to_query", "to_key", "to_value", "out_layer")} | {"feed_forward.in_layer",
                                                                                      "feed_forward.out_layer"}
    blocks = {name.split(".")[0] for name, module in transformer.named_modules() if is_block_linear(module, name)}
    assert blocks == {"visual_transformer_blocks"}  # not the text blocks, embeddings or the output layer
