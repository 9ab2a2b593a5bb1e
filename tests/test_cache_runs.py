"""Step caches and the run state's rules: CFG as two calls with no branch named, one-step runs back to back."""

import copy

import pytest
import torch

import hookwise
from hookwise import FasterCache, MagCache, PyramidAttentionBroadcast, TaylorSeer
from hookwise.cache import cache_stats
from hookwise.core.state import auto_branch

from cache_helpers import build, one_thread, uncond_inputs  # noqa: F401
from model_helpers import output_of

pytestmark = pytest.mark.usefixtures("one_thread")

RATIOS = (1.0, 1.05, 1.02, 1.01, 0.99, 0.98, 0.97, 0.95)
CACHES = {
    "taylorseer": TaylorSeer(order=1, interval=2, warmup=1),
    "magcache": MagCache(ratios=RATIOS, threshold=1.0, retention=0.1),
    "pab": PyramidAttentionBroadcast(spatial_range=2, temporal_range=2, cross_range=2, spatial_window=None,
                                     temporal_window=None, cross_window=None),
    "faster_cache": FasterCache(attention_range=2, attention_window=None, uncond_range=None),
}


def two_call_cfg(model, inputs, branches, steps=8):
    """Euler loop with CFG as two calls per step (cond first); `branches` names them, or None for no names."""
    x = inputs["hidden_states"]
    unc = uncond_inputs(inputs)
    for i in range(steps):
        t = torch.full((x.shape[0],), 1000.0 * (1 - i / steps))
        preds = []
        for j, kw in enumerate((inputs, unc)):
            call = dict(kw, hidden_states=x, timestep=t)
            if branches is None:
                preds.append(output_of(model, call))
            else:
                with hookwise.branch(model, branches[j]):
                    preds.append(output_of(model, call))
        vc, vu = preds
        x = x - (1.0 / steps) * (vu + 3.0 * (vc - vu))
    return x


@pytest.mark.parametrize("cache", sorted(CACHES))
def test_cfg_as_two_calls_without_branches_equals_named_branches(cache):
    model, inputs = build("sd3")
    named = copy.deepcopy(model)
    hookwise.apply(model, CACHES[cache])
    hookwise.apply(named, CACHES[cache])
    auto = two_call_cfg(model, inputs, None)
    explicit = two_call_cfg(named, inputs, ("cond", "uncond"))
    assert torch.equal(auto, explicit)
    assert hookwise.get_run_state(model).run == 0
    if cache in ("taylorseer", "magcache"):
        assert sorted(cache_stats(model)[cache]["branches"]) == ["default", "default.1"]


def test_fastercache_reuses_the_uncond_call_of_unnamed_two_call_cfg_when_told_its_branch_names():
    model, inputs = build("sd3")
    named = copy.deepcopy(model)
    hookwise.apply(model, FasterCache(attention_range=None, uncond_range=3, uncond_window=None,
                                      cond_branch=auto_branch(0), uncond_branch=auto_branch(1)))
    hookwise.apply(named, FasterCache(attention_range=None, uncond_range=3, uncond_window=None))
    auto = two_call_cfg(model, inputs, None)
    explicit = two_call_cfg(named, inputs, ("cond", "uncond"))
    assert torch.equal(auto, explicit)
    assert cache_stats(model)["faster_cache"]["uncond_skipped"] == cache_stats(named)["faster_cache"]["uncond_skipped"] > 0


@pytest.mark.parametrize("cache", ["taylorseer", "magcache"])
def test_back_to_back_one_step_runs_are_exact(cache):
    """Each one-step run at the same timestep is a run of its own: nothing is predicted from the one before."""
    model, inputs = build("sd3")
    plain = copy.deepcopy(model)
    hookwise.apply(model, CACHES[cache])
    g = torch.Generator().manual_seed(1)
    for _ in range(4):
        call = dict(inputs, hidden_states=torch.randn(inputs["hidden_states"].shape, generator=g))
        assert torch.equal(output_of(model, call), output_of(plain, call))
    assert hookwise.get_run_state(model).run == 3


def test_fastercache_says_once_how_to_name_unnamed_two_call_cfg_branches():
    model, inputs = build("sd3")
    hookwise.apply(model, FasterCache(attention_range=None, uncond_range=3, uncond_window=None))
    with pytest.warns(UserWarning, match=r"no CFG branch names.*auto_branch\(0\)") as caught:
        two_call_cfg(model, inputs, None)
    assert sum("no CFG branch names" in str(w.message) for w in caught) == 1
    assert cache_stats(model)["faster_cache"]["uncond_skipped"] == 0
