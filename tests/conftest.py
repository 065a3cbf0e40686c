import shutil
import tempfile
from pathlib import Path

import huggingface_hub.constants
import numpy as np
import pytest
import torch

import wan.io.video
from tests import forked
from tests.triton_helpers import INTERPRETED, read_check, start_checks
from wan.models.tiny import save_tiny_model


def pytest_collection_finish(session):
    """The interpreted Triton checks of the collected test files start now, in one background process: on one core
    they run beside the in-process tests, and are done by the time their tests read them. So do the server of
    tests.forked, where a collected test file runs scripts through it, and what test modules start early."""
    if session.config.option.collectonly:
        return
    modules = {item.module.__name__.rpartition(".")[2] for item in session.items
               if "interpreted" in getattr(item, "fixturenames", ())}
    names = [name for name, (module, _, _) in INTERPRETED.items() if module in modules]
    if names:
        folder = Path(tempfile.mkdtemp(prefix="interpreted-"))
        session.config.stash[_CHECKS] = (start_checks(names, folder), folder)
    # the server of forked scripts imports what they need once, now, beside the first in-process tests; then the
    # test modules that start processes early (a `start_early(items)`) start them
    if any(getattr(getattr(item, "module", None), "forked", None) is forked for item in session.items):
        forked.start_server()
    by_module = {}
    for item in session.items:
        by_module.setdefault(getattr(item, "module", None), []).append(item)
    for module, items in by_module.items():
        if hasattr(module, "start_early"):
            module.start_early(items)


def pytest_collection_modifyitems(items):
    """The tests that read what runs in the background go last: by then it has run on the CPU the others left idle."""
    items.sort(key=lambda item: any(name in getattr(item, "fixturenames", ()) for name in BACKGROUND))


#: the fixtures through which tests read what runs in the background from the session's start
BACKGROUND = ("interpreted", "benchmark_runs")


def pytest_sessionfinish(session):
    """Checks and scripts that a test selection left unread are stopped."""
    forked.stop_all()
    if _CHECKS in session.config.stash:
        process, folder = session.config.stash[_CHECKS]
        if process.poll() is None:
            process.kill()
        process.communicate()
        shutil.rmtree(folder, ignore_errors=True)


_CHECKS = pytest.StashKey()


@pytest.fixture(scope="session")
def interpreted(request):
    """`interpreted(name)`: the stdout of the named check of tests.triton_helpers.INTERPRETED, once it has passed."""
    process, folder = request.config.stash[_CHECKS]
    return lambda name: read_check(process, folder, name)


@pytest.fixture
def gen() -> torch.Generator:
    """A fresh random generator per test, seeded from the global RNG so every run draws new inputs."""
    return torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ())))


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads the variable once, at import; its HTTP layer checks this constant per request.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A tiny random Wan2.1 T2V checkpoint in diffusers layout, saved the way a user's would be."""
    return save_tiny_model(tmp_path_factory.mktemp("tiny_wan"), seed=0)


@pytest.fixture(scope="session")
def a14b_model(tmp_path_factory) -> Path:
    """A tiny random Wan2.2 A14B-style checkpoint: two experts switched at boundary_ratio 0.875."""
    return save_tiny_model(tmp_path_factory.mktemp("tiny_a14b"), seed=0, family="wan2.2-a14b")


@pytest.fixture(scope="session")
def i2v_model(tmp_path_factory) -> Path:
    """A tiny random Wan2.1 I2V checkpoint: a WanImageToVideoPipeline with a CLIP image encoder."""
    return save_tiny_model(tmp_path_factory.mktemp("tiny_i2v"), seed=0, family="wan2.1-i2v")


@pytest.fixture(scope="session")
def flf2v_model(tmp_path_factory) -> Path:
    """A tiny random Wan2.1 FLF2V checkpoint: Wan2.1 I2V with position embeddings for a first and a last image."""
    return save_tiny_model(tmp_path_factory.mktemp("tiny_flf2v"), seed=0, family="wan2.1-flf2v")


@pytest.fixture(scope="session")
def vace_model(tmp_path_factory) -> Path:
    """A tiny random Wan2.1 VACE checkpoint: a WanVACEPipeline whose transformer has 2 main blocks and 1 VACE block."""
    return save_tiny_model(tmp_path_factory.mktemp("tiny_vace"), seed=0, family="wan2.1-vace")


@pytest.fixture(scope="session")
def kandinsky5_model(tmp_path_factory) -> Path:
    """A tiny random Kandinsky 5 Lite T2V 10s-style checkpoint (NABLA-trained config: P 0.9, STA 11x3x3; 2 visual
    blocks), saved the way `make-tiny-model --family kandinsky5-lite` saves it."""
    from wan.models.tiny_kandinsky5 import save_tiny_model as save_kandinsky5

    return save_kandinsky5(tmp_path_factory.mktemp("tiny_k5"), seed=0)


@pytest.fixture(scope="session")
def kandinsky5_i2v_model(tmp_path_factory) -> Path:
    """The same as a Kandinsky5I2VPipeline: image to video, its first frame's latents given to the transformer."""
    from wan.models.tiny_kandinsky5 import save_tiny_model as save_kandinsky5

    return save_kandinsky5(tmp_path_factory.mktemp("tiny_k5_i2v"), seed=0, family="kandinsky5-lite-i2v")


@pytest.fixture
def raw_frames(monkeypatch):
    """write_video stores the raw float frames (.npy bytes at the .mp4 path): MP4 encoding is lossy, and
    turns float32 rounding into whole pixel levels, so tests that compare videos read these instead."""

    def save_frames(frames, path, fps, quality):
        with open(path, "wb") as f:
            np.save(f, np.stack(frames))

    monkeypatch.setattr(wan.io.video, "export_to_video", save_frames)
