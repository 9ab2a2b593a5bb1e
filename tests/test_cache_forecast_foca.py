"""Forecast's predict-then-correct predictor (predictor="foca") and verify's input probe (probe="input")."""

import pytest
import torch

import hookwise
from hookwise import Forecast, calibrate_forecast, list_hooks
from hookwise.cache import cache_stats
from hookwise.cache.forecast import FOCA_GAIN, FocaPredictor, ForecastPredictor, History, Trend
from hookwise.errors import ConfigError

from cache_helpers import build, count_blocks, denoise, one_thread, uncount  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = 8
SCHEDULE = (0, 3, 6)


@pytest.mark.parametrize("cfg", ["separate", "batched"])
@pytest.mark.parametrize("name", ["flux", "wan", "musubi"])
def test_foca_and_the_input_probe_are_exact_at_their_never_skip_settings(name, cfg):
    model, inputs = build(name)
    reference = denoise(model, name, inputs, steps=STEPS, cfg=cfg)
    every = tuple(range(STEPS))
    for config in (
        Forecast(num_steps=STEPS, schedule=every, predictor="foca"),  # every step on the schedule
        Forecast(num_steps=STEPS, schedule=SCHEDULE, verify=0.0, probe="input"),  # verify 0: every step computes
        Forecast(num_steps=STEPS, schedule=SCHEDULE, verify=0.0, probe="input", predictor="foca"),
    ):
        hookwise.apply(model, config)
        assert torch.equal(denoise(model, name, inputs, steps=STEPS, cfg=cfg), reference), config
        assert all(b["cached"] == 0 for b in cache_stats(model)["forecast"]["branches"].values())
        hookwise.remove(model)
    assert list_hooks(model) == {}


def test_foca_at_gain_one_is_the_linear_forecast_and_its_gain_corrects_the_slope():
    curve = lambda s: torch.full((2, 3), 1.0 + 0.5 * s - 0.1 * s * s)  # noqa: E731
    linear, memory_l = ForecastPredictor(1, None), History()
    one, memory_1 = FocaPredictor(1.0), Trend()
    for s in (0, 3, 6):
        linear.update(memory_l, 0, [curve(s)], s)
        one.update(memory_1, 0, [curve(s)], s)
    for x in (7, 8):
        torch.testing.assert_close(one.predict(memory_1, 0, x)[0], linear.predict(memory_l, 0, x)[0])
    # by hand, gain 1.5: slope(3) = (R3 - R0) / 3; forecast(6) = R3 + 3 slope; slope(6) = slope + 1.5 (R6 - forecast) / 3
    pred, memory = FocaPredictor(1.5), Trend()
    for s in (0, 3, 6):
        pred.update(memory, 0, [curve(s)], s)
    slope3 = (curve(3) - curve(0)) / 3
    slope6 = slope3 + 1.5 * (curve(6) - (curve(3) + 3 * slope3)) / 3
    torch.testing.assert_close(pred.predict(memory, 0, 8)[0], curve(6) + 2 * slope6)
    assert not torch.allclose(pred.predict(memory, 0, 8)[0], one.predict(memory_1, 0, 8)[0])
    assert pred.predict(memory, 0, 6)[0] is not None
    pred.update(memory, 0, [curve(0)], 0)  # a new run: the level only, no slope yet
    torch.testing.assert_close(pred.predict(memory, 0, 2)[0], curve(0))


def test_foca_skips_on_the_schedule_and_its_gain_changes_the_output():
    model, inputs = build("wan")
    counters = count_blocks(model)
    outs = []
    for gain in (1.0, None):
        hookwise.apply(model, Forecast(num_steps=STEPS, schedule=SCHEDULE, predictor="foca", gain=gain))
        outs.append(denoise(model, "wan", inputs, steps=STEPS))
        assert [c.n for c in counters] == [len(SCHEDULE) * 2] * len(counters)  # cond + uncond on the schedule only
        assert cache_stats(model)["forecast"]["predictor"] == "foca"
        hookwise.remove(model, "forecast")
        for c in counters:
            c.n = 0
    hookwise.apply(model, Forecast(num_steps=STEPS, schedule=SCHEDULE))
    plain = denoise(model, "wan", inputs, steps=STEPS)
    hookwise.remove(model, "forecast")
    uncount(model)
    torch.testing.assert_close(outs[0], plain)  # gain 1: the linear forecast
    assert not torch.equal(outs[1], plain) and torch.isfinite(outs[1]).all()  # FOCA_GAIN (not 1) differs
    assert FOCA_GAIN != 1


def test_the_input_probe_runs_no_block_and_decides_per_step():
    """A trusted forecast runs no probe block (every block runs on the schedule only); at a small threshold some
    skipped steps compute after all (and the output changes), and a higher threshold trusts more forecasts."""
    model, inputs = build("wan")
    counters = count_blocks(model)
    hookwise.apply(model, Forecast(num_steps=STEPS, schedule=SCHEDULE, verify=1e9, probe="input"))
    denoise(model, "wan", inputs, steps=STEPS)
    assert [c.n for c in counters] == [len(SCHEDULE) * 2] * len(counters)
    hookwise.remove(model)
    uncount(model)
    reference = denoise(model, "wan", inputs, steps=STEPS)
    cached, outs = [], []
    for threshold in (0.1, 1e9):
        hookwise.apply(model, Forecast(num_steps=STEPS, schedule=SCHEDULE, verify=threshold, probe="input"))
        out = denoise(model, "wan", inputs, steps=STEPS)
        cached.append(sum(b["cached"] for b in cache_stats(model)["forecast"]["branches"].values()))
        outs.append(out)
        hookwise.remove(model)
    assert 0 < cached[0] < cached[1] == 2 * (STEPS - len(SCHEDULE)), cached
    assert not torch.equal(outs[0], outs[1]) and not torch.equal(outs[0], reference)


def test_the_new_options_round_trip_with_the_stack_and_calibrate_searches_foca_schedules():
    for config in (
        Forecast(num_steps=STEPS, schedule=SCHEDULE, predictor="foca", gain=1.2),
        Forecast(num_steps=STEPS, schedule=SCHEDULE, verify=0.01, probe="input", predictor="foca"),
    ):
        assert hookwise.Stack.from_json(hookwise.Stack(config).to_json()) == hookwise.Stack(config)
    model, inputs = build("musubi")
    run = lambda: denoise(model, "musubi", inputs, steps=STEPS)  # noqa: E731
    found = calibrate_forecast(model, run, num_steps=STEPS, budget=3, predictor="foca", fit=False, max_runs=4)
    assert found.predictor == "foca" and len(found.schedule) == 3 and found.coefficients is None
    assert list_hooks(model) == {}
    with pytest.raises(ConfigError, match="fit=False"):
        calibrate_forecast(model, run, num_steps=STEPS, budget=3, predictor="foca")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(gain=1.2), "predictor='foca'"),
        (dict(predictor="foca", gain=0.0), "gain"),
        (dict(predictor="foca", gain=2.5), "gain"),
        (dict(predictor="foca", order=2), "order=1"),
        (dict(predictor="foca", blend=0.3), "blend"),
        (dict(predictor="foca", verify=0.1), "probe='input'"),
        (dict(probe="input"), "verify"),
        (dict(probe="attention", verify=0.1), "probe"),
    ],
)
def test_bad_foca_and_probe_options_raise_a_clear_config_error(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        Forecast(**kwargs)
