"""Forecast's options past the plain forecast: verify (a probe block checks the forecast), the Hermite
predictor and the corrector's blend (and its closed-form fit)."""

import pytest
import torch

import hookwise
from hookwise import Forecast, calibrate_forecast, list_hooks
from hookwise.cache import cache_stats
from hookwise.cache._schedule import blended, fit_blend, hermite_weights, lagrange_weights
from hookwise.cache.forecast import ForecastPredictor, History
from hookwise.errors import ConfigError

from cache_helpers import build, count_blocks, denoise, one_thread, uncount  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = 8
SCHEDULE = (0, 3, 6)


@pytest.mark.parametrize("cfg", ["separate", "batched"])
@pytest.mark.parametrize("name", ["flux", "wan", "musubi"])
def test_verify_at_zero_or_a_tiny_threshold_computes_every_step_exactly(name, cfg):
    model, inputs = build(name)
    reference = denoise(model, name, inputs, steps=STEPS, cfg=cfg)
    for threshold in (0.0, 1e-12):  # 0: never skips; 1e-12: every forecast of the probe is off by more
        hookwise.apply(model, Forecast(num_steps=STEPS, schedule=SCHEDULE, verify=threshold))
        assert torch.equal(denoise(model, name, inputs, steps=STEPS, cfg=cfg), reference)
        branches = cache_stats(model)["forecast"]["branches"]
        assert all(b["cached"] == 0 for b in branches.values())
        hookwise.remove(model)
    assert list_hooks(model) == {}


def test_a_trusted_forecast_runs_the_probe_block_every_step_and_the_rest_on_the_schedule():
    model, inputs = build("flux")
    counters = count_blocks(model)
    hookwise.apply(model, Forecast(num_steps=STEPS, schedule=SCHEDULE, verify=1e9))
    out = denoise(model, "flux", inputs, steps=STEPS)
    assert counters[0].n == STEPS * 2  # the probe: every step, cond + uncond
    assert [c.n for c in counters[1:]] == [len(SCHEDULE) * 2] * (len(counters) - 1)
    assert torch.isfinite(out).all()
    hookwise.remove(model)
    uncount(model)


def test_a_step_computed_off_the_schedule_re_anchors_the_forecast_without_becoming_a_node():
    line = lambda s: torch.full((2, 3), 1.0 + 0.5 * s)  # noqa: E731
    pred = ForecastPredictor(1, None, schedule=frozenset({0, 3, 8}))
    memory = History()
    for s in (0, 3):
        pred.update(memory, 0, [line(s)], s)
    pred.update(memory, 0, [line(4) + 2.0], 4)  # verified off the schedule: the forecast was off by 2 there
    assert [s for s, _ in memory.by_segment[0]] == [0, 3] and memory.anchor[0][0] == 4
    torch.testing.assert_close(pred.predict(memory, 0, 6)[0], line(6) + 2.0)  # the slope of 0, 3; the level of 4
    pred.update(memory, 0, [line(8)], 8)  # the next scheduled step: a node again, the anchor dropped
    assert [s for s, _ in memory.by_segment[0]] == [3, 8] and 0 not in memory.anchor
    torch.testing.assert_close(pred.predict(memory, 0, 9)[0], line(9))
    pred.update(memory, 0, [line(0)], 0)  # a new run
    assert [s for s, _ in memory.by_segment[0]] == [0] and not memory.anchor


def test_the_probe_decides_per_step_and_more_trusted_forecasts_cost_quality():
    """On tiny Wan at threshold 0.1 some skipped steps compute after the probe and others keep the forecast;
    a higher threshold trusts more forecasts, and the error against the uncached run follows the work done."""
    model, inputs = build("wan")
    reference = denoise(model, "wan", inputs, steps=STEPS)
    cached, errors = [], []
    for threshold in (0.1, 1e9):
        hookwise.apply(model, Forecast(num_steps=STEPS, schedule=SCHEDULE, verify=threshold))
        out = denoise(model, "wan", inputs, steps=STEPS)
        cached.append(sum(b["cached"] for b in cache_stats(model)["forecast"]["branches"].values()))
        errors.append(float((out - reference).norm()))
        hookwise.remove(model)
    assert 0 < cached[0] < cached[1] == 2 * (STEPS - len(SCHEDULE))
    assert errors[0] < errors[1]


