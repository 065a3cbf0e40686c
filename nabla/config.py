"""Sparsity configuration: which attention a model runs, and the YAML that sets it."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

import yaml

MODES = ("full", "nabla", "sta", "nabla+sta")
BLOCK_SIZES = (64, 128)
BACKENDS = ("auto", "triton", "flash")


@dataclasses.dataclass(frozen=True)
class SparsityConfig:
    """How self-attention is sparsified.

    mode: "full" (dense), "nabla", "sta" or "nabla+sta" (union of both masks).
    threshold: NABLA pooled-mass threshold in (0, 1]; larger is denser, 1.0 keeps every block.
    sta_window: STA window (wT, wH, wW) in tiles, odd numbers.
    sta_shift_at_border: move the STA window inward at the borders instead of shrinking it.
    dense_steps: the first N denoising steps run dense attention.
    block_size: tokens per attention block: 64 (one 8x8 tile) or 128 (two tiles, faster kernels;
        STA is then OR-pooled to 128-token blocks).
    min_density, max_density: optional bounds on the fraction of NABLA blocks kept per query row.
    backend: FlexAttention kernel on CUDA: "flash" (FlashAttention-4 CuTe kernels, package
        flash-attn-4, Hopper/Blackwell), "triton", or "auto" (flash where it can run, else triton).
    dense_above: a layer whose mask keeps more than this fraction of blocks runs dense attention
        instead (the sparse kernel no longer wins there); "auto" takes the crossover measured for the
        backend and block sizes, 1.0 never falls back.
    query_block_size: tokens per query block in the attention kernel; null (exact) for block_size. 128
        with block_size 64 runs each pair of 64-token query blocks as one 128-row kernel block in which
        both attend the union of their key blocks: a superset of the mask (more attention, never less)
        at the 128-token kernel's speed (FlashAttention-4 on Hopper runs 64-token query blocks in
        64-row tiles, 1.4x slower per block). It costs what the union adds to the density: little where
        neighbouring query tiles keep the same key tiles, as in trained video models.
    """

    mode: str = "full"
    threshold: float = 0.7
    sta_window: tuple[int, int, int] = (11, 3, 3)
    sta_shift_at_border: bool = False
    dense_steps: int = 0
    block_size: int = 64
    min_density: float | None = None
    max_density: float | None = None
    backend: str = "auto"
    dense_above: float | str = "auto"
    query_block_size: int | None = None

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            _bad("mode", self.mode, f"one of {', '.join(MODES)}")
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, (int, float)):
            _bad("threshold", self.threshold, "a number in (0, 1]")
        if not 0.0 < self.threshold <= 1.0:
            _bad("threshold", self.threshold, "a number in (0, 1]")
        window = self.sta_window
        if (
            not isinstance(window, (tuple, list))
            or len(window) != 3
            or any(isinstance(w, bool) or not isinstance(w, int) or w < 1 or w % 2 == 0 for w in window)
        ):
            _bad("sta_window", window, "three odd positive integers [wT, wH, wW] in tiles")
        object.__setattr__(self, "sta_window", tuple(window))
        if not isinstance(self.sta_shift_at_border, bool):
            _bad("sta_shift_at_border", self.sta_shift_at_border, "true or false")
        if isinstance(self.dense_steps, bool) or not isinstance(self.dense_steps, int) or self.dense_steps < 0:
            _bad("dense_steps", self.dense_steps, "an integer >= 0")
        if self.block_size not in BLOCK_SIZES or isinstance(self.block_size, bool):
            _bad("block_size", self.block_size, f"one of {', '.join(map(str, BLOCK_SIZES))}")
        if self.query_block_size is not None and (
            isinstance(self.query_block_size, bool)
            or self.query_block_size not in BLOCK_SIZES
            or self.query_block_size < self.block_size
        ):
            allowed = ", ".join(str(b) for b in BLOCK_SIZES if b >= self.block_size)
            _bad("query_block_size", self.query_block_size, f"null or one of {allowed} (>= block_size)")
        for key in ("min_density", "max_density"):
            value = getattr(self, key)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value <= 1.0:
                _bad(key, value, "a number in (0, 1] or null")
        if self.min_density is not None and self.max_density is not None and self.min_density > self.max_density:
            _bad("min_density", self.min_density, f"a number <= max_density ({self.max_density})")
        if self.backend not in BACKENDS:
            _bad("backend", self.backend, ", ".join(BACKENDS))
        if self.dense_above != "auto" and (
            isinstance(self.dense_above, bool)
            or not isinstance(self.dense_above, (int, float))
            or not 0.0 < self.dense_above <= 1.0
        ):
            _bad("dense_above", self.dense_above, '"auto" or a number in (0, 1]')

    @property
    def uses_nabla(self) -> bool:
        return self.mode in ("nabla", "nabla+sta")

    @property
    def uses_sta(self) -> bool:
        return self.mode in ("sta", "nabla+sta")

    @property
    def query_merge(self) -> int:
        """Mask rows (query blocks) per query block of the attention kernel."""
        return (self.query_block_size or self.block_size) // self.block_size

    @property
    def is_sparse(self) -> bool:
        return self.mode != "full"

    def replace(self, **changes: Any) -> SparsityConfig:
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], where: str = "sparsity") -> SparsityConfig:
        """Build from a mapping, rejecting unknown keys with a one-line error naming them."""
        return cls(**section_fields(cls, values, where))


def section_fields(cls: type, values: Any, where: str) -> dict[str, Any]:
    """A YAML section `where` as keyword arguments of the dataclass `cls`: a one-line ValueError for anything but a
    mapping, and for a key that is not one of its fields."""
    if not isinstance(values, Mapping):
        # ValueError, not TypeError: callers turn ValueErrors into the one-line config error
        raise ValueError(f"config: '{where}' must be a mapping of keys to values, got {values!r}")  # noqa: TRY004
    allowed = [f.name for f in dataclasses.fields(cls)]
    for key in values:
        if key not in allowed:
            raise ValueError(f"config: unknown key '{where}.{key}'; allowed keys: {', '.join(allowed)}")
    return dict(values)


def _bad(key: str, value: Any, allowed: str) -> None:
    raise ValueError(f"config: bad value for '{key}': {value!r}; allowed: {allowed}")


class _Loader(yaml.SafeLoader):
    """YAML 1.1's safe loader, with YAML 1.2's floats: `1e-4` is a number (1.1 needs `1.0e-4` and reads `1e-4` as a
    string, which a config means as a learning rate)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping, turning a missing file, a folder, a binary file or bad YAML into a one-line ValueError."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"config: {path} is a folder; give a YAML file")
    if not path.is_file():
        raise ValueError(f"config: file not found: {path}")
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_Loader)  # safe: a SafeLoader
    except UnicodeDecodeError as err:
        raise ValueError(f"config: {path} is not a text file (byte 0x{err.object[err.start]:02x} at offset "
                         f"{err.start} is not UTF-8); a config is a YAML text file") from None
    except yaml.reader.ReaderError as err:  # UTF-8, but with control characters such as NUL: binary data
        raise ValueError(f"config: {path} is not a text file (character #x{err.character:04x} at offset "
                         f"{err.position}); a config is a YAML text file") from None
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark  # 0-based; editors count lines and columns from 1
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = " ".join((err.problem or type(err).__name__).split())
        context = f" ({' '.join(err.context.split())})" if err.context else ""
        raise ValueError(f"config: {path} is not valid YAML{where}: {problem}{context}") from None
    except yaml.YAMLError as err:
        raise ValueError(f"config: {path} is not valid YAML: {' '.join(str(err).split())}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"config: {path} must hold a mapping at the top level, got {type(data).__name__}")  # noqa: TRY004
    return data


def load_config(path: str | Path, other_sections: Collection[str] = ()) -> SparsityConfig:
    """Read the `sparsity:` section of a YAML file into a SparsityConfig.

    Top-level keys other than `sparsity` and `other_sections` (sections an application reads
    itself) are rejected, as are unknown keys, wrong types and out-of-range values inside it.
    """
    data = read_yaml(path)
    allowed = ["sparsity", *other_sections]
    for key in data:
        if key not in allowed:
            raise ValueError(f"config: unknown top-level key '{key}' in {path}; allowed: {', '.join(allowed)}")
    return SparsityConfig.from_dict(data.get("sparsity") or {})
