"""Step caches on the tiny models of every mapped architecture: exactness, skipping, branches, runs, errors."""

import copy
import math

import pytest
import torch
from torch import nn

import hookwise
from hookwise import (
    CompatibilityError,
    ConfigError,
    DualBlockCache,
    FasterCache,
    FirstBlockCache,
    LayerSkip,
    MagCache,
    NoTargetError,
    PyramidAttentionBroadcast,
    TaylorSeer,
    TeaCache,
)
from hookwise.cache import cache_stats, calibrate_magcache, calibrate_teacache
from hookwise.cache._reuse import ModuleBranch
from hookwise.cache.magcache import resample_ratios
from hookwise.cache.taylorseer import TaylorRule, taylor_schedule
from hookwise.core import list_hooks

from cache_helpers import MODELS, build, count_attention, count_blocks, denoise, one_thread, uncount  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")

RATIOS = (1.0, 1.05, 1.02, 1.01, 0.99, 0.98, 0.97, 0.95)

# Settings at which a cache must compute everything (threshold 0 / interval 1).
EXACT = {
    "first_block": FirstBlockCache(threshold=0.0),
    "dual_block": DualBlockCache(threshold=0.0, front=1, back=1),
    "taylorseer": TaylorSeer(order=2, interval=1, warmup=0),
    "taylorseer_attention": TaylorSeer(order=2, interval=1, targets="attention"),
    "teacache": TeaCache(threshold=0.0),
    "magcache": MagCache(ratios=RATIOS, threshold=0.0),
    "pab": PyramidAttentionBroadcast(spatial_range=1, temporal_range=1, cross_range=1),
    "faster_cache": FasterCache(attention_range=1, uncond_range=1),
}
# Settings at which a cache must skip work on a short run.
SKIPPING = {
    "first_block": FirstBlockCache(threshold=10.0),
    "dual_block": DualBlockCache(threshold=10.0, warmup=1),
    "taylorseer": TaylorSeer(order=1, interval=2, warmup=1),
    "teacache": TeaCache(threshold=10.0),
    "magcache": MagCache(ratios=RATIOS, threshold=1.0, retention=0.1),
    "layer_skip": LayerSkip(blocks=(1,)),
}
ATTENTION_SKIPPING = {
    "pab": PyramidAttentionBroadcast(spatial_range=2, temporal_range=2, cross_range=2, spatial_window=None,
                                     temporal_window=None, cross_window=None),
    "faster_cache": FasterCache(attention_range=2, attention_window=None, uncond_range=None),
    "taylorseer_attention": TaylorSeer(order=2, interval=2, warmup=3, targets="attention"),
}


# Two main blocks leave a dual-block cache with front=1, back=1 nothing to cache: no such combination.
EXACT_CASES = [
    (cache, name)
    for name in ["flux", "wan", "sd3", "musubi"]
    for cache in EXACT
    if not (cache == "dual_block" and name in ("flux", "wan"))
]


@pytest.mark.parametrize("cache, name", EXACT_CASES, ids=[f"{name}-{cache}" for cache, name in EXACT_CASES])
def test_threshold_zero_or_interval_one_equals_the_uncached_output_exactly(cache, name):
    model, inputs = build(name)
    reference = denoise(model, name, inputs)
    hookwise.apply(model, EXACT[cache])
    if name == "musubi" and cache in ATTENTION_SKIPPING:
        # musubi blocks never call their attention modules: the first call says so, never a silent no-op
        with pytest.raises(hookwise.MapMismatchError, match="attention module .* never ran"):
            denoise(model, name, inputs)
    else:
        cached = denoise(model, name, inputs)
        assert torch.equal(cached, reference)
    hookwise.remove(model)
    assert list_hooks(model) == {}


