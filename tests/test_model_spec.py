"""The model spec, one home for a Wan pipeline's facts: read from each tiny family's saved folder (its files, before
anything loads), from its configs through diffusers (as training reads a hub id's), and from the pipeline loaded by
the user's code path, the three give the facts the family was built with."""

import dataclasses

import pytest

from wan.models.loading import load_pipeline
from wan.models.spec import EXPERT_NAMES, I2V_PIPELINE, T2V, T2V_PIPELINE, ModelSpec
from wan.models.tiny import TINY, save_tiny_model

NAMES = {"wan2.1-t2v": "Wan2.1 T2V", "wan2.2-a14b": "Wan2.2 T2V-A14B", "wan2.1-i2v": "Wan2.1 I2V",
         "wan2.1-flf2v": "Wan2.1 FLF2V", "wan2.2-ti2v": "Wan2.2 TI2V-5B", "wan2.2-i2v-a14b": "Wan2.2 I2V-A14B",
         "wan2.1-vace": "Wan2.1 VACE", "wan2.2-animate": "Wan2.2 Animate"}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {family: save_tiny_model(root / family, seed=1, family=family) for family in TINY}


@pytest.mark.parametrize("family", list(TINY))
def test_each_family_reads_back_its_facts(folders, family):
    folder = str(folders[family])
    built = dataclasses.replace(TINY[family], model=folder)
    from_files = ModelSpec.from_folder(folder)
    assert from_files == built
    assert ModelSpec.read(folder) == built
    pipe = load_pipeline(folder, device="cpu")
    assert ModelSpec.from_pipeline(pipe, folder) == built
    assert from_files.name == NAMES[family]


def test_the_facts_that_follow(folders):
    specs = {family: ModelSpec.from_folder(str(folder)) for family, folder in folders.items()}
    assert [specs[f].image_frames for f in TINY] == [0, 0, 1, 2, 0, 2, 0, 1]
    assert [specs[f].image_condition for f in TINY] == [False, False, True, True, False, True, False, False]
    assert [specs[f].image_embeds for f in TINY] == [False, False, True, True, False, False, False, True]
    assert [specs[f].pixels_per_token for f in TINY] == [16, 16, 16, 16, 32, 16, 16, 16]
    assert [specs[f].vace for f in TINY] == [False] * 6 + [True, False]
    assert [specs[f].animate for f in TINY] == [False] * 7 + [True] and specs["wan2.2-animate"].face_size == 16
    assert specs["wan2.2-a14b"].experts == EXPERT_NAMES and specs["wan2.2-a14b"].boundary_ratio == 0.875
    assert specs["wan2.2-i2v-a14b"].boundary_ratio == 0.9 and specs["wan2.1-i2v"].boundary_ratio is None
    assert specs["wan2.2-ti2v"].token_grid(121, 704, 1280) == (31, 22, 40)
    assert specs["wan2.1-t2v"].token_grid(81, 720, 1280) == (21, 45, 80)
    assert specs["wan2.2-a14b"].timestep_range("transformer_2") == (0.0, 875.0)
    assert specs["wan2.1-t2v"].timestep_range("transformer") is None


def test_a_hub_id_has_no_folder_spec(tmp_path):
    assert ModelSpec.from_folder("Wan-AI/Wan2.1-T2V-1.3B-Diffusers") is None
    assert ModelSpec.from_folder(str(tmp_path)) is None  # a folder without model_index.json: loading says why


def test_from_configs_defaults():
    spec = ModelSpec.from_configs("m", {"_class_name": I2V_PIPELINE, "transformer_2": [None, None]},
                                  {"image_dim": 1280, "pos_embed_seq_len": 514})
    assert (spec.pipeline, spec.experts, spec.clip_images, spec.vae_scale, spec.patch_size) == (
        I2V_PIPELINE, ("transformer",), 2, 8, (1, 2, 2))
    assert T2V.pipeline == T2V_PIPELINE and T2V.pixels_per_token == 16
