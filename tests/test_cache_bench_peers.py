"""The cache harness's forecast variants and cache-dit rows (on a copy of the model), and what it says when
cache-dit cannot run."""

import pytest
import torch

import hookwise
from hookwise.bench import run_cache_bench
from hookwise.bench.cache_dit import _taylor_mask
from hookwise.cache._blocks import taylor_schedule
from hookwise.zoo.reference import ReferenceModel, get_reference_spec

from cache_helpers import one_thread  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def untrained():
    torch.manual_seed(0)
    return ReferenceModel(get_reference_spec("flux-shapes")).eval().requires_grad_(False)


def _untouched(model):
    assert hookwise.list_hooks(model) == {}
    assert "forward" not in vars(model)  # no instance forward left behind (cache-dit patches the copy only)
    assert all("forward" not in vars(m) for m in model.modules())


def test_the_forecast_variants_run_in_the_harness_with_their_settings(untrained):
    results = run_cache_bench(
        untrained, labels=[0], steps=8, repeats=1, methods=["forecast-hermite", "forecast-verify", "forecast-corrector"],
        compare_diffusers=False, calibration_labels=[1],
    )
    by = {}
    for r in results[2:]:
        by.setdefault(r.method, []).append(r)
    assert set(by) == {"forecast-hermite", "forecast-verify", "forecast-corrector"}
    assert all(r.config[0]["predictor"] == "hermite" for r in by["forecast-hermite"])
    assert all(r.config[0]["verify"] is not None for r in by["forecast-verify"])
    assert all(0 <= r.config[0]["blend"] <= 1 for r in by["forecast-corrector"])
    for r in results[2:]:
        assert r.psnr > 0
        if r.method != "forecast-verify":
            assert 0 < r.block_frac < 1
    # the probe (the first of flux-shapes' 8 main blocks) runs every step; a skipped step may still compute after it
    steps, blocks = 8, 8
    for r in by["forecast-verify"]:
        budget = r.config[0]["budget"]
        assert (budget + (steps - budget) / blocks) / steps - 1e-9 <= r.block_frac <= 1
    _untouched(untrained.transformer)


def test_cache_dit_rows_run_on_a_copy_and_count_their_block_evaluations(untrained):
    pytest.importorskip("cache_dit")
    results = run_cache_bench(
        untrained, labels=[0], steps=8, repeats=1, methods=["dbcache", "taylorseer", "foca"], compare_diffusers=False,
        compare_cache_dit=True,
    )
    peer = [r for r in results if r.impl == "cache-dit"]
    assert {r.method for r in peer} == {"dbcache", "taylorseer", "foca"}
    assert {r.method for r in results if r.impl == "hookwise"} == {"taylorseer"}
    for r in peer:
        assert not r.note.startswith("failed"), r.note
        assert 0 < r.block_frac <= 1 and r.psnr > 0
    # the static mask computes TaylorSeer's steps (and the first block on the others): less work than uncached
    assert all(r.block_frac < 1 for r in peer if r.method in ("taylorseer", "foca"))
    _untouched(untrained.transformer)


def test_without_cache_dit_each_of_its_methods_has_a_row_that_says_why(untrained, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "cache_dit", None)  # what an environment without it imports
    results = run_cache_bench(
        untrained, labels=[0], steps=4, repeats=1, methods=["dbcache", "dbcache+taylorseer"], compare_diffusers=False,
        compare_cache_dit=True,
    )
    rows = [r for r in results if r.impl == "cache-dit"]
    assert {r.method for r in rows} == {"dbcache", "dbcache+taylorseer"}
    assert all(r.note.startswith("failed: MissingDependencyError") and "hookwise[cache-dit]" in r.note for r in rows)


def test_cache_dits_static_mask_is_taylorseers_schedule():
    for interval, warmup in [(2, 3), (3, 3), (4, 1), (1, 0)]:
        assert _taylor_mask(12, interval, warmup) == [int(taylor_schedule(s, interval, warmup)) for s in range(12)]