@pytest.mark.parametrize("cache", list(SKIPPING))
@pytest.mark.parametrize("name", list(MODELS))
def test_block_caches_skip_blocks_on_every_mapped_model(cache, name):
    model, inputs = build(name)
    counters = count_blocks(model)
    reference = denoise(model, name, inputs, steps=6)
    uncached = sum(c.n for c in counters)
    for c in counters:
        c.n = 0
    config = SKIPPING[cache]
    if cache == "dual_block" and len(counters) < 3:
        config = config.replace(back=0)
    hookwise.apply(model, config)
    out = denoise(model, name, inputs, steps=6)
    assert sum(c.n for c in counters) < uncached
    assert out.shape == reference.shape and torch.isfinite(out).all()
    hookwise.remove(model)
    uncount(model)


@pytest.mark.parametrize("cache", list(ATTENTION_SKIPPING))
@pytest.mark.parametrize("name", [n for n in MODELS if n != "musubi"])  # musubi blocks never call their attention modules
def test_attention_caches_skip_attention_on_every_mapped_model(cache, name):
    model, inputs = build(name)
    counters = count_attention(model)
    reference = denoise(model, name, inputs, steps=6)
    uncached = sum(c.n for c in counters)
    for c in counters:
        c.n = 0
    hookwise.apply(model, ATTENTION_SKIPPING[cache])
    out = denoise(model, name, inputs, steps=6)
    assert 0 < sum(c.n for c in counters) < uncached
    stats = cache_stats(model)[ATTENTION_SKIPPING[cache].technique]
    assert stats["computed"] > 0 and stats["reused"] > 0
    assert torch.isfinite(out).all() and not torch.equal(out, reference)
    hookwise.remove(model)


@pytest.mark.parametrize("cache", ["first_block", "taylorseer", "teacache", "magcache", "pab"])
def test_cond_and_uncond_never_share_state(cache):
    """CFG as two calls on one cached model equals cond and uncond each on their own cached copy."""
    config = {**SKIPPING, **ATTENTION_SKIPPING}[cache] if cache != "first_block" else FirstBlockCache(threshold=0.3)
    name = "wan" if cache == "pab" else "musubi"  # musubi blocks never call their attention modules
    model, inputs = build(name)
    cond_model, uncond_model = copy.deepcopy(model), copy.deepcopy(model)
    hookwise.apply(model, config)
    hookwise.apply(cond_model, config)
    hookwise.apply(uncond_model, config)
    both = denoise(model, name, inputs, steps=8, cfg="separate")

    class Split(nn.Module):  # routes each branch to its own model
        def __init__(self):
            super().__init__()
            self.branch = "cond"

        def forward(self, **kw):
            return (cond_model if self.branch == "cond" else uncond_model)(**kw)

    split = Split()
    original = hookwise.branch

    def routed(m, name):
        split.branch = name
        return original(cond_model if name == "cond" else uncond_model, name)

    hookwise.branch = routed
    try:
        apart = denoise(split, name, inputs, steps=8, cfg="separate")
    finally:
        hookwise.branch = original
    assert torch.equal(both, apart)
    # and the states really differ per branch
    if cache in ("first_block", "taylorseer", "teacache", "magcache"):
        assert sorted(cache_stats(model)[config.technique]["branches"]) == ["cond", "uncond"]


@pytest.mark.parametrize("cache", ["first_block", "dual_block", "taylorseer", "teacache", "magcache", "pab", "faster_cache"])
def test_state_resets_between_runs_without_being_told(cache):
    config = {**SKIPPING, **ATTENTION_SKIPPING, "faster_cache": FasterCache(uncond_range=2, uncond_window=None)}[cache]
    model, inputs = build("sd3")
    fresh = copy.deepcopy(model)
    hookwise.apply(model, config)
    hookwise.apply(fresh, config)
    first = denoise(model, "sd3", inputs, steps=6)
    second = denoise(model, "sd3", inputs, steps=6)  # timestep rises again: a new run, state reset
    assert torch.equal(first, second)
    assert torch.equal(second, denoise(fresh, "sd3", inputs, steps=6))
    assert hookwise.get_run_state(model).run == 1


