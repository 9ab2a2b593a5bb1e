"""Forecast configs found for the reference models and shipped with them.

`benchmarks/cache_quality.py` calibrates `Forecast` (`calibrate_forecast`: weights fitted, schedule
searched on the PSNR of calibration runs) on classes it does not evaluate (flux-shapes 0, 4, 8;
wan-moving 0, 4), at 28 and 50 steps and budgets of `steps // 6`, `// 4`, `// 3` and `// 2` computed steps.
The configs it found are stored in `weights/<model>/forecast.json` as
`{"<steps>": {"<budget>": <config dict>}}` (written by `benchmarks/cache_quality.py --ship`). On the
evaluated classes the evenly spaced rule (`Forecast(num_steps, budget)`) scores as well or better at
most of these points (BENCHMARKS.md): the search's objective is the calibration classes' PSNR.
"""

from __future__ import annotations

import json

from ..cache import Forecast
from ..errors import ConfigError
from .reference import WEIGHTS_DIR, get_reference_spec

FILE = "forecast.json"


def shipped_forecasts(name: str) -> dict[int, dict[int, Forecast]]:
    """Every shipped forecast config of reference model `name`: steps -> budget -> config."""
    get_reference_spec(name)
    path = WEIGHTS_DIR / name / FILE
    if not path.is_file():
        raise ConfigError(f"no forecast schedules are shipped for {name!r} (missing {path})")
    data = json.loads(path.read_text())
    return {int(s): {int(b): Forecast.from_dict(c) for b, c in by.items()} for s, by in data.items()}


def shipped_forecast(name: str, steps: int | None = None, budget: int | None = None) -> Forecast:
    """The shipped forecast config of `name` for `steps` (default: the model's) and `budget` computed
    steps (default: `steps // 4`, four times fewer block evaluations)."""
    steps = steps or get_reference_spec(name).steps
    found = shipped_forecasts(name)
    if steps not in found:
        raise ConfigError(f"{name}: forecast schedules are shipped for {sorted(found)} steps, not {steps}")
    budget = budget or steps // 4
    if budget not in found[steps]:
        raise ConfigError(f"{name} at {steps} steps: shipped budgets are {sorted(found[steps])}, not {budget}")
    return found[steps][budget]
