"""Every cache on the trained reference models: exact at threshold 0, skipping at its default within a stated
PSNR, identical across consecutive runs (state resets by itself)."""

import pytest
import torch

import hookwise
from hookwise.cache import calibrate_magcache, calibrate_teacache
from hookwise.sampling import psnr, sample_reference
from hookwise.zoo import load_reference

from cache_helpers import count_attention, count_blocks, one_thread  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")

LABELS = {"flux-shapes": [0, 4, 8], "wan-moving": [0, 2, 4]}
RATIOS = (1.0, 1.02, 1.01, 1.0, 0.99, 0.98)

EXACT = {
    "first_block": [hookwise.FirstBlockCache(threshold=0.0)],
    "dual_block": [hookwise.DualBlockCache(threshold=0.0)],
    "taylorseer": [hookwise.TaylorSeer(interval=1)],
    "taylorseer_attention": [hookwise.TaylorSeer(interval=1, targets="attention")],
    "pab": [hookwise.PyramidAttentionBroadcast(spatial_range=1, temporal_range=1, cross_range=1)],
    "faster_cache": [hookwise.FasterCache(attention_range=1, uncond_range=1)],
    "magcache": [hookwise.MagCache(ratios=RATIOS, threshold=0.0)],
    "teacache": [hookwise.TeaCache(threshold=0.0)],
}

# PSNR (dB, against the uncached samples) each cache keeps at its default settings: about 3 dB under what
# was measured here at 28 steps on these three classes (BENCHMARKS.md has the full sweeps over all classes).
DEFAULT_PSNR = {
    "flux-shapes": {
        "first_block": 40, "dual_block": 40, "taylorseer": 40, "taylorseer_attention": 38, "dual_block+taylorseer": 40,
        "pab": 35, "faster_cache": 30, "magcache": 38, "teacache": 40,
    },
    "wan-moving": {
        "first_block": 37, "dual_block": 38, "taylorseer": 36, "taylorseer_attention": 35, "dual_block+taylorseer": 38,
        "pab": 35, "faster_cache": 26, "magcache": 41, "teacache": 41,
    },
}


@pytest.fixture(scope="module", params=["flux-shapes", "wan-moving"])
def setup(request):
    reference = load_reference(request.param)
    model = reference.transformer
    labels = LABELS[request.param]
    blocks, attention = count_blocks(model), count_attention(model)

    def run(seed=3):
        for c in blocks + attention:
            c.n = 0
        pixels = sample_reference(reference, labels, seed=seed)
        return pixels, sum(c.n for c in blocks), sum(c.n for c in attention)

    return request.param, reference, run, run()


@pytest.mark.parametrize("cache", list(EXACT))
def test_threshold_zero_or_interval_one_is_exact_on_the_reference_model(setup, cache):
    name, reference, run, (base, nb, na) = setup
    hookwise.apply(reference.transformer, *EXACT[cache])
    try:
        pixels, b, a = run()
    finally:
        hookwise.remove(reference.transformer)
    assert torch.equal(pixels, base) and (b, a) == (nb, na)


def _defaults(reference, labels):
    model = reference.transformer
    return {
        "first_block": [hookwise.FirstBlockCache()],
        "dual_block": [hookwise.DualBlockCache()],
        "taylorseer": [hookwise.TaylorSeer()],
        "taylorseer_attention": [hookwise.TaylorSeer(targets="attention")],
        "dual_block+taylorseer": [hookwise.DualBlockCache(), hookwise.TaylorSeer(order=2)],
        "pab": [hookwise.PyramidAttentionBroadcast()],
        "faster_cache": [hookwise.FasterCache()],
        "magcache": lambda: [calibrate_magcache(model, lambda: sample_reference(reference, labels, seed=3))],
        "teacache": lambda: [calibrate_teacache(model, lambda: sample_reference(reference, labels, seed=3))],
    }


@pytest.mark.parametrize("cache", list(DEFAULT_PSNR["flux-shapes"]))
def test_default_settings_skip_work_within_the_stated_psnr_and_runs_repeat(setup, cache):
    name, reference, run, (base, nb, na) = setup
    configs = _defaults(reference, LABELS[name])[cache]
    configs = configs() if callable(configs) else configs
    hookwise.apply(reference.transformer, *configs)
    try:
        first, b, a = run()
        second, _, _ = run()  # a second run, nothing reset by hand
    finally:
        hookwise.remove(reference.transformer)
    assert b < nb or a < na, "the default skipped nothing"
    assert psnr(first, base) >= DEFAULT_PSNR[name][cache]
    assert torch.equal(first, second)


@pytest.mark.parametrize("cache", ["first_block", "dual_block+taylorseer", "pab", "faster_cache"])
@pytest.mark.parametrize("name", ["flux-shapes", "wan-moving"])
def test_regionally_compiled_reference_model_runs_the_cache_without_recompiling(name, cache):
    """Each block compiled on its own (dynamo's CompileCounter: traced, not code-generated): the cached
    samples equal the eager ones, and a second sampling run compiles nothing new."""
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    reference = load_reference(name)
    model, labels = reference.transformer, LABELS[name]
    configs = _defaults(reference, labels)[cache]
    hookwise.apply(model, *configs)
    eager = sample_reference(reference, labels, seed=3, steps=12)
    hookwise.remove(model)

    counter = CompileCounter()
    for block in (b for t in hookwise.describe(model).main_towers for b in t.blocks):
        model.get_submodule(block.path).compile(backend=counter, dynamic=False)
    hookwise.apply(model, *configs)
    try:
        first = sample_reference(reference, labels, seed=3, steps=12)
        frames = counter.frame_count
        with torch._dynamo.config.patch(error_on_recompile=True):
            second = sample_reference(reference, labels, seed=3, steps=12)
    finally:
        hookwise.remove(model)
        torch._dynamo.reset()
    assert counter.frame_count == frames > 0
    torch.testing.assert_close(first, eager, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(second, eager, rtol=1e-4, atol=1e-5)
