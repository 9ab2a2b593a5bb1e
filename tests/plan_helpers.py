"""Fixtures for tests of `hookwise plan` that check options and commands, not fake-tensor runs.

Import them into a test module (`from plan_helpers import stated_activations, stack_checks  # noqa: F401`):
both are autouse there.

`one_thread` (from cache_helpers): the real CPU runs that fake runs are checked against, and the fake runs,
are many tiny ops: on the shared 2-core machine two threads spin against each other (a zoo model's LoRA step
14 s with two threads, 1.5 s with one; the same peaks). Use it with `pytestmark = pytest.mark.usefixtures("one_thread")`.

`full_size(name)` and `full_size_plan(...)`: a shipped full-size spec on `meta` (with its measured target
and the formula's activations) and the plan for it, made once per test process: several tests read the
same plan (a full-size plan enumerates hundreds of stacks: seconds each), none changes it.
"""

import functools
import json

import pytest
from cache_helpers import one_thread  # noqa: F401 - re-exported for the plan tests

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


@functools.lru_cache(maxsize=None)
def full_size(name: str):
    """(model on meta, its measured target, the formula's activation estimator) of shipped spec `name`."""
    from hookwise.introspect import build_spec
    from hookwise.plan.estimate import formula_activation
    from hookwise.plan.footprint import hidden_size, measure

    model = build_spec(name)
    target = measure(model)
    model_map = target.denoiser.model_map

    def estimator(m, job, **kw):
        return formula_activation(model_map, job, hidden_size(model_map))

    return model, target, estimator


def full_size_plan(name: str, job, hardware, goal: str = "balanced", measurements: dict | None = None):
    """`make_plan` for spec `name` with the formula's activations (no fake run), made once per arguments:
    the same plan object for every test that asks for it, so read it, never change it."""
    return _full_size_plan(name, job, hardware, goal, json.dumps(measurements, sort_keys=True))


@functools.lru_cache(maxsize=None)
def _full_size_plan(name, job, hardware, goal, measurements):
    from hookwise.plan import make_plan

    model, target, estimator = full_size(name)
    return make_plan(model, job, hardware, goal, activation_estimator=estimator, target=target,
                     measurements=json.loads(measurements))  # fmt: skip


@pytest.fixture(autouse=True, scope="module")
def one_map_per_spec():
    """`hookwise plan SPEC` run many times in a module: each spec is built and described once (the model on
    `meta` is only read by a plan; `describe_cache` holds its map while it is unchanged)."""
    from hookwise import cli
    from hookwise.introspect import describe_cache

    real = cli.load_model
    loaded = functools.lru_cache(maxsize=None)(lambda name, dtype: real(name, dtype=dtype))
    cli.load_model = lambda name, dtype=None: loaded(name, dtype)
    try:
        with describe_cache():
            yield
    finally:
        cli.load_model = real
