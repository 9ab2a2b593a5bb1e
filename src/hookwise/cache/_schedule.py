"""Schedules of computed steps, forecast weights, and their calibration (machinery of `forecast.py`).

- `front_loaded(n, budget, power)`: `budget` steps of `n`, step 0 first, spaced as `(i / (budget-1)) ** power`
  so that they are dense early and sparse late.
- `lagrange_weights(nodes, x)`: the weights of the values at `nodes` in the interpolating polynomial at `x`.
- `calibrate_schedule`: one recording run (nothing skipped) keeps every step's block-stack residual and
  the uncached samples; from the residuals' Gram matrix it fits, for any schedule, the least-squares
  weights of each skipped step's residual on the last computed ones (ridge-pulled to Lagrange's), in
  milliseconds. For a budget it then searches the schedule: the front-loaded rule at a few powers, then
  moves of one computed step at a time to a neighbouring step, kept when the PSNR of the calibration
  run's samples against the uncached ones rises (the harness's own objective, on real runs).
"""

from __future__ import annotations

import logging
import math
from typing import Any, Callable

import torch
from torch import nn

from ..core.techniques import apply_techniques, remove_techniques
from ..errors import ConfigError
from ._blocks import AlwaysCompute, Predictor, Residuals, SpanController, calibration_run

logger = logging.getLogger("hookwise.cache")

RIDGE = 1e-3  # pull of the fitted weights towards Lagrange's, relative to the residuals' mean energy
POWERS = (1.0, 1.5, 2.0, 2.5, 3.0)  # starting points of the search


def psnr(x: torch.Tensor, reference: torch.Tensor) -> float:
    """PSNR in dB of `x` against `reference` for data in [0, 1], in float (inf when identical)."""
    mse = float(torch.mean((x.double() - reference.double()) ** 2))
    return math.inf if mse == 0.0 else -10.0 * math.log10(mse)


def front_loaded(num_steps: int, budget: int, power: float) -> tuple[int, ...]:
    """`budget` distinct steps of `num_steps`, step 0 first, spaced by `(i / (budget - 1)) ** power`."""
    if budget >= num_steps:
        return tuple(range(num_steps))
    if budget <= 1:
        return (0,)
    out: list[int] = []
    for i in range(budget):
        s = round((i / (budget - 1)) ** power * (num_steps - 1))
        s = max(s, out[-1] + 1 if out else 0)
        s = min(s, num_steps - (budget - i))  # leave room for the steps still to place
        out.append(s)
    return tuple(out)


def lagrange_weights(nodes: list[int], x: float) -> list[float]:
    """Weights `w` with `p(x) = sum w_j y_j` for the polynomial through `(nodes[j], y_j)`."""
    out = []
    for j, xj in enumerate(nodes):
        w = 1.0
        for m, xm in enumerate(nodes):
            if m != j:
                w *= (x - xm) / (xj - xm)
        out.append(w)
    return out


def hermite_weights(nodes: list[int], x: float) -> list[float]:
    """Weights of the values at the last three `nodes` in the cubic Hermite extrapolation at `x`: the cubic
    through the last two nodes whose slope at each is the finite difference ending there. Exact on lines;
    with fewer than three nodes, Lagrange's weights."""
    if len(nodes) < 3:
        return lagrange_weights(nodes, x)
    a, b, c = nodes[-3:]
    h = c - b
    t = (x - b) / h
    h00, h10, h01, h11 = 2 * t**3 - 3 * t**2 + 1, t**3 - 2 * t**2 + t, -2 * t**3 + 3 * t**2, t**3 - t**2
    # p = h00 y_b + h01 y_c + h10 h m_b + h11 h m_c with m_b = (y_b - y_a) / (b - a), m_c = (y_c - y_b) / h
    k = h10 * h / (b - a)
    wa, wb, wc = -k, h00 + k - h11, h01 + h11
    return [0.0] * (len(nodes) - 3) + [wa, wb, wc]


def blended(weights: list[float], blend: float) -> list[float]:
    """`(1 - blend)` times the forecast's weights plus `blend` times the last computed residual (the corrector)."""
    if not blend:
        return list(weights)
    out = [(1.0 - blend) * w for w in weights]
    out[-1] += blend
    return out


def fit_blend(gram: torch.Tensor, schedule: tuple[int, ...], weights: Callable[[list[int], int], list[float]], keep: int) -> float:
    """The blend in [0, 1] of the forecast with the last computed residual that minimises the squared error of
    every skipped step's residual on the recording run (closed form from the Gram matrix)."""
    computed = set(schedule)
    num = den = 0.0
    for s in range(gram.shape[0]):
        nodes = [c for c in schedule if c < s][-keep:]
        if s in computed or len(nodes) < 2:
            continue
        w = torch.tensor(weights(nodes, s), dtype=gram.dtype)
        d = w.clone()
        d[-1] -= 1.0  # forecast - last residual
        g = gram[nodes][:, nodes]
        num -= float(gram[s, nodes] @ d - w @ g @ d)  # the error with blend b is (R_s - F_s) + b D: b = -<R_s - F_s, D> / |D|^2
        den += float(d @ g @ d)
    return 0.0 if den <= 0 else round(min(max(num / den, 0.0), 1.0), 6)


def history(schedule: tuple[int, ...], step: int, order: int) -> list[int]:
    """The last `order + 1` computed steps before `step`."""
    return [s for s in schedule if s < step][-(order + 1) :]