def test_a_shorter_second_run_starting_lower_needs_explicit_new_run():
    """A run whose first timestep is below the last one of the previous run is not detectable: new_run() says so."""
    model, inputs = build("sd3")
    fresh = copy.deepcopy(model)
    hookwise.apply(model, FirstBlockCache(threshold=10.0))
    hookwise.apply(fresh, FirstBlockCache(threshold=10.0))
    denoise(model, "sd3", inputs, steps=6, start=1.0)
    hookwise.new_run(model)
    assert torch.equal(denoise(model, "sd3", inputs, steps=6, start=0.1), denoise(fresh, "sd3", inputs, steps=6, start=0.1))


def test_batched_cfg_uses_one_state_and_fastercache_detects_it():
    model, inputs = build("sd3")
    counters = count_blocks(model)
    reference = denoise(model, "sd3", inputs, steps=8, cfg="batched")
    full = sum(c.n for c in counters)
    for c in counters:
        c.n = 0
    hookwise.apply(model, FasterCache(attention_range=None, uncond_range=2, uncond_window=None))
    out = denoise(model, "sd3", inputs, steps=8, cfg="batched")
    stats = cache_stats(model)["faster_cache"]
    assert stats["batched"] is True and stats["uncond_skipped"] == 4  # steps 1, 3, 5, 7 (step 0 measured the difference)
    assert sum(c.n for c in counters) == full - 4 * (full // 16)  # each skipped step runs the cond half only
    assert torch.isfinite(out).all() and not torch.equal(out, reference)


def test_fastercache_does_not_mistake_a_batch_of_equal_latents_for_cfg():
    model, inputs = build("sd3", batch=2)
    inputs["hidden_states"] = inputs["hidden_states"][:1].expand(2, -1, -1, -1).contiguous()
    inputs["encoder_hidden_states"] = inputs["encoder_hidden_states"][:1].expand(2, -1, -1).contiguous()
    inputs["pooled_projections"] = inputs["pooled_projections"][:1].expand(2, -1).contiguous()
    hookwise.apply(model, FasterCache(attention_range=None, uncond_range=2, uncond_window=None))
    denoise(model, "sd3", inputs, steps=4, cfg=None)
    assert cache_stats(model)["faster_cache"]["batched"] is False


def test_fastercache_reuses_the_uncond_call_of_separate_cfg():
    model, inputs = build("musubi")
    counters = count_blocks(model)
    hookwise.apply(model, FasterCache(attention_range=None, uncond_range=3, uncond_window=None))
    denoise(model, "musubi", inputs, steps=9)
    per_call = len(counters)
    # 9 cond calls; uncond computed at steps 0, 3, 6 and reused on the other 6 (step 1 and 2 have a difference)
    assert sum(c.n for c in counters) == (9 + 3) * per_call


def test_taylorseer_combines_with_a_block_cache_and_comes_off_cleanly():
    model, inputs = build("musubi")
    reference = denoise(model, "musubi", inputs)
    hookwise.apply(model, TaylorSeer(order=2), DualBlockCache(threshold=10.0, warmup=1, max_cached=1))
    assert cache_stats(model) == {"dual_block_cache": {"predictor": "taylor", "branches": {}}}
    with_taylor = denoise(model, "musubi", inputs)
    hookwise.remove(model, "taylorseer")
    assert cache_stats(model)["dual_block_cache"]["predictor"] == "reuse"
    reuse = denoise(model, "musubi", inputs)
    assert not torch.equal(with_taylor, reuse)
    hookwise.remove(model)
    assert torch.equal(denoise(model, "musubi", inputs), reference)


def test_taylorseer_on_attention_extrapolates_by_backward_differences():
    st1 = ModuleBranch(outputs=[torch.tensor([3.0]), torch.tensor([9.0])], steps=[2, 4])
    assert TaylorRule(1, 3, 0).answer(st1, 5, None).item() == pytest.approx(12.0)  # 9 + 3 * 1
    st = ModuleBranch(outputs=[torch.tensor([1.0]), torch.tensor([3.0]), torch.tensor([9.0])], steps=[0, 2, 4])
    # y' = (9 - 3) / 2 = 3, y'' = (3 - 1) / 2 = 1 -> y(6) = 9 + 3 * 2 + 1 * 2^2 / 2 = 17
    assert TaylorRule(2, 3, 0).answer(st, 6, None).item() == pytest.approx(17.0)
    assert [s for s in range(12) if taylor_schedule(s, 3, 3)] == [0, 1, 2, 4, 7, 10]
    assert all(taylor_schedule(s, 1, 3) for s in range(12))


def test_taylorseer_alone_then_a_block_cache_is_refused_with_advice():
    model, _ = build("musubi")
    hookwise.apply(model, TaylorSeer())
    with pytest.raises(CompatibilityError, match="in one call"):
        hookwise.apply(model, FirstBlockCache())
    assert list(hookwise.applied(model).names()) == ["taylorseer"]
    hookwise.remove(model)
    with pytest.raises(ConfigError, match="Leave them None"):
        hookwise.apply(model, FirstBlockCache(), TaylorSeer(interval=2))
    assert list_hooks(model) == {}


def test_two_attention_caches_on_the_same_modules_are_refused():
    model, _ = build("wan")
    hookwise.apply(model, PyramidAttentionBroadcast())
    with pytest.raises(CompatibilityError, match="one attention-level cache"):
        hookwise.apply(model, TaylorSeer(targets="attention"))
    assert hookwise.applied(model).names() == ["pab"]


def test_two_block_caches_conflict_and_nothing_is_attached():
    model, _ = build("musubi")
    with pytest.raises(CompatibilityError):
        hookwise.apply(model, FirstBlockCache(), MagCache(ratios=RATIOS))
    assert list_hooks(model) == {}


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: FirstBlockCache(threshold=-0.1), "threshold"),
        (lambda: FirstBlockCache(max_cached=0), "max_cached"),
        (lambda: DualBlockCache(front=0), "front"),
        (lambda: TaylorSeer(order=3), "order must be 1 or 2"),
        (lambda: TaylorSeer(interval=0), "interval"),
        (lambda: TaylorSeer(targets="ffn"), "targets"),
        (lambda: PyramidAttentionBroadcast(spatial_range=None, temporal_range=None, cross_range=None), "nothing"),
        (lambda: PyramidAttentionBroadcast(spatial_window=(800, 100)), "low <= high"),
        (lambda: FasterCache(attention_range=None, uncond_range=None), "nothing"),
        (lambda: FasterCache(cond_branch="x", uncond_branch="x"), "differ"),
        (lambda: MagCache(), "calibrate_magcache"),
        (lambda: MagCache(ratios=(1.0, -2.0)), "positive"),
        (lambda: MagCache(ratios=RATIOS, retention=2.0), "fraction"),
        (lambda: TeaCache(coefficients=()), "coefficients"),
        (lambda: LayerSkip(), "at least one"),
        (lambda: LayerSkip(blocks=(1,), what="mlp"), "what"),
        (lambda: LayerSkip(blocks=(1,), steps=(5, 2)), "steps"),
        (lambda: FirstBlockCache(threshold=float("inf")), "finite"),
        (lambda: DualBlockCache(threshold=float("nan")), "finite"),
        (lambda: TeaCache(threshold=float("inf")), "finite"),
        (lambda: MagCache(ratios=RATIOS, threshold=float("inf")), "finite"),
        (lambda: FasterCache(alpha_low=float("inf")), "finite"),
        (lambda: PyramidAttentionBroadcast(spatial_window=(float("nan"), 800)), "low <= high"),
        (lambda: FasterCache(attention_window=(100, float("nan"))), "low <= high"),
    ],
)
def test_bad_settings_raise_a_clear_config_error(make, match):
    with pytest.raises(ConfigError, match=match):
        make()


