"""finetune.py on every tiny family besides Wan2.1 T2V (tests/test_finetune.py): Wan2.1 I2V, Wan2.2 T2V-A14B and
I2V-A14B (one expert or both, each on its side of the boundary) and TI2V-5B (per-token timesteps); the results load
back through diffusers; the family's refusals. 2-step runs of one 9-frame 32x32 clip, dense attention unless said."""

import re

import pytest
import torch
from diffusers import WanImageToVideoPipeline, WanPipeline, WanTransformer3DModel
from safetensors.torch import load_file
from test_finetune import train_args, write_clip, write_config
from test_finetune_inputs import no_weights  # noqa: F401 - a fixture

import finetune
import wan.train.trainer
from wan.models.spec import ModelSpec
from wan.models.tiny import IMAGE_DIM, IMAGE_TOKENS, save_tiny_model
from wan.train import flow_matching
from wan.train.checks import check_trainable_model, trained_experts
from wan.train.config import TrainingConfig
from wan.train.run_folder import read_log

SHORT = {"steps": 2, "batch_size": 1, "gradient_accumulation": 1, "warmup_steps": 0, "checkpoint_every": 2}
TI2V = ModelSpec("m", "WanPipeline", ti2v=True, vae_scale=16)


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clip")
    write_clip(folder / "clip0.mp4", 12, 0)
    (folder / "clip0.txt").write_text("a cat plays piano")
    return folder


