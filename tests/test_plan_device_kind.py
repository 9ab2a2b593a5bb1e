"""Device kinds: a GPU of the known table has one kind ("cuda:h100") whether stated by name or detected by
the name the driver reports, so a speed figure keyed by it holds for both."""

from types import SimpleNamespace

import pytest
import torch

from hookwise.core.cost import CostContext, Footprint, Placement, SpeedFigure, device_kind, speed_cost, speed_figure
from hookwise.plan import Hardware
from hookwise.plan.hardware import KNOWN_GPUS, known_gpu_name

DETECTED = {  # what torch.cuda reports -> the table's name
    "NVIDIA H100 80GB HBM3": "h100",
    "NVIDIA H100 PCIe": "h100",
    "NVIDIA H200": "h200",
    "NVIDIA A100-SXM4-80GB": "a100",
    "NVIDIA GeForce RTX 4090": "rtx 4090",
    "NVIDIA GeForce RTX 4060 Ti": "rtx 4060 ti",
    "NVIDIA L40S": "l40s",
}


def detected(monkeypatch, name: str, capability=(9, 0)) -> Hardware:
    """Hardware.detect() on a machine whose CUDA device reports `name` (torch.cuda answered by hand)."""
    props = SimpleNamespace(name=name, major=capability[0], minor=capability[1])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: props)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda: (80 * 2**30, 80 * 2**30))
    return Hardware.detect(ram="64GB", h2d="25GB/s", probe=False, gpus=1)


@pytest.mark.parametrize("reported, known", DETECTED.items())
def test_a_detected_gpu_and_the_same_gpu_stated_by_name_are_one_kind(monkeypatch, reported, known):
    found = detected(monkeypatch, reported)
    assert found.name == reported and found.kind == f"cuda:{known}" and device_kind(found) == f"cuda:{known}"
    monkeypatch.undo()
    for spelled in (known, known.upper(), f"NVIDIA {known}"):
        stated = Hardware.detect(gpu=spelled, ram="64GB", probe=False, gpus=1)
        assert stated.kind == found.kind, spelled
    assert known_gpu_name(reported) == known


def test_names_outside_the_table_keep_their_own_spelling():
    assert known_gpu_name("NVIDIA GH200 480GB") is None  # not an h200: whole words only
    assert known_gpu_name("Tesla T4") is None
    assert Hardware.detect(gpu="MI300X", vram="192GB", ram="64GB", probe=False).kind == "cuda:mi300x"
    cpu = Hardware.detect(device="cpu", probe=False)
    assert cpu.kind == device_kind(SimpleNamespace(device="cpu", name=cpu.name)) and cpu.kind.startswith("cpu:")
    # the table's own names are their kinds
    assert all(known_gpu_name(name) == name for name in KNOWN_GPUS)


def _ctx(hardware, **measurements) -> CostContext:
    return CostContext(hardware=hardware, job=None, device_room=1 << 30, ram_room=1 << 30, measurements=measurements)


def test_a_shipped_speed_figure_holds_for_a_stated_and_a_detected_gpu_alike(monkeypatch):
    shipped = {"cuda:h100": SpeedFigure(forward=0.8, source="test figure")}
    cost = speed_cost("kernels", lambda: "config", shipped)
    placement = Placement.resident(Footprint("model", 1000, (400, 400), (), 0, 250))
    found = detected(monkeypatch, "NVIDIA H100 80GB HBM3")
    monkeypatch.undo()
    stated = Hardware.detect(gpu="H100", ram="64GB", probe=False, gpus=1)
    for hardware in (stated, found):
        assert speed_figure(_ctx(hardware), "kernels", shipped) == (0.8, "test figure")
        assert cost.options(placement, _ctx(hardware)) == ["config"]
        assert cost.effect(placement, "config", _ctx(hardware)).notes[-1] == "kernels: measured x0.80 step time on cuda:h100 (test figure)"
    other = Hardware.detect(gpu="H200", ram="64GB", probe=False, gpus=1)
    assert speed_figure(_ctx(other), "kernels", shipped) is None and cost.options(placement, _ctx(other)) == []


def test_a_figure_keyed_by_the_detected_spelling_still_holds_for_that_gpu(monkeypatch):
    found = detected(monkeypatch, "NVIDIA H100 80GB HBM3")
    spelled = {"cuda:nvidia h100 80gb hbm3": SpeedFigure(forward=0.7, source="an older key")}
    assert speed_figure(_ctx(found), "kernels", spelled) == (0.7, "an older key")
    mine = {"kernels": {"cuda:nvidia h100 80gb hbm3": {"forward": 0.6}}}
    assert speed_figure(_ctx(found, speed=mine), "kernels") == (0.6, "your measurement")
    canonical = {"kernels": {"cuda:h100": {"forward": 0.5, "source": "mine"}}}
    assert speed_figure(_ctx(found, speed=canonical), "kernels") == (0.5, "mine")

