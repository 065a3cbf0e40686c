"""The package as a user gets it: a wheel installed in a fresh venv outside the checkout, its command, configs,
version and license; requirements.txt against pyproject.toml; .gitignore against the README's outputs; CI
against the README's set-up."""

import importlib.metadata
import shutil
import site
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import nabla
import wan
from wan.defaults import shipped_configs

ROOT = Path(__file__).resolve().parents[1]


def test_requirements_txt_is_pyprojects_dependency_list():
    pytest.importorskip("tomllib")  # Python 3.11+, as the script that writes requirements.txt
    from scripts.write_requirements import requirements_text

    assert (ROOT / "requirements.txt").read_text() == requirements_text(), "run python scripts/write_requirements.py"


def test_version_and_license():
    assert wan.__version__ == nabla.__version__ == importlib.metadata.version("nabla-wan")
    license_text = (ROOT / "LICENSE").read_text()
    assert license_text.split()[:3] == ["Apache", "License", "Version"] and "END OF TERMS AND CONDITIONS" in license_text


def test_gitignore_covers_what_the_readme_makes():
    made = ["tiny-wan/model_index.json", "plots/density.png", "demo.mp4", "fox.npy", "fox.json", "fox.masks.pt",
            "build/lib/wan/cli.py", "dist/nabla_wan-0.1.0-py3-none-any.whl", "nabla_wan.egg-info/PKG-INFO"]
    ignored = subprocess.run(["git", "check-ignore", "--no-index", *made], cwd=ROOT, capture_output=True, text=True,
                             check=False).stdout.split()
    assert ignored == made
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    kept = subprocess.run(["git", "check-ignore", "--no-index", *tracked], cwd=ROOT, capture_output=True, text=True,
                          check=False).stdout.split()
    assert kept == []  # no tracked file (e.g. a .json or .npy in a subfolder) is hidden


def test_ci_runs_the_readmes_commands():
    readme, ci = (ROOT / "README.md").read_text(), (ROOT / ".ci/run").read_text()
    setup = readme.split("## Set up", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    assert "pip install torch==2.13.0  " in setup and 'pip install -e ".[test]"' in setup
    tests = readme.split("## Tests", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0].strip()
    assert tests == "python -m pytest -q"
    assert "pip install -q --disable-pip-version-check torch==2.13.0\n" in ci  # the plain line: CI reaches PyPI only
    assert 'pip install -q --disable-pip-version-check -e ".[test]"\n' in ci and "python3 -m pytest -q\n" in ci


def test_installed_command_outside_the_checkout(tmp_path, tiny_model):
    """pip install of a copy of the sources into a fresh venv; from a folder with no checkout in sight, the
    installed `nabla-wan` makes the tiny model, and a video with a config found by name (of the suite's tiny model,
    made alike, so that the two commands run side by side)."""
    source = tmp_path / "src"
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, source / name if source.exists() else _mkdir(source) / name)
    for package in ("nabla", "wan", "configs"):  # wan/configs links to ../configs, as in the checkout
        shutil.copytree(ROOT / package, source / package, symlinks=True,
                        ignore=shutil.ignore_patterns("__pycache__"))
    # The wheel is built by this interpreter (the setuptools the suite runs with: a venv's own, not its base's), then
    # installed into a fresh venv that sees this interpreter's packages (torch, diffusers, ...) through a .pth file,
    # not the base interpreter's through --system-site-packages: inside a user's venv those are another set.
    wheels = _mkdir(tmp_path / "dist")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "--disable-pip-version-check", "-w", wheels, source], check=True, capture_output=True)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], check=True)
    python = venv / "bin" / "python"
    venv_site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                               check=True, capture_output=True, text=True).stdout.strip()
    Path(venv_site, "outer.pth").write_text("\n".join(_site_dirs()) + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps",
                    "--disable-pip-version-check", *wheels.glob("*.whl")], check=True, capture_output=True)
    work = _mkdir(tmp_path / "work")
    command = venv / "bin" / "nabla-wan"

    def start(*args) -> subprocess.Popen:
        return subprocess.Popen(args, cwd=work, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    # where each package would be imported from, found without importing them (torch's import alone takes seconds);
    # the four processes run side by side
    probe = "import importlib.metadata as m, importlib.util as u; print(*(u.find_spec(p).origin for p in ('wan', " \
            "'nabla')), m.version('nabla-wan'), m.metadata('nabla-wan')['License-Expression'], " \
            "*(u.find_spec(p).origin for p in ('torch', 'setuptools')))"
    shutil.copytree(tiny_model, work / "tiny")
    args = ["generate", "--model", "tiny", "--prompt", "a cat", "--config", "nabla-0.7", "--height", "32", "--width",
            "32", "--frames", "5", "--steps", "2", "--output", "v.npy"]
    probing, refusing = start(python, "-c", probe), start(command, "generate", "--prompt", "a cat", "--device", "gpu")
    making, generating = start(command, "make-tiny-model", "tw"), start(command, *args)
    out, err = generating.communicate(timeout=300)
    assert generating.returncode == 0, err
    assert "nabla, threshold 0.7" in out and np.load(work / "v.npy").shape == (5, 32, 32, 3)
    where, _ = probing.communicate(timeout=300)
    where = where.split()
    assert probing.returncode == 0 and all(path.startswith(str(venv)) for path in where[:2])
    import setuptools
    import torch

    assert where[2:4] == [wan.__version__, "Apache-2.0"]
    assert where[4:] == [torch.__file__, setuptools.__file__]  # the venv runs on this interpreter's packages
    installed = Path(where[0]).parent / "configs"
    assert sorted(p.stem for p in installed.glob("*.yaml")) == shipped_configs() and not installed.is_symlink()
    _, made = making.communicate(timeout=300)
    assert making.returncode == 0 and (work / "tw" / "model_index.json").is_file(), made
    _, bad = refusing.communicate(timeout=300)
    assert refusing.returncode == 2 and bad.startswith("error: --device 'gpu' is not allowed") and bad.count("\n") == 1


def _site_dirs() -> list[str]:
    """The site-packages folders this interpreter imports from (a venv's, and its base's where it includes them)."""
    dirs = site.getsitepackages() + ([site.getusersitepackages()] if site.ENABLE_USER_SITE else [])
    return [d for d in dirs if Path(d).is_dir()]


def _mkdir(path: Path) -> Path:
    path.mkdir()
    return path
