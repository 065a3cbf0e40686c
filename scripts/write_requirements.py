"""Write requirements.txt from pyproject.toml's dependency list: `python scripts/write_requirements.py`.

tests/test_packaging.py checks that the two agree, so a dependency changes in pyproject.toml only.
"""

from __future__ import annotations

from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]
HEADER = ("# generated from pyproject.toml's [project] dependencies by `python scripts/write_requirements.py`;\n"
          "# install torch first, in the build for your machine (README, set-up)\n")


def requirements_text() -> str:
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    return HEADER + "".join(f"{d}\n" for d in dependencies)


if __name__ == "__main__":
    (ROOT / "requirements.txt").write_text(requirements_text())
    print(f"wrote {ROOT / 'requirements.txt'}")
