
import pytest
import torch



@pytest.fixture
def gen() -> torch.Generator:
    """A fresh random generator per test, seeded from the global RNG so every run draws new inputs."""
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ())))
    return g