@pytest.fixture(scope="module")
def ti2v_model(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny_ti2v"), family="wan2.2-ti2v")


@pytest.fixture(scope="module")
def i2v_a14b_model(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny_i2v_a14b"), family="wan2.2-i2v-a14b")


@pytest.fixture
def recorded(monkeypatch):
    """(expert, batch) of each forward, the expert named by the subfolder its transformer loaded from."""
    loaded, steps, load, losses = {}, [], wan.train.trainer.load_trainable_transformer, wan.train.trainer.sample_losses

    def load_recorded(model, training, device, expert="transformer"):
        transformer = load(model, training, device, expert)
        loaded[id(transformer)] = expert
        return transformer

    def losses_recorded(transformer, batch):
        steps.append((loaded[id(transformer)], batch))
        return losses(transformer, batch)

    monkeypatch.setattr(wan.train.trainer, "load_trainable_transformer", load_recorded)
    monkeypatch.setattr(wan.train.trainer, "sample_losses", losses_recorded)
    return steps


def train(model, clip, folder, *extra, **training):
    """2 optimizer steps of finetune.py train; returns the run folder after checking the losses are finite."""
    assert finetune.main(train_args(model, clip, write_config(folder, **{**SHORT, **training}), folder / "run",
                                    *extra)) == 0
    log = read_log(folder / "run")
    assert all(torch.isfinite(torch.tensor(e["loss"])) and e["grad_norm"] > 0 for e in log), log
    return folder / "run"


def test_families_are_read_from_the_configs(tiny_model, a14b_model, i2v_model, ti2v_model, i2v_a14b_model):
    names = [ModelSpec.read(str(m)).name for m in (tiny_model, a14b_model, i2v_model, ti2v_model, i2v_a14b_model)]
    assert names == ["Wan2.1 T2V", "Wan2.2 T2V-A14B", "Wan2.1 I2V", "Wan2.2 TI2V-5B", "Wan2.2 I2V-A14B"]
    a14b = ModelSpec.read(str(a14b_model))
    assert a14b.timestep_range("transformer") == (875.0, float("inf"))
    assert a14b.timestep_range("transformer_2") == (0.0, 875.0)
    assert trained_experts(a14b, "low") == ("transformer_2",) and trained_experts(a14b, None) == a14b.experts
    assert ModelSpec.read(str(i2v_model)).image_embeds and not ModelSpec.read(str(i2v_a14b_model)).image_embeds


# diffusers gives the LoRA zero add_k_proj / add_v_proj adapters that peft's config does not name (a T2V-style LoRA)
@pytest.mark.filterwarnings("ignore:While injecting the PEFT adapters")
def test_i2v_trains_on_the_first_frame_condition(i2v_model, clip, tmp_path, recorded):
    cache = tmp_path / "cache"
    args = ["precompute", "--model", str(i2v_model), "--data", str(clip), "--config", str(write_config(tmp_path)),
            "--cache", str(cache)]
    assert finetune.main(args) == 0
    entry = load_file(next(cache.glob("clip0-*.safetensors")))
    in_channels = WanTransformer3DModel.load_config(i2v_model, subfolder="transformer")["in_channels"]
    assert entry["latents"].shape[0] + entry["condition"].shape[0] == in_channels == 36
    assert entry["condition"].shape[1:] == entry["latents"].shape[1:]
    # the 4 mask channels: the first latent frame (the first pixel frame, 4 times over) is given, the others not
    assert entry["condition"][:4, 0].eq(1).all() and entry["condition"][:4, 1:].eq(0).all()
    assert entry["image_embeds"].shape == (IMAGE_TOKENS, IMAGE_DIM)
    run = train(i2v_model, clip, tmp_path, "--cache", str(cache))
    batch = recorded[0][1]
    assert batch["hidden_states"].shape[1] == in_channels and "encoder_hidden_states_image" in batch
    pipe = WanImageToVideoPipeline.from_pretrained(i2v_model)
    pipe.load_lora_weights(run / "lora")
    assert pipe.get_list_adapters() == {"transformer": ["default_0"]}


@pytest.mark.parametrize("expert, method", [("high", "lora"), ("low", "full")])
def test_a14b_trains_one_expert_on_its_side_of_the_boundary(a14b_model, clip, tmp_path, recorded, expert, method):
    run = train(a14b_model, clip, tmp_path, expert=expert, method=method)
    name = {"high": "transformer", "low": "transformer_2"}[expert]
    assert [e["expert"] for e in read_log(run)] == [name, name] and {n for n, _ in recorded} == {name}
    timesteps = torch.cat([batch["timestep"] for _, batch in recorded])
    assert (timesteps >= 875).all() if expert == "high" else (timesteps < 875).all(), timesteps
    other = {"transformer": "transformer_2", "transformer_2": "transformer"}[name]
    result = wan.train.trainer.result_folder(name, method == "lora")
    assert (run / result).is_dir() and not (run / wan.train.trainer.result_folder(other, method == "lora")).exists()
    if method == "full":
        tuned = WanTransformer3DModel.from_pretrained(run / result).state_dict()
        base = WanTransformer3DModel.from_pretrained(a14b_model, subfolder=name).state_dict()
        assert any(not torch.equal(tuned[k], base[k]) for k in base)
    else:
        pipe = WanPipeline.from_pretrained(a14b_model)
        pipe.load_lora_weights(run / result)
        assert pipe.get_list_adapters() == {"transformer": ["default_0"]}


def test_a14b_both_experts_alternate_under_nabla_and_resume(a14b_model, clip, tmp_path, recorded):
    """NABLA patches both experts in training; a resumed run goes on with the expert of its step."""
    sparsity = {"mode": "nabla", "threshold": 0.5}
    run = train(a14b_model, clip, tmp_path, sparsity=sparsity)
    log = read_log(run)
    assert [e["expert"] for e in log] == ["transformer", "transformer_2"] and all(e["density"] < 1 for e in log)
    assert [n for n, _ in recorded] == ["transformer", "transformer_2"]
    assert recorded[0][1]["timestep"].min() >= 875 > recorded[1][1]["timestep"].max()
    config = write_config(tmp_path, "longer", sparsity=sparsity, **{**SHORT, "steps": 3})
    assert finetune.main(train_args(a14b_model, clip, config, run, "--resume")) == 0
    assert [e["expert"] for e in read_log(run)] == ["transformer", "transformer_2", "transformer"]
    pipe = WanPipeline.from_pretrained(a14b_model)
    pipe.load_lora_weights(run / "lora", adapter_name="high")
    pipe.load_lora_weights(run / "lora_2", adapter_name="low", load_into_transformer_2=True)
    assert pipe.get_list_adapters() == {"transformer": ["high"], "transformer_2": ["low"]}


def test_i2v_a14b_trains_the_low_noise_expert_on_the_condition(i2v_a14b_model, clip, tmp_path, recorded):
    run = train(i2v_a14b_model, clip, tmp_path, expert="low")
    name, batch = recorded[0]
    assert name == "transformer_2" and batch["hidden_states"].shape[1] == 36 and batch["timestep"].max() < 900
    assert "encoder_hidden_states_image" not in batch  # Wan2.2's experts read no CLIP tokens
    pipe = WanImageToVideoPipeline.from_pretrained(i2v_a14b_model)
    pipe.load_lora_weights(run / "lora_2", load_into_transformer_2=True)
    assert pipe.get_list_adapters() == {"transformer_2": ["default_0"]}


def test_ti2v_trains_with_per_token_timesteps(ti2v_model, clip, tmp_path, recorded):
    run = train(ti2v_model, clip, tmp_path, method="full", first_frame_condition_prob=1.0)
    batch = recorded[0][1]
    tokens = batch["timestep"].view(1, 3, -1)  # 3 latent frames; 32x32 pixels: 2x2 latents, one 2x2 patch
    assert tokens[:, 0].eq(0).all() and tokens[:, 1:].gt(0).all() and tokens[:, 1:].unique().numel() == 1
    assert batch["loss_mask"][:, :, 0].eq(0).all() and batch["loss_mask"][:, :, 1:].eq(1).all()
    WanTransformer3DModel.from_pretrained(run / "transformer")


def test_ti2v_batches_mirror_the_pipelines():
    """Image to video: frame 0 clean at timestep 0 and out of the loss; text to video: every token at t."""
    entries = [{"latents": torch.randn(48, 3, 4, 4), "prompt_embeds": torch.randn(512, 32)}]
    for prob, conditioned in ((1.0, True), (0.0, False)):
        training = TrainingConfig(first_frame_condition_prob=prob, **SHORT)
        batch = wan.train.trainer.make_batch(entries, range(2), training, 3.0, torch.device("cpu"), torch.float32, TI2V)
        t = batch["timestep"][:, -1:]
        assert batch["timestep"].shape == (2, 3 * 2 * 2) and t.gt(0).all()
        assert torch.equal(batch["timestep"][:, :4], torch.zeros(2, 4) if conditioned else t.expand(2, 4))
        assert torch.equal(batch["hidden_states"][:, :, 0] == entries[0]["latents"][:, 0], torch.full(
            (2, 48, 4, 4), conditioned))


def test_token_timesteps_and_the_masked_loss():
    mask = flow_matching.first_frame_mask(torch.Size([2, 48, 3, 4, 6]), torch.tensor([True, False]))
    timesteps = flow_matching.token_timesteps(mask, torch.tensor([700.0, 300.0]), (1, 2, 2))
    # WanImageToVideoPipeline's expression, one sample at a time
    for i, t in enumerate((700.0, 300.0)):
        assert torch.equal(timesteps[i], (mask[i:i + 1][0][0][:, ::2, ::2] * t).flatten())
    assert timesteps[0, :6].eq(0).all() and timesteps[0, 6:].eq(700).all() and timesteps[1].eq(300).all()
    error = torch.ones(2, 48, 3, 4, 6)
    error[:, :, 0] = 1e6  # the conditioning frame counts for the sample it conditions only
    assert flow_matching.masked_mean(error, mask)[0] == 1 and flow_matching.masked_mean(error, mask)[1] > 1e5


def test_noise_levels_of_an_expert_keep_to_its_side(monkeypatch):
    gen = torch.Generator().manual_seed(0)
    draws = [flow_matching.sample_sigma_in((0.0, 875.0), "logit_normal", 0, 1, 1.29, 3.0, gen) for _ in range(50)]
    assert all(float(s * 1000) < 875 for s in draws)
    monkeypatch.setattr(flow_matching, "MAX_DRAWS", 5)
    with pytest.raises(ValueError, match=r"no timestep in \[2000, inf\) in 5 draws"):
        flow_matching.sample_sigma_in((2000.0, float("inf")), "logit_normal", 0, 1, 1.29, 3.0, gen)


@pytest.mark.parametrize("model, training, message", [
    ("tiny_model", {"expert": "mid"}, "'training.expert': 'mid'; allowed: high, low, both or null (both)"),
    ("tiny_model", {"first_frame_condition_prob": 1.5}, "'training.first_frame_condition_prob': 1.5; allowed: a"),
    ("tiny_model", {"expert": "high"}, "'training.expert': 'high'; allowed: null for "),
    ("a14b_model", {"first_frame_condition_prob": 0.5}, "a Wan2.2 T2V-A14B model (it sets how often Wan2.2 TI2V"),
    ("i2v_model", {"validation": {"prompts": ["a cat"], "every": 1}}, "'training.validation.every': 1; allowed: 0 for"),
    ("ti2v_model", {"height": 48}, "'training.height': 48; allowed: a multiple of 32 for"),
    ("flf2v_model", {}, "is Wan2.1 FLF2V (a first and a last frame), which finetune.py does not train; supported: "),
])
def test_family_refusals(request, clip, tmp_path, no_weights, capsys, model, training, message):  # noqa: F811
    model = request.getfixturevalue(model)
    capsys.readouterr()  # what building the model printed
    assert finetune.main(train_args(model, clip, write_config(tmp_path, **training), tmp_path / "run")) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("index, message", [
    ({"_class_name": "WanVACEPipeline"}, "m is a WanVACEPipeline, which finetune.py does not train; supported: Wan2.1"),
    ({"_class_name": "WanPipeline", "transformer_2": ["diffusers", "WanTransformer3DModel"]},
     "two transformers with boundary_ratio None"),
    ({"_class_name": "WanPipeline", "transformer_2": ["diffusers", "WanTransformer3DModel"], "boundary_ratio": 0.9,
      "expand_timesteps": True}, "expand_timesteps True, which finetune.py does not train"),
])
def test_unsupported_pipelines(index, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        check_trainable_model(ModelSpec.from_configs("m", index, {}))
