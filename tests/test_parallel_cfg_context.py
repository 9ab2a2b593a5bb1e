"""CFG parallelism and context parallelism together on a 2 x 2 mesh of gloo ranks: the CFG halves on the
"cfg" dimension, each half's tokens split by Ulysses on the other; the output equals one process's
batched-CFG output on every rank; so does the stack the planner writes for 4 GPUs (CFGParallel(context=2) +
ContextParallel(ulysses=2, cfg=2): the split carried by the configs, no mesh built by the user)."""

import pytest
import torch

import hookwise
from hookwise.parallel import cfg_parallel_report, context_parallel_stats

from cache_helpers import build, denoise
from dist_helpers import share_ranks, shared_results

STEPS = 2


def _ranks(rank, world, name):
    from torch.distributed.device_mesh import init_device_mesh

    model, inputs = build(name)
    batched = denoise(model, name, inputs, steps=STEPS, cfg="batched")
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("cfg", "sp"))
    hookwise.apply(
        model,
        hookwise.CFGParallel(group=mesh["cfg"]),
        hookwise.ContextParallel(ulysses=2, group=mesh["sp"].get_group()),
    )
    parallel = denoise(model, name, inputs, steps=STEPS, cfg="batched")
    out = dict(batched=batched, parallel=parallel, cfg=cfg_parallel_report(model), cp=context_parallel_stats(model))
    hookwise.remove(model)
    # the stack `hookwise plan --gpus 4` writes: the 2 x 2 split carried by the configs' fields, loaded back
    stack = hookwise.Stack.from_dict(hookwise.Stack(hookwise.CFGParallel(context=2), hookwise.ContextParallel(ulysses=2, cfg=2)).to_dict())
    hookwise.apply(model, stack)
    out["planned"] = denoise(model, name, inputs, steps=STEPS, cfg="batched")
    out["planned_cfg"], out["planned_cp"] = cfg_parallel_report(model), context_parallel_stats(model)
    hookwise.remove(model)
    out["refused"] = []
    for configs in ([hookwise.CFGParallel(context=3), hookwise.ContextParallel(ulysses=3, cfg=2)],  # not 2 x 3 ranks
                    [hookwise.CFGParallel(context=2), hookwise.ContextParallel(ulysses=4, cfg=2)]):  # 4 in a half of 2
        try:
            hookwise.apply(model, *configs)
            out["refused"].append(None)
        except hookwise.HookwiseError as exc:
            out["refused"].append((type(exc).__name__, str(exc), hookwise.applied(model).names()))
    return out


share_ranks(4, "cfg_context", _ranks, "flux")  # in the session's one spawn of 4 ranks (dist_helpers)


@pytest.fixture(scope="module")
def results():
    return shared_results(4, "cfg_context")


@pytest.mark.parametrize("name", ["flux"])
def test_cfg_halves_on_one_mesh_dimension_and_ulysses_on_the_other_equal_one_process(results, name):
    for r in results:
        assert r["cfg"] == {"split": STEPS, "whole": 0, "ranks": 2}
        assert r["cp"]["world"] == 2 and r["cp"]["attention_calls"] > 0 and sum(r["cp"]["sent_bytes"].values()) > 0
        torch.testing.assert_close(r["parallel"], r["batched"], rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("name", ["flux"])
def test_the_planned_stack_splits_the_world_from_its_own_fields_and_equals_one_process(results, name):
    for r in results:
        assert r["planned_cfg"] == {"split": STEPS, "whole": 0, "ranks": 2}
        assert (r["planned_cp"]["world"], r["planned_cp"]["ulysses"]) == (2, 2) and r["planned_cp"]["attention_calls"] > 0
        torch.testing.assert_close(r["planned"], r["batched"], rtol=2e-5, atol=2e-5)


def test_a_split_the_world_cannot_hold_is_refused_and_nothing_stays(results):
    for r in results:
        (kind, message, left), (kind2, message2, left2) = r["refused"]
        assert "2 x 3 world (6 ranks); this one has 4" in message and left == []
        assert kind2 == "CompatibilityError" and "does not fill" in message2 and left2 == []
