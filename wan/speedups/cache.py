"""Step caches from diffusers' hooks, set by the YAML `cache:` section, on the (NABLA-patched) transformer.

    cache: {type: taylorseer, cache_interval: 3, disable_cache_before_step: 2}
    cache: {type: first_block, threshold: 0.05}

Keys other than `type` are the fields of diffusers' own config dataclass (TaylorSeerCacheConfig,
FirstBlockCacheConfig), checked against `dataclasses.fields` so that a diffusers upgrade that renames
one is caught here, with one-line errors like the `sparsity:` section's.

TaylorSeer defaults to its lite mode here: diffusers' default patterns (`^blocks.*attn`, by
`re.fullmatch`) match no module of WanTransformer3DModel (its attentions are `attn1` and `attn2`),
so with its defaults it skips nothing. Lite mode skips whole blocks (`blocks.N` return zeros of the
recorded shape) and extrapolates `proj_out` only; caching every block's output instead
(`cache_identifiers: ['blocks\\.\\d+']`) keeps (max_order + 1) block outputs per block and CFG pass,
about 124 GB at 14B 720p in bf16.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any

import torch

CACHE_TYPES = ("taylorseer", "first_block")
FACTOR_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _bad(key: str, value: Any, allowed: str) -> None:
    raise ValueError(f"config: bad value for 'cache.{key}': {value!r}; allowed: {allowed}")


def _check_int(key: str, value: Any, low: int, nullable: bool = False) -> None:
    if value is None and nullable:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        _bad(key, value, f"an integer >= {low}" + (" or null" if nullable else ""))


def _check_patterns(key: str, value: Any) -> None:
    if value is None:
        return
    if not isinstance(value, list) or not all(isinstance(p, str) for p in value):
        _bad(key, value, "a list of regular expressions (matched with re.fullmatch on module names) or null")
    for pattern in value:
        try:
            re.compile(pattern)
        except re.error as err:
            _bad(key, pattern, f"a valid regular expression ({err})")


def _taylorseer(values: dict[str, Any]) -> Any:
    from diffusers.hooks import TaylorSeerCacheConfig

    for key in ("cache_interval", "max_order"):
        if key in values:
            _check_int(key, values[key], 1 if key == "cache_interval" else 0)
    if "disable_cache_before_step" in values:
        _check_int("disable_cache_before_step", values["disable_cache_before_step"], 0)
    if "disable_cache_after_step" in values:
        _check_int("disable_cache_after_step", values["disable_cache_after_step"], 0, nullable=True)
    if "taylor_factors_dtype" in values:
        name = values["taylor_factors_dtype"]
        if name not in FACTOR_DTYPES:
            _bad("taylor_factors_dtype", name, ", ".join(FACTOR_DTYPES))
        values["taylor_factors_dtype"] = FACTOR_DTYPES[name]
    for key in ("skip_predict_identifiers", "cache_identifiers"):
        _check_patterns(key, values.get(key))
    custom = values.get("skip_predict_identifiers") is not None or values.get("cache_identifiers") is not None
    lite = values.setdefault("use_lite_mode", not custom)  # the only default that skips anything on Wan
    if not isinstance(lite, bool):
        _bad("use_lite_mode", lite, "true or false")
    if lite and custom:
        # diffusers would only log that lite mode overrides the patterns
        _bad("use_lite_mode", lite, "false when skip_predict_identifiers or cache_identifiers are set")
    if not lite and not custom:
        _bad("use_lite_mode", lite, "true, unless cache_identifiers or skip_predict_identifiers are set (diffusers' "
             "default patterns match no module of Wan's transformer: nothing would be cached)")
    return TaylorSeerCacheConfig(**values)


def _first_block(values: dict[str, Any]) -> Any:
    from diffusers.hooks import FirstBlockCacheConfig

    threshold = values.get("threshold", 0.05)
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or threshold < 0:
        _bad("threshold", threshold, "a number >= 0 (0 never skips)")
    return FirstBlockCacheConfig(**values)


def cache_config(section: Mapping[str, Any] | None) -> Any:
    """The diffusers cache config for a YAML `cache:` section; None when there is none (or it is `type: none`)."""
    if section is None:
        return None
    if not isinstance(section, Mapping):
        # ValueError, like every config error: generate.py turns it into one line and exit code 2
        raise ValueError(f"config: 'cache' must be a mapping of keys to values, got {section!r}")  # noqa: TRY004
    values = dict(section)
    kind = values.pop("type", None)
    if kind == "none":
        if values:
            raise ValueError(f"config: 'cache.type: none' takes no other keys, got {', '.join(values)}")
        return None
    if kind not in CACHE_TYPES:
        raise ValueError(f"config: bad value for 'cache.type': {kind!r}; allowed: {', '.join(CACHE_TYPES)}, none")
    from diffusers.hooks import FirstBlockCacheConfig, TaylorSeerCacheConfig

    config_class = TaylorSeerCacheConfig if kind == "taylorseer" else FirstBlockCacheConfig
    allowed = [f.name for f in dataclasses.fields(config_class)]
    for key in values:
        if key not in allowed:
            raise ValueError(f"config: unknown key 'cache.{key}' for type {kind}; "
                             f"allowed keys: type, {', '.join(allowed)}")
    return _taylorseer(values) if kind == "taylorseer" else _first_block(values)


def describe_cache(config: Any) -> str:
    """One line for the run summary: the cache type and its main setting."""
    if config is None:
        return "no cache"
    from diffusers.hooks import FirstBlockCacheConfig

    if isinstance(config, FirstBlockCacheConfig):
        return f"first-block cache, threshold {config.threshold}"
    mode = "lite" if config.use_lite_mode else "custom modules"
    return (f"TaylorSeer ({mode}), interval {config.cache_interval}, order {config.max_order}, "
            f"from step {config.disable_cache_before_step}")


def check_cache_parallel(config: Any, ulysses: int) -> None:
    """First-block cache cannot run under Ulysses: refuse it before any model loads.

    Its head-block hook compares block 0's residual against the one it cached, on this rank's
    shard of the sequence: registered after context parallelism it sees the whole input but a
    shard's output (shapes differ: tried on the CPU, 2 ranks, it fails with "size of tensor a (96) must match
    the size of tensor b (192)"), registered before it each rank decides on its own shard and
    ranks would disagree on whether to run the blocks (and their all-to-alls). TaylorSeer decides by
    step index, identically on every rank. CFG parallel (whole sequences per rank) takes both.
    """
    if config is None or ulysses == 1:
        return  # and diffusers stays unimported until the input is known to be good
    from diffusers.hooks import FirstBlockCacheConfig

    if isinstance(config, FirstBlockCacheConfig):  # a combination refused, not a wrong type
        raise ValueError(  # noqa: TRY004
            "cache type first_block decides per rank on its shard of the sequence and cannot run with "
            "--ulysses > 1; use type taylorseer, or --cfg-parallel alone")


def expert_cache(config: Any, first_step: int) -> Any:
    """The cache config of an expert whose first step in the run is `first_step` (Wan2.2's low-noise expert).

    diffusers' TaylorSeer hook counts the steps of the module it is on: an expert that starts mid-run counts from its
    own first step. `disable_cache_before_step` stays so counted (its Taylor factors come from its own outputs, of
    which it has none before), while `disable_cache_after_step` is shifted so that it counts the whole run's steps.
    """
    from diffusers.hooks import TaylorSeerCacheConfig

    if not isinstance(config, TaylorSeerCacheConfig) or config.disable_cache_after_step is None:
        return config
    return dataclasses.replace(config, disable_cache_after_step=max(0, config.disable_cache_after_step - first_step))


def enable_cache(transformer: torch.nn.Module, config: Any) -> None:
    """Hook the cache onto `transformer` (after any NABLA patch and context parallelism; see README)."""
    if config is None:
        return
    from diffusers.hooks import TaylorSeerCacheConfig

    if isinstance(config, TaylorSeerCacheConfig):
        _eager_taylorseer_update()
    transformer.enable_cache(config)


def _eager_taylorseer_update() -> None:
    # diffusers' TaylorSeerState.update stores its step counter (an int) from inside a compiled block's graph,
    # where dynamo specialises on it: the block would recompile at every computed step, and past the recompile
    # limit run uncompiled. Run the update eagerly instead: a few elementwise ops on the block's output.
    from diffusers.hooks.taylorseer_cache import TaylorSeerState

    if not getattr(TaylorSeerState.update, "_nabla_eager", False):
        TaylorSeerState.update = torch.compiler.disable(TaylorSeerState.update)
        TaylorSeerState.update._nabla_eager = True


def disable_cache(transformer: torch.nn.Module) -> None:
    """Remove the cache hooks `enable_cache` added, if any."""
    if getattr(transformer, "_cache_config", None) is not None:
        transformer.disable_cache()
