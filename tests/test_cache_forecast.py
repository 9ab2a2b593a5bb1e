"""Forecast: blocks computed on a schedule, the skipped steps' residual forecast (Lagrange or fitted weights),
and `calibrate_forecast` (fit, budgeted schedule search)."""

import copy

import pytest
import torch

import hookwise
from hookwise import Forecast, calibrate_forecast, list_hooks
from hookwise.cache import cache_stats
from hookwise.cache._schedule import fit_weights, front_loaded, lagrange_weights
from hookwise.cache.forecast import ForecastPredictor, History
from hookwise.errors import CompatibilityError, ConfigError

from cache_helpers import build, count_blocks, denoise, one_thread, uncount  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = 8


@pytest.mark.parametrize("cfg", ["separate", "batched"])
@pytest.mark.parametrize("name", ["flux", "wan", "musubi"])
@pytest.mark.parametrize(
    "config",
    [Forecast(num_steps=STEPS), Forecast(num_steps=STEPS, budget=STEPS), Forecast(num_steps=STEPS, schedule=tuple(range(STEPS)))],
    ids=["default", "full-budget", "full-schedule"],
)
def test_every_step_in_the_schedule_equals_the_uncached_output_exactly(config, name, cfg):
    model, inputs = build(name)
    reference = denoise(model, name, inputs, steps=STEPS, cfg=cfg)
    hookwise.apply(model, config)
    assert torch.equal(denoise(model, name, inputs, steps=STEPS, cfg=cfg), reference)
    hookwise.remove(model)
    assert list_hooks(model) == {}


@pytest.mark.parametrize("name", ["flux", "wan", "musubi"])
def test_blocks_run_only_on_the_schedule_on_each_branch(name):
    model, inputs = build(name)
    counters = count_blocks(model)
    reference = denoise(model, name, inputs, steps=STEPS)
    for c in counters:
        c.n = 0
    hookwise.apply(model, Forecast(num_steps=STEPS, schedule=(0, 1, 3, 6), order=1))
    out = denoise(model, name, inputs, steps=STEPS)
    assert [c.n for c in counters] == [4 * 2] * len(counters)  # 4 steps, cond + uncond
    assert cache_stats(model)["forecast"]["branches"] == {b: {"computed": 4, "cached": 4} for b in ("cond", "uncond")}
    assert torch.isfinite(out).all() and not torch.equal(out, reference)
    assert (out - reference).norm() < 0.5 * reference.norm()
    hookwise.remove(model)
    uncount(model)


@pytest.mark.parametrize("verify", [None, 1e9])  # 1e9: the probe runs, the forecast is never refused
def test_steps_past_num_steps_compute_and_say_so_once(verify):
    model, inputs = build("musubi")
    counters = count_blocks(model)
    hookwise.apply(model, Forecast(num_steps=4, schedule=(0, 2), verify=verify))
    with pytest.warns(UserWarning, match=r"Forecast\(num_steps=4\) reached step 4") as told:
        denoise(model, "musubi", inputs, steps=6, cfg=None)
    assert counters[0].n == (2 + 2 if verify is None else 6)  # steps 0 and 2, then 4 and 5 (the probe: every step)
    assert counters[-1].n == 2 + 2
    assert sum("reached step" in str(w.message) for w in told) == 1


def test_lagrange_weights_reproduce_polynomials_of_their_order():
    nodes = [0, 2, 5]
    for x in (6.0, 7.0, 9.5):
        w = lagrange_weights(nodes, x)
        assert sum(w) == pytest.approx(1.0)
        assert sum(wj * (3 * n * n - n + 2) for wj, n in zip(w, nodes)) == pytest.approx(3 * x * x - x + 2)


def test_the_predictor_extrapolates_quadratic_residuals_exactly_and_uses_fitted_weights_where_given():
    residual = lambda s: [torch.full((2, 3), 1.0 + 0.5 * s - 0.25 * s * s), None]  # noqa: E731
    pred = ForecastPredictor(order=2, coefficients=None)
    memory = History()
    for s in (0, 1, 3):
        pred.update(memory, 0, residual(s), s)
    got = pred.predict(memory, 0, 5)
    torch.testing.assert_close(got[0], residual(5)[0])
    assert got[1] is None
    coefs = [()] * 6
    coefs[5] = (0.0, 0.25, 0.75)
    fitted = ForecastPredictor(order=2, coefficients=tuple(coefs))
    memory = History()
    for s in (0, 1, 3):
        fitted.update(memory, 0, residual(s), s)
    torch.testing.assert_close(fitted.predict(memory, 0, 5)[0], 0.25 * residual(1)[0] + 0.75 * residual(3)[0])


def test_fitted_weights_recover_a_linear_relation_between_steps():
    torch.manual_seed(0)
    base = torch.randn(3, 100, dtype=torch.float64)
    # step 3 = 0.3 * step 1 + 0.7 * step 2 exactly; step 0 independent
    residuals = torch.stack([base[0], base[1], base[2], 0.3 * base[1] + 0.7 * base[2]])
    gram = residuals @ residuals.T
    rows = fit_weights(gram, (0, 1, 2), order=1, ridge=0.0)
    assert rows[:3] == ((), (), ())
    assert rows[3] == pytest.approx((0.3, 0.7), abs=1e-6)


def test_the_front_loaded_rule_is_dense_early_distinct_and_starts_at_zero():
    for n, b, p in [(28, 7, 2.0), (50, 12, 3.0), (10, 9, 3.0), (5, 5, 2.0)]:
        steps = front_loaded(n, b, p)
        assert len(steps) == b and steps[0] == 0 and list(steps) == sorted(set(steps)) and steps[-1] < n
    steps = front_loaded(28, 7, 2.0)
    gaps = [b - a for a, b in zip(steps, steps[1:])]
    assert gaps == sorted(gaps)  # sparse late


