"""The cache quality harness and `hookwise bench cache`."""

import json
import math

import pytest
import torch

from hookwise.cli import main
from hookwise.errors import ConfigError
from hookwise.bench import RunResult, best_at_work, best_at_work_markdown, compare_at_equal_work, run_cache_bench, save_plot, to_markdown
from hookwise.zoo.reference import ReferenceModel, get_reference_spec

from cache_helpers import one_thread  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def untrained():
    torch.manual_seed(0)
    return ReferenceModel(get_reference_spec("flux-shapes")).eval().requires_grad_(False)


def test_harness_reports_hookwise_and_diffusers_side_by_side(untrained, tmp_path):
    seen = []
    results = run_cache_bench(
        untrained, labels=[0, 1], steps=4, repeats=1, methods=["first-block", "pab"],
        progress=lambda done, total, what: seen.append((done, total)),
    )
    impls = {(r.method, r.impl) for r in results}
    assert {("first-block", "hookwise"), ("first-block", "diffusers"), ("pab", "hookwise"), ("pab", "diffusers")} <= impls
    assert [r.impl for r in results[:2]] == ["reference", "reference"]
    for r in results[2:]:
        assert 0 < r.block_frac <= 1 and 0 < r.attn_frac <= 1 and r.seconds > 0 and r.speedup > 0
        assert r.psnr > 0 and -1 <= r.ssim <= 1
    pab = [r for r in results if r.method == "pab"]
    assert all(r.block_frac == 1.0 for r in pab)  # PAB skips attention, never blocks
    assert seen[-1][0] == seen[-1][1]
    table = to_markdown(results)
    assert table.count("\n") == len(results) + 1
    rows = compare_at_equal_work(results)
    assert {r["method"] for r in rows} == {"first-block", "pab"}
    assert all(r["same_psnr"] is not None for r in rows)  # both ran the same settings
    assert all(r["delta"] is None or math.isfinite(r["delta"]) for r in rows)
    png = save_plot(results, str(tmp_path / "plot.png"), title="test")
    from PIL import Image

    assert Image.open(png).size[0] > 800


def test_equal_work_compares_the_best_setting_of_each_side_interpolating_diffusers():
    def run(impl, setting, frac, db):
        return RunResult("m", impl, setting, frac, frac, 1.0, 1.0, db, 0.9)

    results = [
        run("hookwise", "a", 0.5, 40.0), run("hookwise", "b", 0.5, 42.0), run("hookwise", "c", 0.9, 45.0),
        run("hookwise", "d", 0.2, 20.0),
        run("diffusers", "a", 0.4, 30.0), run("diffusers", "x", 0.6, 40.0), run("diffusers", "y", 0.6, 38.0),
    ]
    rows = {r["setting"]: r for r in compare_at_equal_work(results)}
    assert rows["a"]["same_psnr"] == 30.0 and rows["b"]["same_psnr"] is None
    assert rows["a"]["diffusers_psnr"] == pytest.approx(35.0)  # halfway between (0.4, 30) and diffusers' best at 0.6
    assert rows["a"]["delta"] == rows["b"]["delta"] == pytest.approx(42.0 - 35.0)  # hookwise's best at 0.5
    assert rows["c"]["delta"] is None and rows["d"]["delta"] is None  # outside diffusers' range: no guess
    assert rows["c"]["hookwise_best"] == 45.0 and rows["d"]["hookwise_best"] == 20.0


def test_at_equal_work_a_setting_doing_less_work_at_a_higher_psnr_answers_for_more_work():
    def run(impl, setting, frac, db):
        return RunResult("m", impl, setting, frac, frac, 1.0, 1.0, db, 0.9)

    results = [
        run("hookwise", "cheap", 0.80, 49.0), run("hookwise", "dear", 0.84, 47.8),
        run("diffusers", "cheap", 0.80, 46.9), run("diffusers", "dear", 0.84, 47.9),
    ]
    rows = {r["setting"]: r for r in compare_at_equal_work(results)}
    assert rows["dear"]["hookwise_best"] == 49.0 and rows["dear"]["diffusers_psnr"] == pytest.approx(47.9)
    assert rows["dear"]["delta"] == pytest.approx(1.1)
    assert rows["cheap"]["delta"] == pytest.approx(49.0 - 46.9)


def test_unknown_methods_are_refused_before_any_work(untrained):
    with pytest.raises(ConfigError, match="unknown method"):
        run_cache_bench(untrained, methods=["fbc"], steps=2)


