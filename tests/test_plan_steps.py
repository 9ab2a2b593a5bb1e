"""The job's step count: the planner reads the cache rows measured at the nearest step count (and says
which), offers Forecast scheduled for the job's `num_steps`, and the stack it writes runs a sampling run
of the job's length without outlasting its schedule."""

import json
import warnings

import pytest

import hookwise
from hookwise import Forecast
from hookwise.core.cost import measured_config
from hookwise.errors import ConfigError
from hookwise.plan import Hardware, Job, make_plan
from hookwise.plan.estimate import ActivationEstimate
from hookwise.plan.plan import harness_results, harness_steps

from cache_helpers import build, count_blocks, denoise, one_thread, uncount  # noqa: F401

MACHINE = dict(vram="24GB", ram="64GB", h2d="25GB/s", disk_read="2GB/s", tflops=130, probe=False)
TINY = dict(height=64, width=64, text_len=24)


def stated(*args, **kwargs):
    return ActivationEstimate(20_000, "stated")


@pytest.fixture(scope="module")
def flux():
    return build("flux")


def _plan(model, job, goal="speed"):
    return make_plan(model, job, Hardware.detect(**MACHINE), goal, activation_estimator=stated)


def _forecasts(plan):
    return {c for o in plan.options for c in o.configs if isinstance(c, Forecast)}


def test_a_job_states_its_step_count_validated_and_serialized():
    assert Job().num_steps == 28
    assert Job.from_dict(Job(num_steps=50).to_dict()) == Job(num_steps=50)
    for bad in (0, 2.5, True):
        with pytest.raises(ConfigError, match="num_steps"):
            Job(num_steps=bad)


@pytest.mark.parametrize(
    "steps, nearest", [(1, 28), (20, 28), (28, 28), (39, 28), (40, 50), (50, 50), (200, 50)]
)  # 39 is as near 28 as 50: the fewer steps
def test_the_cache_rows_are_those_measured_at_the_nearest_step_count(steps, nearest):
    for frames, name in ((1, "cache-flux-shapes"), (9, "cache-wan-moving")):
        job = Job(frames=frames, num_steps=steps)
        assert harness_steps(job) == nearest
        rows, source = harness_results(job)
        assert source.endswith(f"{name}{'' if nearest == 28 else '-50'}.json") and rows
        forecast = next(r for r in rows if r["method"] == "forecast" and r["impl"] == "hookwise" and r["default"])
        assert forecast["setting"] == f"budget={7 if nearest == 28 else 12}/{nearest}, order=1"


@pytest.mark.parametrize(
    "steps, frames, chosen, psnr, rows",
    [
        (28, 1, Forecast(num_steps=28, budget=7), 43, "cache-flux-shapes.json, measured at 28 steps"),
        (50, 1, Forecast(num_steps=50, budget=12), 52, "cache-flux-shapes-50.json, measured at 50 steps"),
        (28, 9, Forecast(num_steps=28, budget=7), 36, "cache-wan-moving.json, measured at 28 steps"),
        (50, 9, Forecast(num_steps=50, budget=12), 47, "cache-wan-moving-50.json, measured at 50 steps"),
        (40, 1, Forecast(num_steps=40, budget=10), 52, "cache-flux-shapes-50.json, measured at 50 steps, the nearest to the job's 40"),
        (20, 1, Forecast(num_steps=20, budget=5), 43, "cache-flux-shapes.json, measured at 28 steps, the nearest to the job's 20"),
    ],
)  # fmt: skip
def test_speed_takes_forecast_scheduled_for_the_jobs_steps_and_says_which_rows(flux, steps, frames, chosen, psnr, rows):
    model, _ = flux
    plan = _plan(model, Job(**TINY, frames=frames, num_steps=steps))
    assert plan.chosen.configs == (chosen,) and plan.chosen.quality_class == f"cached@{psnr} dB"
    assert _forecasts(plan) == {chosen}  # every stack with Forecast has it for the job's steps
    assert f"({rows})" in plan.explanation and f"{steps} steps" in plan.explanation
    rescaled = [n for n in plan.chosen.notes if n.startswith("forecast: scheduled for")]
    if steps in (28, 50):
        assert rescaled == []  # the measured config itself
    else:
        assert rescaled == [f"forecast: scheduled for {steps} steps; its speed and PSNR were measured with the same share "
                            f"of {harness_steps(plan.job)} steps (budget={12 if steps > 39 else 7}/{harness_steps(plan.job)}, order=1)"]  # fmt: skip
    again = type(plan).from_json(plan.to_json())
    assert again.job.num_steps == steps and again.stack == plan.stack


