"""The speed techniques' cost declarations: bytes unchanged, time scaled only by a measured factor, and
offered to the planner only where a measured factor below 1 exists for the job's device kind and mode
(a figure measured on one device kind is offered there only), with the figure's source in the plan's notes."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

import hookwise  # noqa: F401 - registers the techniques
from hookwise import Attention, Compile, Kernels
from hookwise.core.cost import CostContext, Footprint, Placement, SpeedFigure, device_kind
from hookwise.core.techniques import technique_named
from hookwise.errors import ConfigError
from hookwise.kernels import attention, compile as compile_technique, fused
from hookwise.plan import Hardware, Job, make_plan
from hookwise.plan.estimate import ActivationEstimate
from model_helpers import tiny_flux

TECHNIQUES = {"kernels": (Kernels, fused), "compile": (Compile, compile_technique), "attention": (Attention, attention)}


def context(device: str = "cuda", training: bool = False, speed: dict | None = None) -> CostContext:
    return CostContext(hardware=SimpleNamespace(device=device), job=None, device_room=1 << 30, ram_room=1 << 30,
                       training=training, measurements={"speed": speed} if speed else {})  # fmt: skip


def placement() -> Placement:
    return Placement.resident(Footprint("model", 1000, (400, 400), (), 0, 250))


@pytest.mark.parametrize("name", list(TECHNIQUES))
def test_nothing_measured_means_no_option_and_time_unchanged(name):
    config_class, _ = TECHNIQUES[name]
    cost = technique_named(name).cost
    ctx = context("xpu")  # a device nothing was measured on
    assert cost.options(placement(), ctx) == []
    after = cost.effect(placement(), config_class(), ctx)
    assert after.compute_factor == 1.0 and after.device_bytes == placement().device_bytes
    assert "no speed-up measured" in after.notes[-1]


@pytest.mark.parametrize("name", list(TECHNIQUES))
def test_the_shipped_measurements_decide_what_is_offered(name):
    config_class, module = TECHNIQUES[name]
    cost = technique_named(name).cost
    machines = [SimpleNamespace(device="cpu", name="AMD EPYC (2 cores)"), SimpleNamespace(device="cuda", name="NVIDIA H100 80GB HBM3"),
                *(SimpleNamespace(device=k.split(":", 1)[0], name=k.split(":", 1)[1]) for k in module.MEASURED_SPEED)]  # fmt: skip
    for hw in machines:
        for training in (False, True):
            figure = module.MEASURED_SPEED.get(device_kind(hw))
            measured = figure.factor(training) if figure else None
            ctx = CostContext(hardware=hw, job=None, device_room=1 << 30, ram_room=1 << 30, training=training)
            assert bool(cost.options(placement(), ctx)) == (measured is not None and measured < 1.0), (hw, training, measured)


def test_every_shipped_figure_names_its_source_and_a_device_kind():
    for name, (_, module) in TECHNIQUES.items():
        for kind, figure in module.MEASURED_SPEED.items():
            assert isinstance(figure, SpeedFigure) and figure.source.strip(), (name, kind)
            assert kind == kind.lower() and kind.split(":", 1)[0] in ("cpu", "cuda") and ":" in kind, (name, kind)


def test_a_speed_figure_without_a_source_or_with_a_bad_ratio_is_refused():
    with pytest.raises(ConfigError, match="where the figure was measured"):
        SpeedFigure(forward=0.8)
    with pytest.raises(ConfigError, match="positive time ratio"):
        SpeedFigure(forward=0.0, source="bench")


def test_the_device_kind_is_the_device_and_its_name():
    assert device_kind(SimpleNamespace(device="cuda", name="NVIDIA  H100 80GB HBM3")) == "cuda:nvidia h100 80gb hbm3"
    assert device_kind(SimpleNamespace(device="cpu", name="")) == "cpu"
    here = Hardware.detect(device="cpu", probe=False)
    assert device_kind(here).startswith("cpu:") and "cores)" in device_kind(here)


@pytest.mark.parametrize("name", list(TECHNIQUES))
def test_a_shipped_figure_is_offered_on_its_device_kind_only(name, monkeypatch):
    config_class, module = TECHNIQUES[name]
    cost = technique_named(name).cost
    measured_on = SimpleNamespace(device="cpu", name="AMD EPYC (2 cores)")
    monkeypatch.setitem(module.MEASURED_SPEED, device_kind(measured_on),
                        SpeedFigure(forward=0.8, backward=1.1, source="benchmarks/kernels.py, 2026-12-01, load 1.0"))  # fmt: skip
    ctx = CostContext(hardware=measured_on, job=None, device_room=1 << 30, ram_room=1 << 30)
    assert [type(c) for c in cost.options(placement(), ctx)] == [config_class]
    after = cost.effect(placement(), config_class(), ctx)
    assert after.compute_factor == pytest.approx(0.8)
    assert after.notes[-1] == f"{name}: measured x0.80 step time on cpu:amd epyc (2 cores) (benchmarks/kernels.py, 2026-12-01, load 1.0)"
    for other in (SimpleNamespace(device="cpu", name="AMD EPYC (64 cores)"), SimpleNamespace(device="cuda", name="H100")):
        ctx = CostContext(hardware=other, job=None, device_room=1 << 30, ram_room=1 << 30)
        assert cost.options(placement(), ctx) == []
        after = cost.effect(placement(), config_class(), ctx)
        assert after.compute_factor == 1.0 and "measured on cpu:amd epyc (2 cores) only" in after.notes[-1]


def test_a_shipped_figure_reaches_the_planners_options_on_that_device_and_not_another(monkeypatch):
    from hookwise.plan import choose
    from hookwise.plan.footprint import label

    # The planner's enumeration over the speed techniques alone (the full table takes a minute per plan).
    speed = [technique_named(n) for n in TECHNIQUES]
    monkeypatch.setattr(choose, "techniques", lambda: speed)
    model, _ = tiny_flux()
    here = Hardware.detect(device="cpu", ram="8GB", tflops=1e-3, probe=False)
    monkeypatch.setitem(fused.MEASURED_SPEED, device_kind(here), SpeedFigure(forward=0.8, source="test figure"))
    job = Job(height=64, width=64, text_len=24)
    estimate = lambda model, job, **kw: ActivationEstimate(20_000, "test")  # noqa: E731
    plan = make_plan(model, job, here, activation_estimator=estimate)
    assert {o.label for o in plan.options} == {"all resident", label(Kernels())}
    offered = next(o for o in plan.options if o.configs)
    assert offered.time_rel == pytest.approx(0.8, rel=0.05) and f"on {device_kind(here)} (test figure)" in offered.notes[-1]
    assert plan.chosen.configs == (Kernels(),)  # faster at the same quality
    elsewhere = here.with_(name="Another CPU (64 cores)")
    assert [o.label for o in make_plan(model, job, elsewhere, activation_estimator=estimate).options] == ["all resident"]
