"""Offloading on fake tensors: the planner's fake run applies the offload's own partition and hooks to a
fake copy of the model, so its peak counts the groups the offload really keeps resident, its slots,
and the slots a recomputation adds, where the cost declaration only approximates them."""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

import hookwise
from hookwise.memory import LayerwiseCasting, Offload, offload_report
from hookwise.memory.offload import offload_buffers
from hookwise.plan._peak_measure import measure_peak
from hookwise.plan._peak_stack import fake_copy
from hookwise.plan.job import Job
from hookwise.plan.peak import estimate_peak
from model_helpers import tiny_flux, tiny_wan
from tree_helpers import Tree, x_input

ODD = [
    (["holder", "dict"], "list", ["split", "fused", "split"], [0, 0, 2]),  # block 1 never called, 0 twice
    (["list"], "seq", ["fused-softmax", "fused"], [0, 1]),  # a Linear(1, 1) beside it, never called
]


def _groups(report) -> list[tuple[str, str, int, bool]]:
    return [(g.name, g.kind, g.nbytes, g.resident) for g in report.groups]


@pytest.mark.parametrize("build", [tiny_flux, tiny_wan, lambda: (Tree(ODD), None)], ids=["flux", "wan", "odd"])
@pytest.mark.parametrize(("granularity", "share"), [("block", None), ("leaf", None), ("leaf", 0.5)])
def test_a_fake_copy_is_partitioned_as_the_real_model_is(build, granularity, share):
    torch.manual_seed(0)
    model, _ = build()
    fake = fake_copy(model, mode := FakeTensorMode(allow_non_fake_inputs=True), frozen=False)
    budget = int(sum(p.numel() * p.element_size() for p in model.parameters()) * share) if share else None
    config = Offload(onload_device="cpu", granularity=granularity, vram_budget=budget)
    with mode:
        hookwise.apply(fake, config)
    hookwise.apply(model, config)
    real, faked = offload_report(model), offload_report(fake)
    assert _groups(faked) == _groups(real) and faked.always_resident == real.always_resident
    assert faked.device_bytes == real.device_bytes and faked.host_bytes == real.host_bytes
    slots, host = offload_buffers(fake)
    assert slots and host and all(isinstance(t, FakeTensor) for t in slots + host)


@pytest.mark.parametrize("training", [False, True], ids=["sample", "train"])
@pytest.mark.parametrize("granularity", ["block", "leaf"])
def test_odd_shapes_estimate_runs_the_offload_hooks_and_matches_a_real_run(training, granularity):
    torch.manual_seed(0)
    model = Tree(ODD).eval()
    job = Job(height=8, width=8, text_len=1, training=training, lora_rank=4)
    inputs = {"x": x_input()}
    stack = [Offload(onload_device="cpu", granularity=granularity)]
    measured = measure_peak(model, inputs, job, attention_backend="math", stack=stack)
    report = estimate_peak(model, job, example_inputs=inputs, attention_backend="math", compute_device="cpu",
                           stack=stack)  # fmt: skip
    assert report.method == "fake"
    assert any("hooks ran on the fake copy" in note for note in report.modelled)
    assert report.host_bytes == measured["host_bytes"] > 0
    assert report.peak_bytes == pytest.approx(measured["peak_bytes"], rel=0.05)


def test_the_fake_run_counts_the_groups_casting_leaves_to_stream():
    model, _ = tiny_flux()
    job = Job(height=64, width=64, text_len=24)
    stack = [LayerwiseCasting(), Offload(onload_device="cpu", granularity="block")]
    report = estimate_peak(model, job, attention_backend="math", compute_device="cpu", stack=stack)
    real, _ = tiny_flux()
    hookwise.apply(real, *stack)
    offloaded = offload_report(real)
    assert report.host_bytes == offloaded.host_bytes
    assert report.weight_bytes == offloaded.device_bytes  # resident tensors + slots, nothing else


def test_an_offload_that_cannot_apply_to_the_copy_is_modelled_from_its_declaration_and_says_why():
    model, _ = tiny_flux()
    job = Job(height=64, width=64, text_len=24)
    stack = [Offload(onload_device="cpu", granularity="block", vram_budget=1000)]  # below one slot
    with pytest.raises(hookwise.errors.ConfigError, match="too small"):
        hookwise.apply(tiny_flux()[0], *stack)
    report = estimate_peak(model, job, attention_backend="math", compute_device="cpu", stack=stack)
    assert any("could not be applied to the fake copy" in note and "too small" in note for note in report.modelled)
    assert any("cost declaration" in note for note in report.modelled)
