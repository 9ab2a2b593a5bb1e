"""Offloading's cost declaration forms the groups the offload forms (its partition's rule for what lies
outside the blocks, its residency choice under a budget), from the footprint alone."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

import hookwise
from hookwise.core.cost import CostContext, Placement
from hookwise.core.techniques import technique_named
from hookwise.introspect import describe
from hookwise.memory import Offload
from hookwise.memory.offload import _declared_groups
from hookwise.plan.footprint import footprint_from_map
from hookwise.plan.job import Job
from model_helpers import tiny_flux, tiny_wan
from tree_helpers import Tree

ODD = [
    (["holder", "dict"], "list", ["split", "fused", "split"], [0, 0, 2]),
    (["list"], "seq", ["fused-softmax", "fused"], [0, 1]),
]
MODELS = {"flux": tiny_flux, "wan": tiny_wan, "odd": lambda: (Tree(ODD).eval(), None)}


@pytest.mark.parametrize("name", list(MODELS))
def test_the_declaration_groups_what_lies_outside_the_blocks_as_the_partition_does(name):
    model, _ = MODELS[name]()
    fp = footprint_from_map(describe(model))
    groups, _ = _declared_groups(fp, "block", 1)
    report = hookwise.apply_offload(model, Offload(onload_device="cpu", granularity="block"))
    # The groups that hold a leaf (a group of buffers only, Wan's `rope`, is not in the footprint).
    leaves = [leaf.path for leaf in fp.leaves]
    real_rest = [g.name for g in report.groups if g.kind == "rest" and any(p.startswith(g.name) for p in leaves)]
    assert [g.name for g in groups if not g.in_tower] == real_rest
    assert len([g for g in groups if g.in_tower]) == len([g for g in report.groups if g.kind == "block"])


@pytest.mark.parametrize("name", ["flux", "wan"])
@pytest.mark.parametrize(("granularity", "share"), [("block", None), ("leaf", None), ("leaf", 0.7)])
def test_the_declared_device_and_host_bytes_follow_the_offloads_own(name, granularity, share):
    model, _ = MODELS[name]()
    fp = footprint_from_map(describe(model))
    config = Offload(onload_device="cpu", granularity=granularity,
                     vram_budget=int(fp.total_bytes * share) if share else None)  # fmt: skip
    ctx = CostContext(SimpleNamespace(vram=0, pinned_limit=0, device="cpu"), Job(), 0, 0)
    placed = technique_named("offload").cost.effect(Placement.resident(fp), config, ctx)
    report = hookwise.apply_offload(model, config)
    # Within 10%: the footprint cannot place tensors outside every leaf (norms), counted as resident.
    assert placed.device_bytes + placed.transient_bytes == pytest.approx(report.planned_device_bytes, rel=0.1)
    assert placed.host_bytes == pytest.approx(report.host_bytes, rel=0.1)