def test_cli_bench_cache_writes_table_json_and_plot(tmp_path, capsys):
    out_json, out_png = tmp_path / "r.json", tmp_path / "r.png"
    code = main([
        "bench", "cache", "--model", "flux-shapes", "--methods", "first-block,teacache", "--steps", "4",
        "--repeats", "1", "--no-diffusers", "--prompts", "0,red square", "--json", str(out_json), "--plot", str(out_png),
    ])
    assert code == 0
    printed = capsys.readouterr().out
    assert "| first-block | hookwise |" in printed and "| teacache | hookwise |" in printed
    data = json.loads(out_json.read_text())
    assert {d["method"] for d in data} == {"none", "first-block", "teacache"}
    assert out_png.stat().st_size > 0
    assert main(["bench", "cache", "--model", "flux-shapes", "--prompts", "purple circle"]) == 2


def _same_runs(a, b):
    assert [(r.method, r.impl, r.setting, r.block_frac, r.attn_frac) for r in a] == [
        (r.method, r.impl, r.setting, r.block_frac, r.attn_frac) for r in b
    ]
    for x, y in zip(a, b):
        assert x.psnr == pytest.approx(y.psnr, rel=1e-3) or (math.isinf(x.psnr) and math.isinf(y.psnr))


def test_harness_device_option_moves_the_reference_and_keeps_the_results(untrained):
    kw = dict(labels=[0], steps=3, repeats=1, methods=["first-block"], compare_diffusers=False)
    here = run_cache_bench(untrained, **kw)
    moved = run_cache_bench(untrained, device="cpu", **kw)
    assert next(untrained.parameters()).device.type == "cpu"
    _same_runs(here, moved)


@pytest.mark.gpu
def test_harness_on_cuda_counts_the_same_evaluations_as_on_the_cpu():
    torch.manual_seed(0)
    reference = ReferenceModel(get_reference_spec("flux-shapes")).eval().requires_grad_(False)
    kw = dict(labels=[0], steps=3, repeats=1, methods=["first-block"], compare_diffusers=False)
    on_cpu = run_cache_bench(reference, **kw)
    on_cuda = run_cache_bench(reference, device="cuda", **kw)
    assert next(reference.parameters()).device.type == "cuda"
    assert [(r.method, r.impl, r.setting) for r in on_cpu] == [(r.method, r.impl, r.setting) for r in on_cuda]
    # Float differences between devices may flip a borderline reuse decision, not the amount of work.
    for a, b in zip(on_cpu, on_cuda):
        assert b.block_frac == pytest.approx(a.block_frac, abs=0.2) and b.seconds > 0 and b.psnr > 0


def test_forecast_rows_count_their_budget_and_calibrate_on_classes_not_evaluated(untrained, monkeypatch):
    import hookwise.bench.methods as methods

    monkeypatch.setattr(methods, "FORECAST_SEARCH_RUNS", 6)
    calibrated_on = []
    real = methods.calibrate_forecast

    def spy(model, run, **kw):
        calibrated_on.append(run())
        return real(model, run, **kw)

    monkeypatch.setattr(methods, "calibrate_forecast", spy)
    results = run_cache_bench(
        untrained, steps=8, repeats=1, methods=["forecast", "forecast-calibrated"], compare_diffusers=False,
        calibration_labels=[0, 4, 8],
    )
    rows = [r for r in results if r.impl == "hookwise"]
    assert {r.method for r in rows} == {"forecast", "forecast-calibrated"}
    for r in rows:
        budget = r.config[0]["budget"] or len(r.config[0]["schedule"])
        assert r.block_frac == pytest.approx(budget / 8)
    calibrated = [r for r in rows if r.method == "forecast-calibrated"]
    assert all(r.config[0]["schedule"][0] == 0 and len(r.config[0]["coefficients"] or [0] * 8) == 8 for r in calibrated)
    assert calibrated_on and calibrated_on[0].shape[0] == 3  # the three calibration classes, not the six evaluated
    with pytest.raises(ConfigError, match="overlap"):
        run_cache_bench(untrained, labels=[0, 1], steps=2, methods=["forecast"], calibration_labels=[1])


def test_best_at_work_takes_each_sides_best_setting_doing_at_most_that_work():
    def run(method, impl, frac, p):
        return RunResult(method, impl, "s", frac, 1.0, 1.0, 1.0, p, 0.9)

    results = [run("none", "reference", 1.0, math.inf), run("a", "hookwise", 0.25, 36.0), run("a", "hookwise", 0.2, 38.0),
               run("a", "hookwise", 0.5, 45.0), run("b", "diffusers", 0.3, 30.0)]
    rows = {(r["method"], r["impl"]): r["best"] for r in best_at_work(results, (0.2, 0.25, 0.34, 0.5))}
    assert rows[("a", "hookwise")] == {0.2: 38.0, 0.25: 38.0, 0.34: 38.0, 0.5: 45.0}
    assert rows[("b", "diffusers")] == {0.2: None, 0.25: None, 0.34: 30.0, 0.5: 30.0}
    assert ("none", "reference") not in rows
    assert best_at_work_markdown(best_at_work(results)).count("\n") == 3
