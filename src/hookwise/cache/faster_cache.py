"""FasterCache: attention reuse by extrapolation, plus reuse of the unconditional CFG branch.

1. Spatial (self / joint) and temporal attention compute once in `attention_range` steps inside
   `attention_window`; in between their output is extrapolated from the last two computed ones:
   `o1 + (o1 - o2) * attention_weight`.
2. The unconditional prediction is computed once in `uncond_range` steps inside `uncond_window`;
   in between it is the conditional prediction of the same step plus the last measured difference
   `uncond - cond`, split into low and high spatial frequencies and scaled by `alpha_low` /
   `alpha_high` inside their windows. The whole unconditional call is skipped.

CFG as two calls: the branches named `cond_branch` / `uncond_branch` (`hookwise.branch`), the
conditional call first in each step. Batched CFG (one call on [uncond, cond], as diffusers'
pipelines batch it) is detected at the first step of a run: the latents' halves are equal and
the conditioning differs; skipped steps then run the conditional half only.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from ..core.config import TechniqueConfig, check_fraction, check_int, check_range
from ..core.cost import cached_cost
from ..core.hooks import HookRegistry, Layer, unwrap
from ..core.outputs import sample_of
from ..core.state import auto_branch
from ..core.techniques import apply_techniques, register_technique, remove_techniques
from ..errors import ConfigError
from ..introspect.model_map import describe
from ._reuse import IntervalRule, ModuleBranch, attach_module_hooks, attention_kind, computes_at, detach_module_hooks, in_window
from ._state import CacheHook, hook_name, host_values, logger, resolved_step, run_state, step_timestep_1000
from ._streams import map_output

NAME = "faster_cache"


@dataclass(frozen=True)
class FasterCache(TechniqueConfig):
    """FasterCache: extrapolated attention reuse and unconditional-branch reuse for CFG.

    - `attention_range` / `attention_window` / `attention_weight`: spatial and temporal attention
      compute once in this many steps inside the window (0..1000 timesteps); None: no attention reuse.
    - `uncond_range` / `uncond_window`: the unconditional branch is computed once in this many
      steps inside the window; None: no CFG reuse.
    - `alpha_low` / `alpha_high` with `low_window` / `high_window`: scale of the low / high
      frequency part of the reused uncond - cond difference inside those windows.
    - `cond_branch` / `uncond_branch`: branch names of CFG as two calls.
    - `timestep_scale`: model timestep -> 0..1000 (None: guessed from the run's first timestep).
    """

    attention_range: int | None = 2
    attention_window: tuple[float, float] | None = (-1.0, 681.0)
    attention_weight: float = 0.5
    uncond_range: int | None = 5
    uncond_window: tuple[float, float] | None = (-1.0, 641.0)
    alpha_low: float = 1.1
    alpha_high: float = 1.1
    low_window: tuple[float, float] | None = (99.0, 901.0)
    high_window: tuple[float, float] | None = (-1.0, 301.0)
    low_radius: float = 0.2
    cond_branch: str = "cond"
    uncond_branch: str = "uncond"
    timestep_scale: float | None = None

    def validate(self) -> None:
        check_int("FasterCache.attention_range", self.attention_range, 1, optional=True)
        check_int("FasterCache.uncond_range", self.uncond_range, 1, optional=True)
        if self.attention_range is None and self.uncond_range is None:
            raise ConfigError("FasterCache: attention_range and uncond_range are both None, so nothing would be reused")
        for name in ("attention_window", "uncond_window", "low_window", "high_window"):
            check_range(f"FasterCache.{name}", getattr(self, name))
        for name in ("attention_weight", "alpha_low", "alpha_high"):
            check_fraction(f"FasterCache.{name}", getattr(self, name))
        if not 0 < self.low_radius <= 0.5:
            raise ConfigError(f"FasterCache.low_radius is a frequency in cycles per sample in (0, 0.5], got {self.low_radius!r}")
        for name in ("cond_branch", "uncond_branch"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ConfigError(f"FasterCache.{name} must be a branch name, got {getattr(self, name)!r}")
        if self.cond_branch == self.uncond_branch:
            raise ConfigError("FasterCache.cond_branch and uncond_branch must differ")
        if self.timestep_scale is not None and not self.timestep_scale > 0:
            raise ConfigError(f"FasterCache.timestep_scale must be > 0 or None, got {self.timestep_scale!r}")


class ExtrapolateRule(IntervalRule):
    """PAB's schedule; in between, the output extrapolated from the last two computed ones."""

    keep = 2

    def __init__(self, interval: int, window: tuple[float, float] | None, weight: float) -> None:
        super().__init__(interval, window)
        self.weight = weight

    def answer(self, st: ModuleBranch, step: int, t1000: float | None) -> Any:
        w = self.weight
        return map_output(lambda o2, o1: o1 + (o1 - o2) * w, st.outputs[0], st.outputs[1])


# ---- frequency bands ------------------------------------------------------------------------------
def _spectrum(x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...], Callable[[torch.Tensor], torch.Tensor]]:
    """FFT of `x` over its spatial axes; returns (spectrum, spectrum axes, inverse).

    (B, C, F, H, W) and (B, C, H, W): the last two axes. (B, N, C) token sequences: a square grid
    of tokens when N is a square, else the token axis.
    """
    x = x.float()
    if x.ndim >= 4:
        dims = (-2, -1)
        return torch.fft.fft2(x, dim=dims), dims, lambda s: torch.fft.ifft2(s, dim=dims).real
    if x.ndim == 3:
        side = math.isqrt(x.shape[1])
        if side * side == x.shape[1] and side > 1:
            shape = x.shape
            grid = x.view(shape[0], side, side, shape[2])
            return (
                torch.fft.fft2(grid, dim=(1, 2)),
                (1, 2),
                lambda s: torch.fft.ifft2(s, dim=(1, 2)).real.reshape(shape),
            )
        return torch.fft.fft(x, dim=1), (1,), lambda s: torch.fft.ifft(s, dim=1).real
    return torch.fft.fft(x, dim=-1), (-1,), lambda s: torch.fft.ifft(s, dim=-1).real