def test_calibration_fits_for_a_schedule_and_the_stack_round_trips():
    model, inputs = build("musubi")
    run = lambda: denoise(model, "musubi", inputs, steps=STEPS)  # noqa: E731
    config = calibrate_forecast(model, run, num_steps=STEPS, schedule=(0, 1, 3, 6), order=2)
    assert list_hooks(model) == {}  # left as it was
    assert len(config.coefficients) == STEPS
    assert [len(r) for r in config.coefficients] == [0, 0, 2, 0, 3, 3, 0, 3]
    loaded = hookwise.Stack.from_json(hookwise.Stack(config).to_json())
    assert loaded == hookwise.Stack(config)
    other = copy.deepcopy(model)
    hookwise.apply(model, config)
    loaded.apply(other)
    a, b = run(), denoise(other, "musubi", inputs, steps=STEPS)
    assert torch.equal(a, b)
    hookwise.remove(model)
    lagrange = Forecast(num_steps=STEPS, schedule=(0, 1, 3, 6), order=2)
    hookwise.apply(model, lagrange)
    assert not torch.equal(run(), a)  # the fitted weights are used


def test_budgeted_calibration_searches_a_schedule_no_worse_than_the_rule():
    model, inputs = build("musubi")
    run = lambda: denoise(model, "musubi", inputs, steps=STEPS)  # noqa: E731
    reference = run()
    config = calibrate_forecast(model, run, num_steps=STEPS, budget=4, order=1, max_runs=12)
    assert list_hooks(model) == {}
    steps = config.computed_steps()
    assert len(steps) == 4 and steps[0] == 0

    def error(cfg):
        hookwise.apply(model, cfg)
        try:
            return float((run() - reference).norm())
        finally:
            hookwise.remove(model)

    rule = Forecast(num_steps=STEPS, schedule=front_loaded(STEPS, 4, 2.0), order=1)
    assert error(config) <= error(rule) + 1e-6


def test_calibration_needs_samples_back_and_the_right_step_count():
    model, inputs = build("musubi")
    with pytest.raises(ConfigError, match="must return the samples"):
        calibrate_forecast(model, lambda: None, num_steps=STEPS, budget=4)
    with pytest.raises(ConfigError, match="made 6 steps"):
        calibrate_forecast(model, lambda: denoise(model, "musubi", inputs, steps=6), num_steps=STEPS, budget=4)
    with pytest.raises(ConfigError, match="a `budget`"):
        calibrate_forecast(model, lambda: None, num_steps=STEPS)
    assert list_hooks(model) == {}


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(schedule=(1, 2)), "starting at step 0"),
        (dict(schedule=(0, 2, 2)), "increasing"),
        (dict(schedule=(0, 30)), r"in \[0, 28\)"),
        (dict(schedule=(0, 3), budget=2), "not both"),
        (dict(budget=40), "more than num_steps"),
        (dict(power=0), "power"),
        (dict(order=-1), "order"),
        (dict(schedule=(0, 2), coefficients=((),) * 5), "one row per step"),
        (dict(schedule=(0, 2), order=1, coefficients=((0.5,),) + ((),) * 27), "computed step takes none"),
        (dict(schedule=(0, 2), order=1, coefficients=((), (0.1, 0.2, 0.3)) + ((),) * 26), "at most order"),
    ],
)
def test_bad_settings_raise_a_clear_config_error(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        Forecast(**kwargs)


@pytest.mark.parametrize("other", [hookwise.TaylorSeer(order=2), hookwise.FirstBlockCache(threshold=0.2)])
def test_another_block_cache_or_predictor_conflicts_and_nothing_is_attached(other):
    model, _ = build("musubi")
    with pytest.raises(CompatibilityError):
        hookwise.apply(model, Forecast(budget=7), other)
    assert list_hooks(model) == {}


@pytest.mark.parametrize(
    "memory",
    [hookwise.Offload(onload_device="cpu", offload_device="cpu"), hookwise.LayerwiseCasting(storage_dtype=torch.bfloat16)],
    ids=["offload", "casting"],
)
def test_composes_with_offload_and_casting(memory):
    model, inputs = build("musubi")
    config = Forecast(num_steps=STEPS, schedule=(0, 1, 3, 6), order=1)
    expected_model = copy.deepcopy(model)
    hookwise.apply(expected_model, memory)
    counters = count_blocks(model)
    hookwise.apply(model, memory, config)
    hookwise.apply(expected_model, config)
    out = denoise(model, "musubi", inputs, steps=STEPS)
    assert counters[0].n == 4 * 2
    torch.testing.assert_close(out, denoise(expected_model, "musubi", inputs, steps=STEPS), rtol=0, atol=0)
    hookwise.remove(model)


@pytest.mark.parametrize("name", ["flux-shapes", "wan-moving"])
def test_shipped_zoo_schedules_load_as_configs_of_their_budget(name):
    from hookwise.zoo import shipped_forecast, shipped_forecasts

    found = shipped_forecasts(name)
    assert 28 in found
    for steps, by_budget in found.items():
        for budget, config in by_budget.items():
            assert config.num_steps == steps and len(config.computed_steps()) == budget
            assert config.coefficients is None or len(config.coefficients) == steps
    assert shipped_forecast(name).computed_steps() == found[28][7].computed_steps()
    with pytest.raises(ConfigError, match="shipped budgets"):
        shipped_forecast(name, 28, 5)
