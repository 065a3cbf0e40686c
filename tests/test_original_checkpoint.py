"""Original-format Wan2.1 checkpoints (`--transformer`): written here from the documented key layout,
converted back by diffusers' single-file loader, and the same outputs as the diffusers-layout model."""

import re

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import generate
from wan.models.loading import load_pipeline, load_transformer

SMALL = ["--height", "64", "--width", "96", "--frames", "9", "--steps", "2"]

# diffusers name -> name in the Wan2.1 repository (wan/modules/model.py), written out by hand from that
# layout, not taken from diffusers: norm2 and norm3 trade places (the original's norm3 is the
# cross-attention norm), and the output head's modulation is `head.modulation`.
DIFFUSERS_TO_ORIGINAL = [
    (r"^scale_shift_table$", "head.modulation"),
    (r"^proj_out\.", "head.head."),
    (r"^condition_embedder\.time_embedder\.linear_1\.", "time_embedding.0."),
    (r"^condition_embedder\.time_embedder\.linear_2\.", "time_embedding.2."),
    (r"^condition_embedder\.text_embedder\.linear_1\.", "text_embedding.0."),
    (r"^condition_embedder\.text_embedder\.linear_2\.", "text_embedding.2."),
    (r"^condition_embedder\.time_proj\.", "time_projection.1."),
    (r"\.scale_shift_table$", ".modulation"),
    (r"\.attn1\.", ".self_attn."),
    (r"\.attn2\.", ".cross_attn."),
    (r"\.to_q\.", ".q."),
    (r"\.to_k\.", ".k."),
    (r"\.to_v\.", ".v."),
    (r"\.to_out\.0\.", ".o."),
    (r"\.norm2\.", ".norm3."),
    (r"\.ffn\.net\.0\.proj\.", ".ffn.0."),
    (r"\.ffn\.net\.2\.", ".ffn.2."),
]


def to_original(state_dict: dict) -> dict:
    out = {}
    for name, tensor in state_dict.items():
        for pattern, repl in DIFFUSERS_TO_ORIGINAL:
            name = re.sub(pattern, repl, name)
        out[name] = tensor.contiguous()
    return out


@pytest.fixture(scope="module")
def original(tiny_model, tmp_path_factory):
    """The tiny transformer as one original-format file, and as two shards in a folder."""
    pipe = load_pipeline(str(tiny_model), device="cpu")
    state = to_original(pipe.transformer.state_dict())
    assert "blocks.0.self_attn.q.weight" in state and "blocks.1.cross_attn.norm_k.weight" in state
    assert "blocks.0.norm3.weight" in state and not any(".attn1." in k or "to_q" in k for k in state)
    work = tmp_path_factory.mktemp("original")
    single = work / "wan2.1_t2v_tiny.safetensors"
    save_file(state, single)
    shards = work / "shards"
    shards.mkdir()
    names = sorted(state)
    half = len(names) // 2
    for i, part in enumerate((names[:half], names[half:])):
        save_file({k: state[k] for k in part}, shards / f"diffusion_pytorch_model-0000{i + 1}-of-00002.safetensors")
    return pipe, single, shards


def transformer_outputs(transformers, gen):
    x = torch.randn(1, 16, 3, 8, 12, generator=gen)
    t, text = torch.tensor([500.0]), torch.randn(1, 7, 32, generator=gen)
    with torch.no_grad():
        return [transformer(x, t, text, return_dict=False)[0] for transformer in transformers]


@pytest.mark.parametrize("which", ["single", "shards"])
def test_original_checkpoint_loads_to_the_same_model(tiny_model, original, which, gen):
    pipe, single, shards = original
    loaded = load_transformer(single if which == "single" else shards, str(tiny_model), torch.float32)
    reference = pipe.transformer.state_dict()
    assert loaded.state_dict().keys() == reference.keys()
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, reference[name]), name
    out, ref = transformer_outputs([loaded, pipe.transformer], gen)
    # the weights are bit-equal (above); the outputs differ only by float32 rounding of other memory layouts
    assert ref.abs().max() > 0.1
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)


def test_keep_fp32_modules_in_bf16(tiny_model, original):
    _, single, _ = original
    loaded = load_transformer(single, str(tiny_model), torch.bfloat16)
    assert loaded.blocks[0].attn1.to_q.weight.dtype == torch.bfloat16
    assert loaded.blocks[0].scale_shift_table.dtype == torch.float32 and loaded.blocks[0].norm2.weight.dtype == torch.float32
    # the rotary tables as from_pretrained has them: float32, not bf16 values cast back
    stock = load_pipeline(str(tiny_model), device="cpu", dtype=torch.bfloat16).transformer
    assert stock.rope.freqs_cos.dtype == torch.float32
    for name in ("freqs_cos", "freqs_sin"):
        assert torch.equal(getattr(loaded.rope, name), getattr(stock.rope, name)), name


def test_generate_with_original_transformer_matches(tiny_model, original, tmp_path, raw_frames):
    """The whole CLI: --transformer swaps in the converted weights; the video (raw frames) equals the stock one."""
    _, single, _ = original
    videos = []
    for name, extra in (("stock", []), ("swapped", ["--transformer", single])):
        out = tmp_path / f"{name}.mp4"
        args = ["--prompt", "a dog runs", "--model", tiny_model, "--output", out, "--config", "configs/nabla-0.7.yaml",
                *SMALL, *extra]
        assert generate.main([str(a) for a in args]) == 0
        videos.append(np.load(out))
    assert videos[0].shape == (9, 64, 96, 3)
    np.testing.assert_allclose(videos[1], videos[0], rtol=0, atol=1e-5)


def test_incomplete_checkpoint_is_refused(tiny_model, original, tmp_path):
    _, single, _ = original
    from safetensors.torch import load_file

    state = load_file(single)
    del state["blocks.1.self_attn.q.weight"]
    partial = tmp_path / "partial.safetensors"
    save_file(state, partial)
    with pytest.raises(ValueError, match=r"partial.safetensors lacks weights that the transformer of .* needs"):
        load_transformer(partial, str(tiny_model), torch.float32)


def test_wrong_architecture_is_one_line(tiny_model, original, tmp_path):
    _, single, _ = original
    from safetensors.torch import load_file

    state = load_file(single)
    state["blocks.0.ffn.0.weight"] = torch.zeros(64, 24)  # ffn 64 wide, the config says 32
    wrong = tmp_path / "wrong.safetensors"
    save_file(state, wrong)
    with pytest.raises(ValueError) as info:
        load_transformer(wrong, str(tiny_model), torch.float32)
    assert str(info.value).startswith(f"transformer: {wrong} does not fit") and "\n" not in str(info.value)


@pytest.mark.parametrize("kind", ["missing", "bad-suffix", "empty-folder"])
def test_bad_transformer_path_fails_before_loading(tmp_path, capsys, kind):
    path = tmp_path / "ckpt"
    if kind == "bad-suffix":
        path = tmp_path / "weights.txt"
        path.write_text("x")
    elif kind == "empty-folder":
        path.mkdir()
    # a model that does not exist: the transformer path must be refused before any loading is tried
    code = generate.main(["--prompt", "a cat", "--model", str(tmp_path / "no-model"), "--output",
                          str(tmp_path / "v.mp4"), "--transformer", str(path), *SMALL])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: transformer: ") and str(path) in err and "\n" not in err
    assert not (tmp_path / "v.mp4").exists()
    np.testing.assert_equal(sorted(p.name for p in tmp_path.iterdir()), sorted({path.name}) if path.exists() else [])
