"""The shipped step-cache harness rows hold Forecast's default setting, so the planner offers Forecast for sampling."""

import pytest
from plan_helpers import full_size_plan

from hookwise import Forecast
from hookwise.plan import Hardware, Job
from hookwise.plan.plan import harness_results


def _machine() -> Hardware:
    return Hardware.detect(vram="80GB", ram="128GB", h2d="25GB/s", disk_read="2GB/s", tflops=130, probe=False)


@pytest.mark.parametrize("job", [Job(), Job(frames=9)], ids=["image", "video"])
def test_the_shipped_rows_hold_forecasts_measured_default(job):
    rows, _ = harness_results(job)
    default = [r for r in rows if r["method"] == "forecast" and r["impl"] == "hookwise" and r["default"]]
    assert len(default) == 1 and default[0]["setting"] == "budget=7/28, order=1"
    assert default[0]["block_frac"] == 0.25 and default[0]["speedup"] > 1 and default[0]["psnr"] >= 35


def test_the_planner_offers_forecast_with_its_measured_psnr_and_not_without_its_row():
    job = Job(height=1024, width=1024)
    plan = full_size_plan("flux.1-dev", job, _machine(), "speed")
    offered = [o for o in plan.options if any(isinstance(c, Forecast) for c in o.configs)]
    assert offered and all(Forecast(num_steps=28, budget=7) in o.configs for o in offered)
    rows, _ = harness_results(job)
    psnr = next(r["psnr"] for r in rows if r["method"] == "forecast" and r["default"])
    assert all(f"cached@{psnr:.0f} dB" in o.quality_class for o in offered)
    without = [r for r in rows if r["method"] != "forecast"]
    plan = full_size_plan("flux.1-dev", job, _machine(), "speed", measurements={"cache": without})
    assert not any(isinstance(c, Forecast) for o in plan.options for c in o.configs)
