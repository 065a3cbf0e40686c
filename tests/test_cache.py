"""The `cache:` section: parsing into diffusers' configs, and the caches on a NABLA-patched tiny Wan2.1."""

import re

import pytest
import torch
from diffusers.hooks import FirstBlockCacheConfig, TaylorSeerCacheConfig
from diffusers.hooks.taylorseer_cache import _TRANSFORMER_BLOCK_IDENTIFIERS

from nabla import SparsityConfig
from wan.attention.patch import patch_transformer
from wan.generate.stats import step_report
from wan.models.tiny import build_tiny_pipeline
from wan.speedups.cache import cache_config, check_cache_parallel, disable_cache, enable_cache

STEPS = 8


def test_sections_become_diffusers_configs():
    assert cache_config(None) is None and cache_config({"type": "none"}) is None
    taylor = cache_config({"type": "taylorseer", "cache_interval": 3, "disable_cache_before_step": 2,
                           "taylor_factors_dtype": "float32"})
    assert taylor == TaylorSeerCacheConfig(cache_interval=3, disable_cache_before_step=2,
                                           taylor_factors_dtype=torch.float32, use_lite_mode=True)
    custom = cache_config({"type": "taylorseer", "cache_identifiers": [r"blocks\.\d+"]})
    assert custom.use_lite_mode is False and custom.cache_identifiers == [r"blocks\.\d+"]
    assert cache_config({"type": "first_block", "threshold": 0.1}) == FirstBlockCacheConfig(threshold=0.1)


@pytest.mark.parametrize("section, message", [
    ({"type": "teacache"}, "bad value for 'cache.type': 'teacache'; allowed: taylorseer, first_block, none"),
    ({"type": "first_block", "thresh": 0.1},
     "unknown key 'cache.thresh' for type first_block; allowed keys: type, threshold"),
    ({"type": "taylorseer", "threshold": 0.1},
     "unknown key 'cache.threshold' for type taylorseer; allowed keys: type, cache_interval"),
    ({"type": "first_block", "threshold": -0.1}, "'cache.threshold': -0.1; allowed: a number >= 0"),
    ({"type": "first_block", "threshold": True}, "'cache.threshold': True"),
    ({"type": "taylorseer", "cache_interval": 0}, "'cache.cache_interval': 0; allowed: an integer >= 1"),
    ({"type": "taylorseer", "max_order": 1.5}, "'cache.max_order': 1.5; allowed: an integer >= 0"),
    ({"type": "taylorseer", "disable_cache_before_step": -1}, "'cache.disable_cache_before_step': -1"),
    ({"type": "taylorseer", "disable_cache_after_step": "late"}, "an integer >= 0 or null"),
    ({"type": "taylorseer", "taylor_factors_dtype": "fp8"}, "allowed: float32, bfloat16, float16"),
    ({"type": "taylorseer", "cache_identifiers": ["blocks.(["]}, "a valid regular expression"),
    ({"type": "taylorseer", "use_lite_mode": True, "cache_identifiers": ["proj_out"]}, "false when"),
    ({"type": "taylorseer", "use_lite_mode": False}, "nothing would be cached"),
    ({"type": "none", "threshold": 0.1}, "'cache.type: none' takes no other keys"),
    ([1, 2], "'cache' must be a mapping"),
])
def test_bad_sections_are_refused_in_one_line(section, message):
    with pytest.raises(ValueError, match=re.escape(message)) as err:
        cache_config(section)
    assert "\n" not in str(err.value)


def test_diffusers_default_taylorseer_patterns_match_no_wan_module():
    """Why TaylorSeer defaults to lite mode here: its default patterns find nothing to cache in Wan."""
    names = [name for name, _ in build_tiny_pipeline().transformer.named_modules()]
    assert "blocks.0.attn1" in names
    assert not [n for n in names if any(re.fullmatch(p, n) for p in _TRANSFORMER_BLOCK_IDENTIFIERS)]


def test_first_block_cache_is_refused_under_ulysses_only():
    check_cache_parallel(FirstBlockCacheConfig(), 1)
    check_cache_parallel(TaylorSeerCacheConfig(use_lite_mode=True), 2)
    with pytest.raises(ValueError, match="cannot run with --ulysses > 1"):
        check_cache_parallel(FirstBlockCacheConfig(), 2)


@pytest.fixture(scope="module")
def patched():
    pipe = build_tiny_pipeline()
    pipe.set_progress_bar_config(disable=True)
    patch = patch_transformer(pipe.transformer, SparsityConfig(mode="nabla", threshold=0.5))
    return pipe, patch, latents(pipe, patch)  # uncached


def latents(pipe, patch) -> torch.Tensor:
    patch.state.reset()
    with torch.inference_mode():
        return pipe("a cat", height=64, width=96, num_frames=9, num_inference_steps=STEPS, output_type="latent",
                    generator=torch.Generator().manual_seed(0)).frames


def with_cache(pipe, patch, section):
    enable_cache(pipe.transformer, cache_config(section))
    try:
        return latents(pipe, patch), step_report(patch.state.records.passes, len(pipe.transformer.blocks)), \
            len(patch.state.records.densities)
    finally:
        disable_cache(pipe.transformer)


def test_default_taylorseer_skips_steps_and_builds_no_mask_there(patched):
    pipe, patch, plain = patched
    assert torch.equal(latents(pipe, patch), plain)
    full_calls = STEPS * len(pipe.transformer.blocks) * 2  # steps x layers x CFG passes
    assert len(patch.state.records.densities) == full_calls
    cached, report, calls = with_cache(pipe, patch, {"type": "taylorseer", "cache_interval": 3,
                                                     "disable_cache_before_step": 2})
    # steps 0, 1 warm up; then one computed step every 3: 3, 6
    assert report["computed_steps"] == [0, 1, 3, 6] and report["cached_steps"] == [2, 4, 5, 7]
    assert calls == 4 * len(pipe.transformer.blocks) * 2 < full_calls
    assert not torch.equal(cached, plain) and torch.isfinite(cached).all()
    assert torch.equal(latents(pipe, patch), plain)  # disable_cache removed every hook


def test_first_block_cache_computes_the_first_block_only_on_cached_steps(patched):
    pipe, patch, plain = patched
    cached, report, _ = with_cache(pipe, patch, {"type": "first_block", "threshold": 0.2})
    assert report["cached_steps"] and report["computed_steps"][:1] == [0]
    for entry in report["attention_calls"]:
        assert all(n in (1, len(pipe.transformer.blocks)) for n in entry["per_pass"])
    assert not torch.equal(cached, plain)


@pytest.mark.parametrize("section", [{"type": "first_block", "threshold": 0},
                                     {"type": "taylorseer", "cache_interval": 1},
                                     {"type": "taylorseer", "disable_cache_before_step": STEPS}],
                         ids=["first_block-0", "taylorseer-interval-1", "taylorseer-late"])
def test_a_cache_that_never_skips_changes_nothing(patched, section):
    pipe, patch, plain = patched
    cached, report, _ = with_cache(pipe, patch, section)
    assert report["computed_steps"] == list(range(STEPS)) and report["cached_steps"] == []
    assert torch.equal(cached, plain)
