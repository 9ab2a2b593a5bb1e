"""`hookwise plan MODEL`: the options table, the choice and why, the Python that applies it, or JSON."""

import json

import pytest

from hookwise.cli import main
from hookwise.plan import estimate
from hookwise.plan.estimate import ActivationEstimate


@pytest.fixture(autouse=True)
def stated_activations(monkeypatch):
    """The CLI's activation estimate, stated: these tests check the command, not the fake-tensor run."""
    monkeypatch.setattr(estimate, "default_activation_estimator", lambda *a, **k: ActivationEstimate(2 * 10**9, "stated"))


MACHINE = ["--ram", "64GB", "--h2d", "25GB/s", "--tflops", "130", "--disk-read", "2GB/s"]


def test_plan_a_spec_for_a_stated_gpu_prints_options_choice_why_and_the_python(capsys):
    assert main(["plan", "flux.1-dev", "--vram", "24GB", *MACHINE]) == 0
    out = " ".join(capsys.readouterr().out.split())  # rich wraps lines
    assert "Stacks that fit" in out and "Stacks that do not fit" in out and "all resident" in out
    assert "Chosen for goal 'balanced': offload(vram_budget=" in out
    assert "hookwise.apply(transformer, hookwise.Offload(" in out and "hookwise.optimize(" in out


def test_plan_json_for_video_training_is_machine_readable(capsys):
    args = ["plan", "wan2.1-t2v-14b", "--vram", "80GB", *MACHINE, "--resolution", "480x832", "--frames", "81",
            "--training", "--goal", "quality", "--json"]  # fmt: skip
    assert main(args) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["job"]["frames"] == 81 and data["job"]["training"] and data["goal"] == "quality"
    assert data["chosen"]["label"] == "all resident" and data["chosen"]["quality"] == "exact"
    assert data["activation"]["method"] == "stated"
    assert all("cached" not in o["quality"] for o in data["options"])  # no step cache while training


def test_plan_that_fits_nowhere_exits_nonzero_and_says_why(capsys):
    assert main(["plan", "flux.1-dev", "--vram", "2GB", "--ram", "8GB", "--disk-read", "2GB/s", "--tflops", "130"]) == 1
    assert "None fits" in " ".join(capsys.readouterr().out.split())  # rich wraps lines


def test_plan_with_a_bad_size_is_a_clear_error(capsys):
    assert main(["plan", "flux.1-dev", "--vram", "lots"]) == 2
    assert "not a size" in capsys.readouterr().err
