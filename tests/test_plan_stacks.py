"""Peaks with a stack in place (hookwise.plan.peak.estimate_peak(stack=...)): the fake-tensor run with
the stack's hooks on a fake copy against a real CPU run with the stack applied, per strategy, on the
tiny FLUX / Wan models and the zoo models, for sampling and LoRA training (checkpointing on and off).

The real run computes on the CPU, so the device and the host are one memory there: the offload's
host masters are counted apart (`host_bytes`), and the "device" peak is the rest.
"""

from __future__ import annotations

import copy

import pytest
import torch
from model_helpers import tiny_flux, tiny_wan
from plan_helpers import one_thread  # noqa: F401

from hookwise.errors import ConfigError
from hookwise.memory import LayerwiseCasting, Offload
from hookwise.plan._peak_inputs import build_inputs, known_target
from hookwise.plan._peak_measure import measure_peak
from hookwise.plan.job import Job
from hookwise.plan.peak import estimate_peak
from hookwise.train import Checkpointing

pytestmark = pytest.mark.usefixtures("one_thread")  # many tiny ops on a shared 2-core machine


def _zoo(name: str):
    from hookwise.zoo import load_reference

    return load_reference(name)


MODELS = {
    "tiny-flux": (lambda: tiny_flux()[0], Job(height=64, width=64, text_len=24)),
    "tiny-wan": (lambda: tiny_wan()[0], Job(height=32, width=32, frames=5, text_len=12)),
    "zoo-flux-shapes": (lambda: _zoo("flux-shapes"), Job(height=16, width=16, text_len=4)),
    "zoo-wan-moving": (lambda: _zoo("wan-moving"), Job(height=12, width=12, frames=8, text_len=4)),
}
STEPS = {
    "sample": {},
    "train": {"training": True},  # checkpointing on: hookwise Checkpointing on every block
    "train-no-ckpt": {"training": True, "checkpointing": False},
}


