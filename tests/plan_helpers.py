"""Fixtures for tests of `hookwise plan` that check options and commands, not fake-tensor runs.

Import them into a test module (`from plan_helpers import stated_activations, stack_checks  # noqa: F401`):
both are autouse there."""

import pytest

from hookwise.plan import estimate
from hookwise.plan.estimate import ActivationEstimate


@pytest.fixture(autouse=True)
def stated_activations(monkeypatch):
    """The activation estimate, stated (2 GB): the tests check the options, not the fake-tensor run."""
    monkeypatch.setattr(estimate, "default_activation_estimator", lambda *a, **k: ActivationEstimate(2 * 10**9, "stated"))


@pytest.fixture(autouse=True)
def stack_checks(monkeypatch):
    """The stack check's fake runs, recorded and answered with "cannot run" (the declarations stand):
    the tests check that they are asked for, not the runs (tests/test_plan_stacks.py does)."""
    from hookwise.plan import plan as plan_module

    calls = []

    def no_run(model, job, configs, **kwargs):
        calls.append(configs)
        return None

    monkeypatch.setattr(plan_module, "stack_peak", no_run)
    return calls
