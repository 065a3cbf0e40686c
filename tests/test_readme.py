"""The README's Python snippet, run exactly as printed (on the tiny model, which it names as the set-up's)."""

import re
from pathlib import Path

import imageio.v3 as iio
import torch

ROOT = Path(__file__).resolve().parents[1]


def readme_snippet() -> str:
    section = (ROOT / "README.md").read_text().split("## In your own diffusers code", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.DOTALL)[1]


def test_readme_snippet_runs_as_printed(tiny_model, tmp_path, monkeypatch, capsys):
    snippet = readme_snippet()
    assert 'model = "tiny-wan"' in snippet and "handle = enable_nabla(" in snippet and "write_video(" in snippet
    monkeypatch.chdir(tmp_path)  # no checkout around: the config comes by name from the package
    (tmp_path / "tiny-wan").symlink_to(tiny_model)  # where the set-up's `nabla-wan make-tiny-model tiny-wan` puts it
    torch.manual_seed(0)  # the snippet's noise comes from the global generator: a draw that leaves blocks out
    exec(compile(snippet, "README.md", "exec"), {})  # noqa: S102 - the README's own text is what is tested
    density = float(re.fullmatch(r"NABLA kept (\S+) of the attention blocks\n", capsys.readouterr().out)[1])
    assert 0 < density < 1  # NABLA ran, and left blocks out
    assert iio.imread(tmp_path / "fox.mp4").shape == (9, 64, 96, 3)
