"""`nabla-wan finetune` on the tiny Kandinsky 5 T2V checkpoint (CPU, float32): a LoRA on its visual blocks trains under
NABLA on tiny clips, and the LoRA it writes loads through diffusers' `load_lora_weights` and changes the transformer's
output; what it does not train yet is refused in one line before loading."""

import json

import pytest
import torch
from diffusers import DiffusionPipeline

import finetune
from wan.models.tiny import write_demo_clips

CONFIG = """sparsity: {mode: nabla, threshold: 0.5, block_size: 64}
training:
  method: %s
  height: 128
  width: 128
  frames: 5
  fps: 8
  rank: 4
  alpha: 4
  learning_rate: 1.0e-2
  steps: 2
  batch_size: 1
  checkpoint_every: 10
  tracker: null
"""


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    return write_demo_clips(tmp_path_factory.mktemp("k5_clips"), count=1, frames=9, size=(128, 128))


def train(model, clips, folder, method="lora") -> int:
    config = folder / "k5.yaml"
    config.write_text(CONFIG % method)
    return finetune.main(["train", "--model", str(model), "--data", str(clips), "--config", str(config), "--output",
                          str(folder / "run"), "--device", "cpu", "--cache", str(folder / "cache")])


def transformer_output(transformer) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        return transformer(hidden_states=torch.randn(1, 2, 16, 16, 9, generator=gen),
                           encoder_hidden_states=torch.randn(1, 5, 16, generator=gen), timestep=torch.tensor([500.0]),
                           pooled_projections=torch.randn(1, 32, generator=gen),
                           visual_rope_pos=[torch.arange(2), torch.arange(8), torch.arange(8)],
                           text_rope_pos=torch.arange(5)).sample


def test_a_lora_trains_under_nabla_and_loads_through_diffusers(kandinsky5_model, clips, tmp_path):
    assert train(kandinsky5_model, clips, tmp_path) == 0
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert len(log) == 2 and all(torch.isfinite(torch.tensor(e["loss"])) and e["grad_norm"] > 0 for e in log)
    assert all(e["density"] < 1.0 for e in log)  # NABLA dropped blocks: the steps trained sparse
    pipe = DiffusionPipeline.from_pretrained(kandinsky5_model)
    stock = transformer_output(pipe.transformer)
    pipe.load_lora_weights(str(tmp_path / "run" / "lora"))
    adapted = {name.split(".lora_A")[0] for name, _ in pipe.transformer.named_modules() if name.endswith("lora_A")}
    assert adapted and all(name.startswith("visual_transformer_blocks.") for name in adapted)  # text blocks stay
    assert not any("modulation" in name for name in adapted)
    assert (transformer_output(pipe.transformer) - stock).abs().max() > 1e-4


@pytest.mark.parametrize("i2v, method, message", [
    (False, "full", "bad value for 'training.method': 'full'; allowed: lora for"),
    (True, "lora", "is a Kandinsky5I2VPipeline, which finetune.py does not train"),
])
def test_what_it_does_not_train_is_refused_in_one_line(i2v, method, message, kandinsky5_model, kandinsky5_i2v_model,
                                                        clips, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("wan.train.trainer.load_trainable_transformer", lambda *a, **k: pytest.fail("loaded"))
    assert train(kandinsky5_i2v_model if i2v else kandinsky5_model, clips, tmp_path, method) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err, err
