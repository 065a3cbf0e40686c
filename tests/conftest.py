from pathlib import Path

import huggingface_hub.constants
import pytest
import torch

from scripts.make_tiny_model import save_tiny_model


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
