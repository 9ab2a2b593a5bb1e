"""CFG parallelism on 2 gloo ranks: each rank computes one half of a batched-CFG call; the gathered output
equals the single-process batched call and two-call CFG; a group of one rank is the identity.

One spawn of two ranks, shared with the other parallel test modules, runs every scenario (starting a rank
imports torch and diffusers: seconds each)."""

import pytest
import torch
import torch.distributed as dist

import hookwise
from hookwise.bench.run import SampleCounter
from hookwise.core import add_hook
from hookwise.parallel import cfg_parallel_report

from cache_helpers import build, denoise
from dist_helpers import share_ranks, shared_results

STEPS = 3


def _split_run(name, batch, group=None):
    model, inputs = build(name, batch)
    batched = denoise(model, name, inputs, steps=STEPS, cfg="batched")
    separate = denoise(model, name, inputs, steps=STEPS, cfg="separate")
    hookwise.apply(model, hookwise.CFGParallel(group=group))
    block = model.get_submodule(hookwise.describe(model).main_towers[0].blocks[0].path)
    counter = add_hook(block, SampleCounter(), "test.count")
    parallel = denoise(model, name, inputs, steps=STEPS, cfg="batched")
    return dict(batched=batched, separate=separate, parallel=parallel, samples=counter.n, report=cfg_parallel_report(model))


def _two_call(unbatched):
    model, inputs = build("wan")
    hookwise.apply(model, hookwise.CFGParallel(unbatched=unbatched))
    try:
        denoise(model, "wan", inputs, steps=2, cfg="separate")
    except hookwise.HookwiseError as exc:
        return str(exc)
    return cfg_parallel_report(model)


def _positional():
    """A batched-CFG call with its arguments given by position, split the same way (Wan: latents, timestep, text)."""
    model, inputs = build("wan")
    x, t, text = inputs["hidden_states"], inputs["timestep"], inputs["encoder_hidden_states"]
    args = (torch.cat([x, x]), torch.cat([t, t]), torch.cat([text, torch.zeros_like(text)]))
    with torch.no_grad():
        whole = model(*args, return_dict=False)[0]
        hookwise.apply(model, hookwise.CFGParallel())
        split = model(*args, return_dict=False)[0]
    return whole, split, cfg_parallel_report(model)


def _ranks(rank, world):
    out = {name: _split_run(name, batch) for name, batch in (("flux", 1), ("wan", 2))}
    out["positional"] = _positional()
    out["two_call"] = _two_call("run")
    out["two_call_error"] = _two_call("error")
    singles = [dist.new_group([r]) for r in range(world)]  # every rank creates every group
    out["alone"] = _split_run("wan", 1, group=singles[rank])
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (2, 1), mesh_dim_names=("cfg", "cp"))  # the 2 x N layout, N = 1
    out["mesh"] = _split_run("wan", 1, group=mesh["cfg"])["report"]
    model, _ = build("wan")
    try:
        hookwise.apply(model, hookwise.CFGParallel(group=mesh))
    except hookwise.HookwiseError as exc:
        out["mesh_2d"] = str(exc)
    return out


share_ranks(2, "cfg", _ranks)  # in the session's one spawn of 2 ranks (dist_helpers)


@pytest.fixture(scope="module")
def results():
    return shared_results(2, "cfg")


@pytest.mark.parametrize("name,batch", [("flux", 1), ("wan", 2)])
def test_each_rank_computes_one_half_and_the_gathered_output_equals_batched_and_two_call_cfg(results, name, batch):
    for r in (results[0][name], results[1][name]):
        assert r["report"] == {"split": STEPS, "whole": 0, "ranks": 2}
        assert r["samples"] == STEPS * batch  # half of the 2 * batch a batched-CFG call carries
        torch.testing.assert_close(r["parallel"], r["batched"], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(r["parallel"], r["separate"], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(results[0][name]["parallel"], results[1][name]["parallel"], rtol=0, atol=0)


def test_arguments_given_by_position_are_split_too(results):
    for r in results:
        whole, split, report = r["positional"]
        assert report["split"] == 1
        torch.testing.assert_close(split, whole, rtol=1e-5, atol=1e-5)


def test_two_call_cfg_runs_whole_on_every_rank_or_raises_when_asked(results):
    for r in results:
        assert r["two_call"] == {"split": 0, "whole": 4, "ranks": 2}
        assert "not batched CFG" in r["two_call_error"]


def test_a_group_of_one_rank_is_the_identity(results):
    for r in results:
        alone = r["alone"]
        assert alone["report"] == {"split": 0, "whole": STEPS, "ranks": 1}
        assert alone["samples"] == 2 * STEPS
        assert torch.equal(alone["parallel"], alone["batched"])


def test_the_cfg_dimension_of_a_device_mesh_is_a_group_and_a_2d_mesh_is_refused(results):
    for r in results:
        assert r["mesh"] == {"split": STEPS, "whole": 0, "ranks": 2}
        assert "mesh['cfg']" in r["mesh_2d"]


def test_without_torch_distributed_initialised_apply_says_how_to_launch(monkeypatch):
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    model, _ = build("wan")
    with pytest.raises(hookwise.HookwiseError, match="torchrun"):
        hookwise.apply(model, hookwise.CFGParallel())
    assert hookwise.applied(model).configs == ()


def test_config_validates_and_round_trips():
    config = hookwise.CFGParallel(unbatched="error", replicated=("img_ids",), timeout_s=5.0)
    assert hookwise.CFGParallel.from_dict(config.to_dict()) == config
    with pytest.raises(hookwise.ConfigError, match="unbatched"):
        hookwise.CFGParallel(unbatched="skip")
    with pytest.raises(hookwise.ConfigError, match="timeout_s"):
        hookwise.CFGParallel(timeout_s=0)