def fit_weights(gram: torch.Tensor, schedule: tuple[int, ...], order: int, ridge: float = RIDGE) -> tuple[tuple[float, ...], ...]:
    """Per step of `schedule`'s run, the least-squares weights of its residual on the last computed ones.

    `gram[a, b]` is the sum over samples, branches and streams of `<R_a, R_b>`; computed steps (and steps
    before two computed ones exist) get an empty row (Lagrange's weights, or a reuse, apply there).
    """
    n = gram.shape[0]
    computed = set(schedule)
    rows: list[tuple[float, ...]] = []
    for s in range(n):
        nodes = history(schedule, s, order)
        if s in computed or len(nodes) < 2:
            rows.append(())
            continue
        g = gram[nodes][:, nodes]
        rhs = gram[nodes, s]
        w0 = torch.tensor(lagrange_weights(nodes, s), dtype=gram.dtype)
        lam = ridge * float(torch.diagonal(g).mean())
        w = torch.linalg.solve(g + lam * torch.eye(len(nodes), dtype=gram.dtype), rhs + lam * w0)
        rows.append(tuple(round(float(v), 6) for v in w))
    return tuple(rows)


class _Recorder(Predictor):
    """Keeps every computed residual (nothing is skipped) for the Gram matrix."""

    def __init__(self) -> None:
        self.ctrl: SpanController | None = None
        self.residuals: dict[tuple[Any, int, int], dict[int, torch.Tensor]] = {}

    def update(self, memory: Residuals, seg: int, residual: list[torch.Tensor | None], step: int) -> None:
        for k, r in enumerate(residual):
            if r is not None:
                self.residuals.setdefault((self.ctrl.call.branch, seg, k), {})[step] = r.detach().flatten().float()
        super().update(memory, seg, residual, step)

    def gram(self) -> torch.Tensor:
        n = max((max(d) for d in self.residuals.values()), default=-1) + 1
        gram = torch.zeros(n, n, dtype=torch.float64)
        for by_step in self.residuals.values():
            steps = sorted(by_step)
            stacked = torch.stack([by_step[s] for s in steps]).double()
            part = (stacked @ stacked.T).cpu()
            idx = torch.tensor(steps)
            gram[idx[:, None], idx[None, :]] += part
        return gram


def calibrate_schedule(
    technique: str,
    model: nn.Module,
    run: Callable[[], Any],
    config_cls: type,
    *,
    num_steps: int,
    budget: int | None,
    schedule: tuple[int, ...] | None,
    order: int,
    fit: bool,
    search: bool,
    max_runs: int,
    extra: dict[str, Any] | None = None,
    blend_weights: Callable[[list[int], int], list[float]] | None = None,
    keep: int = 2,
) -> Any:
    """Record, fit and (for a budget) search a schedule; returns `config_cls(num_steps, schedule, order, coefficients,
    **extra)`; with `blend_weights` (the unfitted weights), also the corrector's `blend` fitted for the schedule."""
    if (budget is None) == (schedule is None):
        raise ConfigError(f"calibrate_{technique}: give a `budget` of computed steps or a `schedule`, one of them")
    recorder = _Recorder()
    box: dict[str, Any] = {}
    calibration_run(f"calibrate_{technique}", model, lambda: box.__setitem__("out", run()), AlwaysCompute(), recorder)
    reference = box.get("out")
    if not isinstance(reference, torch.Tensor):
        raise ConfigError(
            f"calibrate_{technique}: `run()` must return the samples it made (a tensor), got {type(reference).__name__}"
        )
    gram = recorder.gram()
    recorder.residuals.clear()
    if gram.shape[0] != num_steps:
        raise ConfigError(
            f"calibrate_{technique}: the calibration run made {gram.shape[0]} steps, not num_steps={num_steps}; "
            "pass a function that samples one whole run with that many steps"
        )

    def make(steps: tuple[int, ...], fitted: bool = fit) -> Any:
        coefs = fit_weights(gram, steps, order) if fitted else None
        more = dict(extra or {})
        if blend_weights is not None and not fitted:
            more["blend"] = fit_blend(gram, steps, blend_weights, keep)
        return config_cls(num_steps=num_steps, schedule=steps, order=order, coefficients=coefs, **more)

    if schedule is not None or not search:
        steps = tuple(schedule) if schedule is not None else front_loaded(num_steps, budget, 1.0)
        return make(steps)

    scores: dict[tuple[tuple[int, ...], bool], float] = {}

    def score(steps: tuple[int, ...], fitted: bool = fit) -> float:
        key = (steps, fitted)
        if key not in scores:
            apply_techniques(model, [make(steps, fitted)])
            try:
                with torch.no_grad():
                    out = run()
            finally:
                remove_techniques(model, [technique])
            value = psnr(out, reference)
            scores[key] = value if math.isfinite(value) else 1e9
            logger.debug("calibrate_%s: %s fitted=%s -> %.2f dB", technique, steps, fitted, scores[key])
        return scores[key]

    best = max(sorted({front_loaded(num_steps, budget, p) for p in POWERS}), key=score)
    improved = True
    while improved and len(scores) < max_runs:
        improved = False
        for i in range(1, len(best)):
            for delta in (-1, 1, -2, 2):
                cand = list(best)
                cand[i] += delta
                hi = cand[i + 1] if i + 1 < len(cand) else num_steps
                if not cand[i - 1] < cand[i] < hi or (tuple(cand), fit) in scores:
                    continue
                if len(scores) >= max_runs:
                    break
                if score(tuple(cand)) > score(best):
                    best, improved = tuple(cand), True
                    break
    # The fit is made on the uncached trajectory; where Lagrange's weights do better on the cached one, keep them.
    fitted = fit and score(best, True) >= score(best, False)
    logger.info(
        "calibrate_%s: schedule %s, %s weights (%.2f dB on the calibration run, %d runs)",
        technique, best, "fitted" if fitted else "Lagrange", scores[(best, fitted)], len(scores),
    )
    return make(best, fitted)