def test_front_plus_back_covering_every_block_is_refused():
    model, _ = build("wan")
    with pytest.raises(ConfigError, match="nothing to cache"):
        hookwise.apply(model, DualBlockCache(front=1, back=1))
    assert list_hooks(model) == {}


@pytest.mark.parametrize(
    "config",
    [FirstBlockCache(), TaylorSeer(), PyramidAttentionBroadcast(), FasterCache(uncond_range=None), LayerSkip(blocks=(0,))],
)
def test_a_cache_that_matches_nothing_raises_and_leaves_the_model_untouched(config):
    model = nn.Sequential(nn.Linear(4, 4), nn.GELU())  # no tower, no attention
    with pytest.raises(NoTargetError):
        hookwise.apply(model, config)
    assert list_hooks(model) == {}


def test_layer_skip_out_of_range_and_missing_roles_raise():
    model, _ = build("flux")
    with pytest.raises(NoTargetError, match="out of range"):
        hookwise.apply(model, LayerSkip(blocks=(5,)))
    with pytest.raises(NoTargetError, match="ffn"):
        hookwise.apply(model, LayerSkip(blocks=(1,), what="ffn"))  # FLUX single blocks have no FFN module
    assert list_hooks(model) == {}


def test_layer_skip_of_attention_zeroes_its_contribution_within_the_step_window():
    model, inputs = build("wan")
    counters = count_attention(model)
    hookwise.apply(model, LayerSkip(blocks=(0,), what="attention", steps=(2, 3)))
    denoise(model, "wan", inputs, steps=6, cfg=None)
    # block 0 has two attention modules, skipped on steps 2 and 3; the first skipped call runs once to learn
    # the output's shape
    assert sum(c.n for c in counters) == 6 * 4 - 2 * 2 + 2
    assert cache_stats(model) == {"layer_skip": {"skipped": 2 * 2}}