def test_the_rows_decide_the_other_caches_too(flux):
    # dual-block was measured at 28 steps only: it is not offered where the 50-step rows are read
    model, _ = flux
    names = lambda plan: {type(c).__name__ for o in plan.options for c in o.configs}  # noqa: E731
    assert "DualBlockCache" in names(_plan(model, Job(**TINY, num_steps=28)))
    assert "DualBlockCache" not in names(_plan(model, Job(**TINY, num_steps=50)))


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("steps", [28, 50, 40])
def test_the_stack_the_plan_writes_runs_the_jobs_steps_without_outlasting_its_schedule(flux, steps):
    model, inputs = flux
    plan = _plan(model, Job(**TINY, num_steps=steps))
    (forecast,) = plan.stack.configs
    counters = count_blocks(model)
    hookwise.apply(model, *plan.stack.configs)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message=".*longer than its schedule")
            denoise(model, "flux", inputs, steps=steps, cfg=None)
        assert [c.n for c in counters] == [forecast.budget] * len(counters)  # the blocks ran on the schedule alone
        # The config the planner offered before the step count was the job's: a 50-step run outlasts it.
        hookwise.remove(model)
        if steps > 28:
            hookwise.apply(model, Forecast(num_steps=28, budget=7))
            with pytest.warns(UserWarning, match=r"Forecast\(num_steps=28\) reached step 28"):
                denoise(model, "flux", inputs, steps=steps, cfg=None)
    finally:
        hookwise.remove(model)
        uncount(model)


def test_a_measured_config_takes_the_jobs_step_count_and_keeps_its_share():
    def row(config):
        return {"config": [config.to_dict()]}

    even = Forecast(num_steps=50, budget=12)
    assert measured_config(row(even), Forecast, 50) == even
    assert measured_config(row(even), Forecast, None) == even
    assert measured_config(row(even), Forecast, 25) == Forecast(num_steps=25, budget=6)
    assert measured_config(row(even), Forecast, 3) == Forecast(num_steps=3, budget=1)
    searched = Forecast(num_steps=28, schedule=(0, 4, 9, 13, 19, 23, 26))
    assert measured_config(row(searched), Forecast, 56) == Forecast(num_steps=56, schedule=(0, 8, 18, 26, 38, 46, 52))
    assert measured_config(row(searched), Forecast, 7).schedule == (0, 1, 2, 3, 5, 6)  # steps that meet merge
    fitted = Forecast(num_steps=4, schedule=(0, 2), coefficients=((), (1.0, 0.0), (), (0.5, 0.5)))
    assert measured_config(row(fitted), Forecast, 4) == fitted
    assert measured_config(row(fitted), Forecast, 8) is None  # per-step fitted weights: not for another count
    assert measured_config(None, lambda: Forecast(budget=7), 56) == Forecast(num_steps=56, budget=14)  # no row config
    assert measured_config({"config": [{"technique": "taylorseer", "order": 2}]}, lambda: Forecast(budget=7), 28) == Forecast(budget=7)


def test_hookwise_plan_steps_reaches_the_job(capsys, monkeypatch):
    from hookwise.cli import main
    from hookwise.core.techniques import technique_named
    from hookwise.plan import choose

    # The enumeration over the step caches alone (the full table of a full-size model takes seconds per plan).
    caches = [technique_named(n) for n in ("forecast", "taylorseer", "first_block_cache")]
    monkeypatch.setattr(choose, "techniques", lambda: caches)
    common = ["plan", "flux.1-dev", "--vram", "80GB", "--ram", "128GB", "--tflops", "130", "--goal", "speed", "--json",
              "--no-stack-check"]  # fmt: skip
    monkeypatch.setattr("hookwise.plan.estimate.default_activation_estimator", stated)
    for extra, steps, chosen in (([], 28, Forecast(budget=7)), (["--steps", "50"], 50, Forecast(num_steps=50, budget=12))):
        assert main([*common, *extra]) == 0
        data = json.loads(capsys.readouterr().out)
        assert data["job"]["num_steps"] == steps
        assert data["chosen"]["techniques"] == [chosen.to_dict()]
    with pytest.raises(SystemExit):
        main([*common, "--steps", "0"])
    assert "must be at least 1" in capsys.readouterr().err
