"""The speed techniques' cost declarations: bytes unchanged, time scaled only by a measured factor, and
offered to the planner only where a measured factor below 1 exists for the job's device and mode."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

import hookwise  # noqa: F401 - registers the techniques
from hookwise import Attention, Compile, Kernels
from hookwise.core.cost import CostContext, Footprint, Placement
from hookwise.core.techniques import technique_named
from hookwise.kernels import attention, compile as compile_technique, fused

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
    for device in ("cpu", "cuda"):
        for training, mode in ((False, "forward"), (True, "backward")):
            measured = module.MEASURED_SPEED.get(device, {}).get(mode)
            offered = cost.options(placement(), context(device, training))
            assert bool(offered) == (measured is not None and measured < 1.0), (device, mode, measured)


@pytest.mark.parametrize("name", list(TECHNIQUES))
def test_a_measured_speed_up_is_offered_for_its_device_and_mode_only(name):
    config_class, _ = TECHNIQUES[name]
    cost = technique_named(name).cost
    speed = {name: {"cuda": {"forward": 0.7, "backward": 1.05}}}
    ctx = context("cuda", speed=speed)
    assert [type(c) for c in cost.options(placement(), ctx)] == [config_class]
    after = cost.effect(placement(), config_class(), ctx)
    assert after.compute_factor == pytest.approx(0.7) and "measured x0.70" in after.notes[-1]
    assert cost.options(placement(), context("cuda", training=True, speed=speed)) == []  # slower in training
    assert cost.effect(placement(), config_class(), context("cuda", training=True, speed=speed)).compute_factor == pytest.approx(1.05)