def test_calibrations_produce_configs_that_skip():
    model, inputs = build("musubi")
    counters = count_blocks(model)
    mag = calibrate_magcache(model, lambda: denoise(model, "musubi", inputs, steps=8), threshold=0.5)
    assert len(mag.ratios) == 8 and mag.ratios[0] == 1.0 and all(r > 0 for r in mag.ratios)
    tea = calibrate_teacache(model, lambda: denoise(model, "musubi", inputs, steps=8), threshold=0.5)
    assert len(tea.coefficients) == 3
    assert list_hooks(model) == {p: ["test.count"] for p in list_hooks(model) if p}  # left as it was
    for config in (mag, tea):
        for c in counters:
            c.n = 0
        hookwise.apply(model, config)
        denoise(model, "musubi", inputs, steps=8)
        assert sum(c.n for c in counters) < 16 * len(counters)
        hookwise.remove(model)

@pytest.mark.parametrize("calibrate", [calibrate_magcache, calibrate_teacache])
def test_calibration_under_a_block_cache_is_refused_and_a_failing_run_leaves_no_hook(calibrate):
    model, inputs = build("musubi")
    hookwise.apply(model, FirstBlockCache(threshold=0.2))
    with pytest.raises(CompatibilityError, match="remove the block cache"):
        calibrate(model, lambda: denoise(model, "musubi", inputs, steps=4))
    hookwise.remove(model)
    before = list_hooks(model)

    def broken_run():
        denoise(model, "musubi", inputs, steps=2)
        raise RuntimeError("sampler failed")

    with pytest.raises(RuntimeError, match="sampler failed"):
        calibrate(model, broken_run)
    assert list_hooks(model) == before



def test_magcache_ratios_are_resampled_on_progress_for_other_step_counts():
    ratios = (1.0, 1.2, 1.1, 1.0, 0.9)
    assert resample_ratios(ratios, 5) == list(ratios)
    twice = resample_ratios(ratios, 9)
    # the total change of magnitude over the run is kept
    assert math.prod(twice) == pytest.approx(math.prod(ratios))
    assert len(twice) == 9 and twice[0] == 1.0


def test_caches_do_nothing_in_training_mode():
    model, inputs = build("musubi")
    hookwise.apply(model, FirstBlockCache(threshold=10.0))
    counters = count_blocks(model)
    model.train()
    denoise(model, "musubi", inputs, steps=4, cfg=None)
    assert sum(c.n for c in counters) == 4 * len(counters)


@pytest.mark.parametrize("config", [*EXACT.values(), *SKIPPING.values(), *ATTENTION_SKIPPING.values()])
def test_configs_round_trip_through_a_stack(config):
    stack = hookwise.Stack(config)
    assert hookwise.Stack.from_json(stack.to_json()) == stack