def test_hermite_weights_are_exact_on_lines_and_differ_from_lagrange_on_curves():
    nodes = [0, 2, 5]
    for x in (6.0, 7.0, 8.0):
        w = hermite_weights(nodes, x)
        assert sum(w) == pytest.approx(1.0)
        assert sum(wj * (2.5 * n - 1.0) for wj, n in zip(w, nodes)) == pytest.approx(2.5 * x - 1.0)
        assert w != pytest.approx([0.0] + lagrange_weights(nodes[1:], x))
    assert hermite_weights([0, 4], 6.0) == lagrange_weights([0, 4], 6.0)  # two steps only: linear
    # by hand: nodes 0, 1, 2 at x = 3 (t = 2): h00 = 5, h10 = 2, h01 = -4, h11 = 4 -> y = 5 y1 - 4 y2 + 2 (y1 - y0) + 4 (y2 - y1)
    assert hermite_weights([0, 1, 2], 3.0) == pytest.approx([-2.0, 3.0, 0.0])


def test_the_hermite_predictor_and_the_blend_use_their_weights():
    residual = lambda s: [torch.full((2, 3), 1.0 + 0.5 * s - 0.25 * s * s)]  # noqa: E731
    hist = {}
    for name, pred in [("hermite", ForecastPredictor(1, None, "hermite")), ("blend", ForecastPredictor(1, None, blend=0.25))]:
        memory = History()
        for s in (0, 2, 5):
            pred.update(memory, 0, residual(s), s)
        hist[name] = pred.predict(memory, 0, 7)[0]
    want_h = sum(w * residual(s)[0] for w, s in zip(hermite_weights([0, 2, 5], 7.0), (0, 2, 5)))
    torch.testing.assert_close(hist["hermite"], want_h)
    lin = lagrange_weights([2, 5], 7.0)
    want_b = 0.75 * (lin[0] * residual(2)[0] + lin[1] * residual(5)[0]) + 0.25 * residual(5)[0]
    torch.testing.assert_close(hist["blend"], want_b)
    assert blended([0.2, 0.8], 0.0) == [0.2, 0.8] and blended([0.2, 0.8], 1.0) == [0.0, 1.0]


def test_the_blend_fit_recovers_a_known_blend_and_stays_in_range():
    torch.manual_seed(0)
    base = torch.randn(3, 200, dtype=torch.float64)
    lin = lambda nodes, x: lagrange_weights(nodes, x)  # noqa: E731
    # step 3's residual is exactly 0.6 * (linear forecast from steps 1, 2) + 0.4 * R(2)
    forecast = sum(w * base[n] for w, n in zip(lin([1, 2], 3), (1, 2)))
    residuals = torch.stack([base[0], base[1], base[2], 0.6 * forecast + 0.4 * base[2]])
    assert fit_blend(residuals @ residuals.T, (0, 1, 2), lin, keep=2) == pytest.approx(0.4, abs=1e-6)
    overshoot = torch.stack([base[0], base[1], base[2], 2.0 * forecast - base[2]])  # blend -1: clamped to 0
    assert fit_blend(overshoot @ overshoot.T, (0, 1, 2), lin, keep=2) == 0.0


def test_calibration_fits_the_blend_and_the_config_round_trips_with_the_stack():
    model, inputs = build("musubi")
    run = lambda: denoise(model, "musubi", inputs, steps=STEPS)  # noqa: E731
    config = calibrate_forecast(model, run, num_steps=STEPS, schedule=SCHEDULE, fit=False, blend=True, predictor="hermite", verify=0.5)
    assert list_hooks(model) == {}
    assert config.coefficients is None and 0.0 <= config.blend <= 1.0
    assert config.predictor == "hermite" and config.verify == 0.5 and config.schedule == SCHEDULE
    assert hookwise.Stack.from_json(hookwise.Stack(config).to_json()) == hookwise.Stack(config)
    with pytest.raises(ConfigError, match="fit=False"):
        calibrate_forecast(model, run, num_steps=STEPS, schedule=SCHEDULE, blend=True)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(predictor="spline"), "predictor"),
        (dict(blend=1.5), "blend"),
        (dict(blend=True), "blend"),
        (dict(verify=-0.1), "verify"),
        (dict(verify="high"), "verify"),
        (dict(schedule=(0, 2), predictor="hermite", coefficients=((), (), (0.1, 0.2, 0.3, 0.4)) + ((),) * 25), "at most 3"),
    ],
)
def test_bad_options_raise_a_clear_config_error(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        Forecast(**kwargs)