def _low_mask(spec: torch.Tensor, dims: tuple[int, ...], radius: float) -> torch.Tensor:
    freqs = [torch.fft.fftfreq(spec.shape[d], device=spec.device) for d in dims]
    grids = torch.meshgrid(*freqs, indexing="ij") if len(freqs) > 1 else (freqs[0],)
    r2 = sum(g**2 for g in grids)
    mask = r2 <= radius**2
    shape = [1] * spec.ndim
    for d, n in zip(dims, mask.shape):
        shape[d] = n
    return mask.reshape(shape)


def _with_sample(output: Any, sample: torch.Tensor) -> Any:
    if isinstance(output, torch.Tensor):
        return sample
    if isinstance(output, (tuple, list)):
        return type(output)([sample, *output[1:]])
    if dataclasses.is_dataclass(output):
        return dataclasses.replace(output, sample=sample)
    raise ConfigError(f"FasterCache cannot rebuild a {type(output).__name__} output")


class CfgReuseHook(CacheHook):
    """On the model root: answers unconditional predictions from the conditional one on cached steps."""

    layer = Layer.CACHE

    def __init__(self, model: nn.Module, config: FasterCache) -> None:
        self.state = run_state(model)
        self.config = config
        self.skipped = 0
        self._told_unnamed = False
        self.reset()

    def reset(self) -> None:
        self.cond: tuple[int, torch.Tensor] | None = None
        self.delta: torch.Tensor | None = None
        self.first_t: float | None = None
        self.batched: bool | None = None
        self._uncond_with: torch.Tensor | None = None
        self._template: Any = None  # an unconditional output, rebuilt around approximated samples
        self._step = 0
        self._t: float | None = None

    def stats(self) -> dict[str, Any]:
        return {"batched": self.batched, "uncond_skipped": self.skipped}

    # ---- timestep -----------------------------------------------------------------------------
    def _t1000(self, step: int) -> float | None:
        self.first_t, t1000 = step_timestep_1000(self.state, self.config.timestep_scale, self.first_t, step)
        return t1000

    def _skip(self, step: int, t1000: float | None) -> bool:
        cfg = self.config
        return self.delta is not None and not computes_at(step, t1000, cfg.uncond_range, cfg.uncond_window)

    # ---- the difference uncond - cond, by frequency band ------------------------------------------
    def _measure(self, uncond: torch.Tensor, cond: torch.Tensor) -> None:
        su, _, _ = _spectrum(uncond.detach())
        sc, _, _ = _spectrum(cond.detach())
        self.delta = su - sc

    def _approximate(self, cond: torch.Tensor, t1000: float | None) -> torch.Tensor:
        cfg = self.config
        spec, dims, inverse = _spectrum(cond)
        delta = self.delta
        a_low = cfg.alpha_low if in_window(t1000, cfg.low_window) else 1.0
        a_high = cfg.alpha_high if in_window(t1000, cfg.high_window) else 1.0
        if a_low != 1.0 or a_high != 1.0:
            low = _low_mask(spec, dims, cfg.low_radius)
            delta = torch.where(low, delta * a_low, delta * a_high)
        return inverse(spec + delta).to(cond.dtype)

    # ---- batched CFG ----------------------------------------------------------------------------
    def _detect_batched(self, args: tuple, kwargs: dict) -> bool:
        probe = self.state.cfg_halves_equal()
        if probe is None:
            host_values(self.state)
            return False
        batch = self.state.latents.shape[0]
        half = batch // 2
        others = [
            v
            for v in (*args, *kwargs.values())
            if isinstance(v, torch.Tensor) and v is not self.state.latents and v.ndim >= 1 and v.shape[0] == batch
            and v.is_floating_point()
        ]
        differs = [~torch.eq(v[:half], v[half:]).all() for v in others]
        conditioned = torch.stack(differs).any() if differs else torch.zeros((), dtype=torch.bool, device=probe.device)
        equal, cond = host_values(self.state, probe, conditioned.to(probe.device))
        return bool(equal) and bool(cond)

    @staticmethod
    def _cond_half(args: tuple, kwargs: dict, batch: int) -> tuple[tuple, dict]:
        half = batch // 2

        def cut(v: Any) -> Any:
            return v[half:] if isinstance(v, torch.Tensor) and v.ndim >= 1 and v.shape[0] == batch else v

        return tuple(cut(a) for a in args), {k: cut(v) for k, v in kwargs.items()}

    # The root model is rarely compiled as a whole with caches; the same split keeps it safe if it is.
    @torch.compiler.disable(recursive=False)
    def new_forward(self, module: nn.Module, next_fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        plan = self.before(args, kwargs)
        if plan[0] == "answer":
            return plan[1]
        out = next_fn(*plan[1], **plan[2])
        return self.after(plan[0], out)

    @torch.compiler.disable
    def before(self, args: tuple, kwargs: dict) -> tuple:
        state = self.state
        cfg = self.config
        if state.mode == "train" or cfg.uncond_range is None:
            return ("plain", args, kwargs)
        branch = state.branch
        if branch == cfg.cond_branch:
            self._step = resolved_step(state)
            return ("cond", args, kwargs)
        if branch == cfg.uncond_branch:
            step = resolved_step(state)
            t1000 = self._t1000(step)
            cond = self.cond[1] if self.cond is not None and self.cond[0] == step else None
            if cond is not None and self._skip(step, t1000):
                self.skipped += 1
                return ("answer", self._rebuild(self._approximate(cond, t1000)))
            self._uncond_with = cond
            return ("uncond", args, kwargs)
        if branch == auto_branch(1) and not self._told_unnamed:
            # Which of two unnamed calls is the unconditional one is the caller's convention: say how
            # to name it rather than guess (a wrong guess would extrapolate the wrong branch).
            self._told_unnamed = True
            warnings.warn(
                "hookwise FasterCache: the model is called twice per step with no CFG branch names, so the "
                "unconditional call is not reused (attention reuse still works). Name the branches with "
                "hookwise.branch(model, 'cond' / 'uncond'), or, if the first call of each step is the "
                "conditional one, pass FasterCache(cond_branch=auto_branch(0), uncond_branch=auto_branch(1)) "
                "with auto_branch from hookwise.core.state",
                stacklevel=2,
            )
        if self.batched is None:
            batched = self._detect_batched(args, kwargs)  # one read, at the first call of a run
            self.batched = batched  # set after the read: it may have started a new run
            if batched:
                logger.debug("faster_cache: batched CFG detected (uncond half first)")
        if not self.batched:
            return ("plain", args, kwargs)
        step = resolved_step(state)
        self._t = self._t1000(step)
        if self._skip(step, self._t):
            self.skipped += 1
            a, k = self._cond_half(args, kwargs, state.latents.shape[0])
            return ("batched-skip", a, k)
        return ("batched", args, kwargs)

    @torch.compiler.disable
    def after(self, mode: str, out: Any) -> Any:
        if mode == "cond":
            self.cond = (self._step, sample_of(out, "FasterCache").detach())
        elif mode == "uncond":
            if self._uncond_with is not None:
                self._measure(sample_of(out, "FasterCache"), self._uncond_with)
                self._template = out
            self._uncond_with = None
        elif mode == "batched-skip":
            cond = sample_of(out, "FasterCache")
            return _with_sample(out, torch.cat([self._approximate(cond, self._t), cond]))
        elif mode == "batched":
            uncond, cond = sample_of(out, "FasterCache").chunk(2)
            self._measure(uncond, cond)
        return out

    def _rebuild(self, sample: torch.Tensor) -> Any:
        return sample if self._template is None else _with_sample(self._template, sample)


def _apply_faster_cache(model: nn.Module, config: FasterCache | None = None) -> None:
    """Hook the spatial / temporal attention modules of `model` and its root (for CFG reuse)."""
    config = config or FasterCache()
    model = unwrap(model)
    if config.attention_range is not None:
        model_map = describe(model)
        targets = [
            (r.path, model.get_submodule(r.path), ExtrapolateRule(config.attention_range, config.attention_window, config.attention_weight))
            for r in model_map.attention
            if attention_kind(r.kind) in ("spatial", "temporal")
        ]
        kinds = sorted({r.kind for r in model_map.attention})
        attach_module_hooks(
            NAME,
            model,
            targets,
            config.timestep_scale,
            needs_timestep=config.attention_window is not None,
            what=f"no self, joint or temporal attention module found (attention kinds: {kinds or 'none'}); "
            f"set attention_range=None to use the CFG reuse alone",
        )
    if config.uncond_range is not None:
        HookRegistry.get_or_create(model).add(hook_name(NAME), CfgReuseHook(model, config))


def _remove_faster_cache(model: nn.Module, config: FasterCache | None = None) -> None:
    detach_module_hooks(NAME, model)


def apply_faster_cache(model: nn.Module, config: FasterCache | None = None) -> None:
    """Hook the spatial / temporal attention modules of `model` and its root (for CFG reuse).

    The same as `hookwise.apply(model, config)`.
    """
    apply_techniques(model, [config or FasterCache()])


def remove_faster_cache(model: nn.Module) -> None:
    """Remove FasterCache from `model` (the same as `hookwise.remove(model, "faster_cache")`)."""
    remove_techniques(model, [NAME])


register_technique(
    NAME, FasterCache, apply=_apply_faster_cache, remove=_remove_faster_cache, layer=Layer.CACHE, conflicts=("pab",),
    cost=cached_cost("fastercache", FasterCache, needs_cfg="batched"),
)