def _stack(name: str, weight_bytes: int) -> tuple:
    if name in ("int8", "nf4"):
        pytest.importorskip("torchao" if name == "int8" else "bitsandbytes")
        from hookwise.quant import Quantize

        return (Quantize("int8-weight" if name == "int8" else "nf4"),)
    return {
        "fp8": (LayerwiseCasting(),),
        "block-offload": (Offload(onload_device="cpu", granularity="block"),),
        "leaf-offload": (Offload(onload_device="cpu", granularity="leaf"),),
        # Room for 60% of the weights: some blocks resident, the rest streamed through two slots.
        "budget-offload": (Offload(onload_device="cpu", granularity="block", vram_budget=weight_bytes * 6 // 10),),
        "fp8+offload": (LayerwiseCasting(), Offload(onload_device="cpu", granularity="block")),
    }[name]


CASES = [
    ("tiny-flux", "sample", "fp8"),
    ("tiny-flux", "sample", "block-offload"),
    ("tiny-flux", "sample", "leaf-offload"),
    ("zoo-wan-moving", "sample", "budget-offload"),
    ("tiny-flux", "train", "leaf-offload"),  # the recompute holds every leaf group of a block
    ("tiny-flux", "train", "fp8+offload"),
    ("tiny-flux", "train-no-ckpt", "block-offload"),
    ("tiny-wan", "sample", "fp8"),
    ("tiny-wan", "train-no-ckpt", "leaf-offload"),
    ("zoo-flux-shapes", "sample", "fp8+offload"),
    ("zoo-flux-shapes", "train", "budget-offload"),
    ("zoo-wan-moving", "sample", "block-offload"),
    # Every model sampled and trained under a stack; quantization sampled and trained.
    ("zoo-flux-shapes", "sample", "int8"),
    ("zoo-wan-moving", "train", "fp8+offload"),
    ("zoo-wan-moving", "sample", "nf4"),
    ("tiny-wan", "train-no-ckpt", "int8"),
]


def _weights(model) -> int:
    target = known_target(model)[0]
    return sum(t.numel() * t.element_size() for t in [*target.parameters(), *target.buffers()])


@pytest.mark.parametrize(("name", "step", "strategy"), CASES)
def test_fake_peak_with_the_stack_is_within_5_percent_of_a_real_cpu_run(name, step, strategy):
    build, base = MODELS[name]
    model = build()
    job = Job(**{**base.__dict__, **STEPS[step]})
    stack = _stack(strategy, _weights(model))
    inputs = build_inputs(model, job, torch.float32)
    measured = measure_peak(known_target(model)[0], inputs, job, attention_backend="math", stack=stack)
    report = estimate_peak(model, job, attention_backend="math", compute_device="cpu", stack=stack)
    assert report.method == "fake"
    assert report.peak_bytes == pytest.approx(measured["peak_bytes"], rel=0.05)
    assert report.host_bytes == pytest.approx(measured["host_bytes"], rel=0.05)
    assert report.optimizer_bytes == pytest.approx(measured["optimizer_bytes"], rel=0.05)
    if "offload" in strategy:
        assert report.host_bytes > 0
        assert any("hooks ran on the fake copy" in note for note in report.modelled)
    if job.training:
        assert report.optimizer_bytes > 0
        assert any("AdamW" in note for note in report.modelled)
        assert any(s.startswith("checkpointing") for s in report.stack) == job.uses_checkpointing


def test_each_technique_changes_the_estimate_the_way_it_changes_a_real_run():
    model, _ = tiny_flux()
    job = Job(height=64, width=64, text_len=24)
    plain = estimate_peak(model, job, compute_device="cpu")
    cast = estimate_peak(model, job, compute_device="cpu", stack=LayerwiseCasting())
    streamed = estimate_peak(model, job, compute_device="cpu", stack=[Offload(onload_device="cpu", granularity="leaf")])
    assert cast.weight_bytes < plain.weight_bytes  # fp8 storage and its scales, counted from the copy
    assert cast.activation_bytes > plain.activation_bytes  # each layer's dequantized weight while it runs
    assert streamed.weight_bytes < plain.weight_bytes and streamed.host_bytes > 0
    assert streamed.activation_bytes == plain.activation_bytes


def test_training_counts_two_float32_moments_per_lora_parameter():
    from hookwise.plan._peak_training import adam_state_bytes, lora_targets

    model, _ = tiny_flux()
    report = estimate_peak(model, Job(height=64, width=64, text_len=24, training=True), compute_device="cpu")
    modules = dict(model.named_modules())
    params = sum(16 * (modules[p].in_features + modules[p].out_features) for p in lora_targets(model))
    assert report.optimizer_bytes == adam_state_bytes(model, 16) == 2 * 4 * params
    assert report.peak_bytes == report.weight_bytes + report.optimizer_bytes + report.activation_bytes


def test_checkpointing_is_the_projects_own_technique():
    model, _ = tiny_flux()
    job = Job(height=64, width=64, text_len=24, training=True)
    auto = estimate_peak(model, job, compute_device="cpu")
    given = estimate_peak(model, job, compute_device="cpu", stack=Checkpointing(blocks=["transformer_blocks.0"]))
    off = estimate_peak(model, Job(**{**job.__dict__, "checkpointing": False}), compute_device="cpu")
    assert auto.stack == ("checkpointing",)
    assert given.stack == ("checkpointing(blocks=['transformer_blocks.0'])",)
    assert auto.saved_for_backward_bytes < given.saved_for_backward_bytes < off.saved_for_backward_bytes


def test_the_model_is_left_as_it_was_and_a_hooked_model_is_refused():
    model, _ = tiny_flux()
    before = {n: (p, p.detach().clone()) for n, p in model.named_parameters()}
    estimate_peak(model, Job(height=64, width=64, text_len=24, training=True), stack=[LayerwiseCasting()])
    for n, p in model.named_parameters():
        assert p is before[n][0] and torch.equal(p, before[n][1]) and p.dtype == torch.float32
    assert not any("_hookwise_registry" in m.__dict__ for m in model.modules())
    hooked = copy.deepcopy(model)
    import hookwise

    hookwise.apply(hooked, LayerwiseCasting())
    with pytest.raises(ConfigError, match="plain model"):
        estimate_peak(hooked, Job(height=64, width=64, text_len=24), stack=[Offload(onload_device="cpu")])


def test_a_budget_given_as_a_share_of_the_device_needs_the_hardware():
    from types import SimpleNamespace

    model, _ = tiny_flux()
    job = Job(height=64, width=64, text_len=24)
    stack = [Offload(granularity="block", vram_budget="50%")]
    with pytest.raises(ConfigError, match="hardware="):
        estimate_peak(model, job, stack=stack)
    weights = _weights(model)
    half = estimate_peak(model, job, stack=stack, hardware=SimpleNamespace(vram=weights, pinned_limit=0))
    assert 0 < half.host_bytes < weights


def test_a_plan_takes_its_peak_from_the_fake_run_with_the_stack_by_default():
    from hookwise.plan import Hardware, make_plan
    from hookwise.plan.estimate import ActivationEstimate

    model, _ = tiny_flux()
    job = Job(height=64, width=64, text_len=24)
    hw = Hardware.detect(device="cpu", vram=10**9, ram=10**9, tflops=1e-3, probe=False)
    declared = make_plan(model, job, hw, stack_check=False)
    checked = make_plan(model, job, hw)
    assert declared.peak_source == "declarations"
    # Activations the caller states are not replaced by a fake run unless asked for.
    stated = make_plan(model, job, hw, activation_estimator=lambda *a, **k: ActivationEstimate(10**5, "stated"))
    assert stated.peak_source == "declarations"
    assert checked.peak_source == "fake run with the stack"
    run = estimate_peak(model, job, compute_device="cpu", stack=checked.chosen.configs, hardware=hw)
    assert checked.chosen.device_peak == run.peak_bytes
    assert any("fake run with the stack" in note for note in checked.chosen.notes)
    again = type(checked).from_json(checked.to_json())
    assert again.peak_source == checked.peak_source


def test_the_harness_results_are_read_from_the_installed_package():
    from importlib import resources
    from pathlib import Path

    from hookwise.plan.plan import harness_file, harness_results

    for job in (Job(), Job(frames=9), Job(num_steps=50), Job(frames=9, num_steps=50)):
        rows, source = harness_results(job)
        installed = resources.files("hookwise.plan").joinpath("data", Path(source).name)
        assert source == str(installed) and rows
        # docs/ keeps the same files for people (the 50-step rows in docs/frontier/): one set of numbers, not two.
        folder = Path(__file__).resolve().parents[1] / "docs" / ("frontier" if job.num_steps == 50 else "")
        docs = folder / Path(source).name
        assert docs.read_text() == installed.read_text()
        assert harness_file(job, docs.parent) == docs


def test_the_offloads_extra_slot_warning_is_quiet_in_a_fake_run_and_not_in_a_real_one(caplog):
    import logging

    from hookwise.plan._peak_stack import SCHEDULE_LOGGER

    model, _ = tiny_flux()
    job = Job(height=64, width=64, text_len=24, training=True)  # the recompute holds every leaf group of a block
    stack = _stack("leaf-offload", _weights(model))
    with caplog.at_level(logging.WARNING, logger=SCHEDULE_LOGGER):
        report = estimate_peak(model, job, attention_backend="math", compute_device="cpu", stack=stack)
        assert not [r for r in caplog.records if r.name == SCHEDULE_LOGGER]
        assert any("beyond the budget's plan" in note for note in report.modelled)  # the plan still says so
        assert not logging.getLogger(SCHEDULE_LOGGER).filters  # nothing left behind
        inputs = build_inputs(model, job, torch.float32)
        measure_peak(known_target(model)[0], inputs, job, attention_backend="math", stack=stack)
        assert any("slot" in r.getMessage() for r in caplog.records if r.name == SCHEDULE_LOGGER)
