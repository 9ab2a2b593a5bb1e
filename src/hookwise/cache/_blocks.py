"""The block-span engine behind every block-level step cache (first-block, dual-block, TaylorSeer,
MagCache, TeaCache).

The main towers' blocks, in call order, are split into a *head* (the first `front` blocks, always
computed), a *middle* (skipped on cached steps) and a *tail* (the last `back` blocks, always
computed). A `Policy` decides once per call whether the middle runs: after the head (from the
head's residual: first-block / dual-block caches) or before the first block (from the step or the
first block's input: TaylorSeer, MagCache, TeaCache). A `Predictor` supplies what the middle would
have added: its last residual (reuse) or a Taylor extrapolation of its residuals over steps.

The middle is cut into *segments*, one per tower, because code between towers (a concatenation of
text and image tokens, say) may change the streams' shapes. On a computed step each segment stores
`output - input` per stream; on a cached step its blocks return their inputs unchanged (in each
block's own output structure) and its last block adds the predicted residual. The middle therefore
costs one addition per stream and segment instead of its blocks.

Hook code runs eagerly: the hook's `new_forward` is skipped by dynamo (`recursive=False`) and its
logic sits in `torch.compiler.disable`d methods, while the block's own forward, called from it,
is still compiled when the block is. Blocks compiled one by one ("regional compilation") keep
their graphs: no guard on the cache's state, no recompile from step to step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from ..core.hooks import remove_hook, unwrap
from ..core.state import RUN_STATE_HOOK, RunState, get_run_state
from ..errors import CompatibilityError, ConfigError, NoTargetError
from ..introspect.model_map import ModelMap, describe
from ._state import (
    BranchStore,
    CacheHook,
    add_cache_hook,
    find_hooks,
    host_values,
    logger,
    remove_cache_hooks,
    resolved_step,
    run_state,
)
from ._streams import StreamMap, identity_output, infer_stream_map, input_of, rel_l1, tensor_inputs

# The block caches: each one drives a span controller, so at most one of them per model.
BLOCK_CACHES = ("first_block_cache", "dual_block_cache", "magcache", "teacache", "forecast")

RUN = object()  # `before()` says: run the block


# ---- targets --------------------------------------------------------------------------------------
def main_blocks(model: nn.Module, technique: str) -> tuple[ModelMap, list[tuple[str, nn.Module]]]:
    """The main towers' blocks of `model` in call order, from the model map. Raises when there are none."""
    model = unwrap(model)
    model_map = describe(model)
    blocks = [(b.path, model.get_submodule(b.path)) for t in model_map.main_towers for b in t.blocks]
    if not blocks:
        raise NoTargetError(
            f"{technique}: {type(model).__name__} has no tower of repeated blocks "
            f"({'; '.join(model_map.notes) or 'nothing found'}), so a block cache has nothing to skip; "
            f"check `hookwise.describe(model)` or use an attention-level cache"
        )
    return model_map, blocks


def tower_of(model_map: ModelMap) -> dict[str, str]:
    """Block path -> name of its tower."""
    return {b.path: t.name for t in model_map.main_towers for b in t.blocks}


# ---- per-branch state -----------------------------------------------------------------------------
@dataclass
class SpanBranch:
    """What a span cache remembers on one CFG branch during one sampling run."""

    policy: Any  # the policy's own state (`Policy.new_policy_state()`)
    predictor: Any  # the predictor's own state (`Predictor.new_predictor_state()`)
    head_prev: list[torch.Tensor] | None = None  # head residual at the last computed step
    head_shapes: tuple | None = None  # shapes of the head inputs at the last computed step
    consecutive: int = 0  # cached steps in a row
    computed: int = 0
    cached: int = 0
    extra: dict[int, list[Any]] = field(default_factory=dict)  # non-stream outputs of computed blocks


@dataclass
class Call:
    """Scratch of the current forward: decided once, then read by every middle block."""

    branch: str
    compute: bool = True
    decided: bool = False
    head_in: list[torch.Tensor] | None = None
    seg_in: dict[int, list[torch.Tensor | None]] = field(default_factory=dict)
    bypass: bool = False


# ---- predictors -----------------------------------------------------------------------------------
@dataclass
class Residuals:
    """The reuse predictor's state: each segment's residual at its last computed step."""

    by_segment: dict[int, list[torch.Tensor | None]] = field(default_factory=dict)


@dataclass
class TaylorFactors:
    """The Taylor predictor's state, per segment: the expansion terms of each stream and their step."""

    by_segment: dict[int, list[list[torch.Tensor] | None]] = field(default_factory=dict)
    step: dict[int, int] = field(default_factory=dict)


class Predictor:
    """Supplies a skipped segment's residual. `order` 0 reuses the last computed residual."""

    name = "reuse"

    def new_predictor_state(self) -> Any:
        """A fresh state for one branch (at each run, and when the inputs change shape)."""
        return Residuals()

    def update(self, memory: Residuals, seg: int, residual: list[torch.Tensor | None], step: int) -> None:
        memory.by_segment[seg] = residual

    def ready(self, memory: Residuals, segments: int) -> bool:
        return len(memory.by_segment) == segments

    def predict(self, memory: Residuals, seg: int, step: int) -> list[torch.Tensor | None]:
        return memory.by_segment[seg]


class TaylorPredictor(Predictor):
    """Taylor expansion of each segment's residual in the step index (TaylorSeer), from divided
    differences of the residuals of the last computed steps."""

    name = "taylor"

    def __init__(self, order: int) -> None:
        self.order = order

    def new_predictor_state(self) -> TaylorFactors:
        return TaylorFactors()

    def update(self, memory: TaylorFactors, seg: int, residual: list[torch.Tensor | None], step: int) -> None:
        prev = memory.by_segment.get(seg)
        last = memory.step.get(seg)
        new: list[list[torch.Tensor] | None] = []
        for k, r in enumerate(residual):
            if r is None:
                new.append(None)
                continue
            terms = [r]
            old = prev[k] if prev is not None else None
            if old is not None and last is not None and step > last and old[0].shape == r.shape:
                delta = step - last
                for j in range(min(self.order, len(old))):
                    terms.append((terms[j] - old[j]) / delta)
            new.append(terms)
        memory.by_segment[seg] = new
        memory.step[seg] = step

    def ready(self, memory: TaylorFactors, segments: int) -> bool:
        return len(memory.by_segment) == segments

    def predict(self, memory: TaylorFactors, seg: int, step: int) -> list[torch.Tensor | None]:
        d = step - memory.step[seg]
        out: list[torch.Tensor | None] = []
        for terms in memory.by_segment[seg]:
            if terms is None:
                out.append(None)
                continue
            value = terms[0]
            for j in range(1, len(terms)):
                value = value + terms[j] * (d**j / math.factorial(j))
            out.append(value)
        return out


# ---- policies -------------------------------------------------------------------------------------
class Policy:
    """Decides whether the middle runs. `front` > 0: `after_head`; `front` == 0: `before_first`.

    The base policy never skips; it still resolves a pending timestep, so the run state advances
    exactly as under a skipping policy. Subclasses override the decision point they use.
    """

    def new_policy_state(self) -> Any:
        """A fresh state for one branch (at each run, and when the inputs change shape); None: stateless."""
        return None

    def after_head(self, ctrl: SpanController, call: Call, residual: list[torch.Tensor]) -> bool:
        """Decide after the head blocks ran, from the head's residual."""
        host_values(ctrl.state)
        return True

    def before_first(self, ctrl: SpanController, call: Call, args: tuple, kwargs: dict) -> bool:
        """Decide before the first block runs, from the step or from the first block's inputs."""
        resolved_step(ctrl.state)
        return True

    def decided(self, ctrl: SpanController, call: Call, compute: bool, residual: list[torch.Tensor]) -> None:
        """Told the final decision after the head (a skip the predictor was not ready for becomes a compute)."""


class AlwaysCompute(Policy):
    """Never skips (calibration runs): the base policy, by name."""


@dataclass
class ResidualDiffState:
    """`ResidualDiffPolicy`'s state: the last change it compared with its threshold."""

    last_diff: float | None = None


class ResidualDiffPolicy(Policy):
    """Skip while the head's residual changed less than `threshold` (relative L1) since the last
    computed step; compute the first `warmup` steps and after `max_cached` cached steps in a row.

    One host read per step (the change, with the timestep when it is on the device); none at all
    with `threshold == 0`, which always computes.
    """

    def __init__(self, threshold: float, warmup: int = 0, max_cached: int | None = None) -> None:
        self.threshold, self.warmup, self.max_cached = threshold, warmup, max_cached

    def new_policy_state(self) -> ResidualDiffState:
        return ResidualDiffState()

    def after_head(self, ctrl: SpanController, call: Call, residual: list[torch.Tensor]) -> bool:
        st = ctrl.store.get(call.branch)
        prev = st.head_prev
        comparable = (
            self.threshold > 0
            and prev is not None
            and len(prev) == len(residual)
            and all(a.shape == b.shape for a, b in zip(prev, residual))
        )
        host = host_values(ctrl.state, rel_l1(residual, prev)) if comparable else host_values(ctrl.state)
        st = ctrl.store.get(call.branch)  # a new run may have begun
        if not comparable or st.head_prev is None:
            return True
        if ctrl.state.step < self.warmup:
            return True
        if self.max_cached is not None and st.consecutive >= self.max_cached:
            return True
        st.policy.last_diff = host[0]
        return host[0] >= self.threshold


def taylor_schedule(step: int, interval: int, warmup: int) -> bool:
    """Whether TaylorSeer computes at `step`: the first `warmup` steps, then one step in `interval`,
    the first of them one step after the warmup (the step right after it is already extrapolated)."""
    return interval <= 1 or step < warmup or (step - warmup - 1) % interval == 0


class IntervalPolicy(Policy):
    """Compute on TaylorSeer's schedule (`taylor_schedule`); no host read with a host timestep."""

    def __init__(self, interval: int, warmup: int = 0) -> None:
        self.interval, self.warmup = interval, warmup

    def after_head(self, ctrl: SpanController, call: Call, residual: list[torch.Tensor]) -> bool:
        return taylor_schedule(resolved_step(ctrl.state), self.interval, self.warmup)

    def before_first(self, ctrl: SpanController, call: Call, args: tuple, kwargs: dict) -> bool:
        return taylor_schedule(resolved_step(ctrl.state), self.interval, self.warmup)


# ---- the controller and its hooks ----------------------------------------------------------------
class SpanBlockHook(CacheHook):
    """The hook on each main-tower block; the controller does the work."""

    def __init__(self, controller: SpanController, index: int) -> None:
        self.controller = controller
        self.index = index

    # Skipped by dynamo itself, but not what it calls: the block's own forward (`next_fn`) stays compiled
    # when the block is, while the cache's logic (`before` / `after`) always runs eagerly.
    @torch.compiler.disable(recursive=False)
    def new_forward(self, module: nn.Module, next_fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        ctrl, i = self.controller, self.index
        out = ctrl.before(i, args, kwargs)
        if out is RUN:
            out = ctrl.after(i, args, kwargs, next_fn(*args, **kwargs))
        return out

    def reset(self) -> None:
        self.controller.reset()

    def stats(self) -> dict[str, Any]:
        # The hook on the first block speaks for the controller its blocks share.
        return self.controller.stats() if self.index == 0 else {}


class SpanController:
    """Runs a head / middle / tail split of the main blocks with a policy and a predictor."""

    def __init__(
        self,
        technique: str,
        model: nn.Module,
        front: int,
        back: int,
        policy: Policy,
        predictor: Predictor | None = None,
    ) -> None:
        self.technique = technique
        self.model = model
        model_map, blocks = main_blocks(model, technique)
        n = len(blocks)
        if front + back >= n:
            raise ConfigError(
                f"{technique}: front={front} + back={back} blocks leave nothing to cache in a model with {n} "
                f"main blocks; use front + back <= {n - 1}"
            )
        self.paths = [p for p, _ in blocks]
        self.modules = [m for _, m in blocks]
        self.front, self.back, self.n = front, back, n
        self.tail_start = n - back
        towers = tower_of(model_map)
        # Segments: maximal runs of middle blocks in one tower.
        self.seg_of: dict[int, int] = {}
        self.seg_first: list[int] = []
        self.seg_last: list[int] = []
        for i in range(front, self.tail_start):
            if not self.seg_first or towers[self.paths[i]] != towers[self.paths[i - 1]] or i == front:
                self.seg_first.append(i)
                self.seg_last.append(i)
            self.seg_of[i] = len(self.seg_first) - 1
            self.seg_last[-1] = i
        self.policy = policy
        self.predictor = predictor or Predictor()
        self.store: BranchStore[SpanBranch] = BranchStore(self._new_branch)
        self.maps: dict[int, StreamMap] = {}
        self.call: Call | None = None
        self.state: RunState = run_state(model)
        self.hooks: list[SpanBlockHook] = []
        self.taylor_attached = False  # TaylorSeer predicts for this block cache (set by taylorseer.py)

    # ---- attach / detach ----------------------------------------------------------------------
    def attach(self) -> None:
        for i, module in enumerate(self.modules):
            hook = SpanBlockHook(self, i)
            add_cache_hook(module, hook, self.technique)
            self.hooks.append(hook)

    def detach(self) -> None:
        remove_cache_hooks(self.model, self.technique)
        self.hooks.clear()

    def reset(self) -> None:
        self.store.clear()
        if self.call is not None:
            self.call.head_in = None
            self.call.seg_in.clear()

    def stats(self) -> dict[str, Any]:
        """The predictor's name and, per branch of the current run, its computed and cached steps."""
        branches = {b: self.store.peek(b) for b in self.store.branches()}
        return {
            "predictor": self.predictor.name,
            "branches": {b: {"computed": st.computed, "cached": st.cached} for b, st in branches.items()},
        }

    def _new_branch(self) -> SpanBranch:
        # Read at each new branch state: TaylorSeer may replace the predictor before the first call.
        return SpanBranch(policy=self.policy.new_policy_state(), predictor=self.predictor.new_predictor_state())

    @property
    def segments(self) -> int:
        return len(self.seg_first)

    def branch_state(self) -> SpanBranch:
        return self.store.get(self.call.branch if self.call is not None else self.state.branch)

    # ---- the forward of one block ---------------------------------------------------------------
    def _map(self, i: int, args: tuple, kwargs: dict, out: Any) -> StreamMap:
        smap = self.maps.get(i)
        if smap is None:
            smap = self.maps[i] = infer_stream_map(self.paths[i], args, kwargs, out)
        return smap

    def _streams_in(self, smap: StreamMap, args: tuple, kwargs: dict) -> list[torch.Tensor | None]:
        return [input_of(k, args, kwargs) if k is not None else None for k in smap.slots]

    @torch.compiler.disable
    def before(self, i: int, args: tuple, kwargs: dict) -> Any:
        """`RUN` when block `i` must run; otherwise its cached output."""
        if i == 0:
            self.call = Call(self.state.branch, bypass=self.state.mode == "train")
        call = self.call
        if call is None or call.bypass or i < self.front:
            return RUN
        if i == self.front and not call.decided:
            self._decide_before(call, args, kwargs)
        if i >= self.tail_start or call.compute:
            return RUN
        seg = self.seg_of[i]
        st = self.branch_state()
        smap = self.maps[i]
        if i != self.seg_last[seg]:
            return identity_output(smap, args, kwargs, st.extra.get(i))
        predicted = self.predictor.predict(st.predictor, seg, self.state.step)
        values = []
        cached = st.extra.get(i)
        for k, key in enumerate(smap.slots):
            if key is not None:
                x = input_of(key, args, kwargs)
                r = predicted[k] if k < len(predicted) else None
                values.append(x + r.to(x.dtype) if r is not None else x)
            elif smap.constants[k] is not None or cached is None:
                values.append(smap.constants[k])
            else:
                values.append(cached[k])
        return smap.build(values)

    @torch.compiler.disable
    def after(self, i: int, args: tuple, kwargs: dict, out: Any) -> Any:
        """Record what a block that ran produced (stream maps, head residual, segment residuals)."""
        call = self.call
        if call is None or call.bypass or i >= self.tail_start:
            return out
        smap = self._map(i, args, kwargs, out)
        if i < self.front:
            if i == 0:
                call.head_in = self._streams_in(smap, args, kwargs)
            if i == self.front - 1:
                self._decide_after_head(call, smap, args, kwargs, out)
            return out
        seg = self.seg_of[i]
        if i == self.seg_first[seg]:
            call.seg_in[seg] = self._streams_in(smap, args, kwargs)
        values = smap.values(out)
        if any(k is None and isinstance(v, torch.Tensor) for k, v in zip(smap.slots, values)):
            self.branch_state().extra[i] = values
        if i == self.seg_last[seg]:
            before = call.seg_in.get(seg)
            if before is not None:
                residual = [
                    (v - b).detach() if k is not None and b is not None and b.shape == v.shape else None
                    for k, v, b in zip(smap.slots, values, before)
                ]
                self.predictor.update(self.branch_state().predictor, seg, residual, self.state.step)
        return out

    # ---- decisions ------------------------------------------------------------------------------
    def _can_skip(self, st: SpanBranch) -> bool:
        return bool(self.maps) and all(i in self.maps for i in range(self.front, self.tail_start)) and (
            self.predictor.ready(st.predictor, self.segments)
        )

    def _finish_decision(self, call: Call, compute: bool) -> bool:
        st = self.store.get(call.branch)
        if not compute and not self._can_skip(st):
            compute = True
        call.compute, call.decided = compute, True
        if compute:
            st.computed += 1
            st.consecutive = 0
        else:
            st.cached += 1
            st.consecutive += 1
        logger.debug(
            "%s: branch %r step %d: %s", self.technique, call.branch, self.state.step, "compute" if compute else "cached"
        )
        return compute

    def _decide_after_head(self, call: Call, smap: StreamMap, args: tuple, kwargs: dict, out: Any) -> None:
        values = smap.values(out)
        head_in = call.head_in or []
        residual: list[torch.Tensor] = []
        own_in = self._streams_in(smap, args, kwargs)
        for k in smap.streams:
            v = values[k]
            b = head_in[k] if k < len(head_in) and head_in[k] is not None and head_in[k].shape == v.shape else own_in[k]
            residual.append((v - b).detach())
        shapes = tuple(tuple(x.shape) for x in head_in if x is not None)
        st = self.store.get(call.branch)
        if st.head_shapes is not None and st.head_shapes != shapes:
            st.head_prev = None  # the input changed shape: nothing cached applies
            st.predictor = self.predictor.new_predictor_state()
        compute = self._finish_decision(call, self.policy.after_head(self, call, residual))
        st = self.store.get(call.branch)  # the policy's sync may have started a new run
        self.policy.decided(self, call, compute, residual)
        st.head_shapes = shapes
        if compute or st.head_prev is None:
            # Compared with the last *computed* step, so slow drift adds up until it forces a compute.
            st.head_prev = residual

    def _decide_before(self, call: Call, args: tuple, kwargs: dict) -> None:
        shapes = tuple(tuple(x.shape) for x in tensor_inputs(args, kwargs).values())
        st = self.store.get(call.branch)
        if st.head_shapes is not None and st.head_shapes != shapes:
            st.predictor = self.predictor.new_predictor_state()  # the inputs changed shape: nothing cached applies
            st.policy = self.policy.new_policy_state()
        st.head_shapes = shapes
        self._finish_decision(call, self.policy.before_first(self, call, args, kwargs))


# ---- helpers for the technique files --------------------------------------------------------------
def span_controller(model: nn.Module) -> SpanController | None:
    """The span controller of the block cache on `model`, if one is applied."""
    found = find_hooks(model, SpanBlockHook)
    return found[0][1].controller if found else None


def install_span(technique: str, model: nn.Module, front: int, back: int, policy: Policy) -> SpanController:
    """Attach a span cache; refuses a second one on the same model."""
    existing = span_controller(model)
    if existing is not None:
        hint = ""
        if existing.technique == "taylorseer":
            hint = (
                "; to combine TaylorSeer with a block cache apply both in one call, e.g. "
                f"hookwise.apply(model, <{technique} config>, TaylorSeer()), after hookwise.remove(model, 'taylorseer')"
            )
        raise CompatibilityError(
            f"{technique}: the model already has the block cache {existing.technique!r}; one block cache per model"
            f"{hint}"
        )
    controller = SpanController(technique, model, front, back, policy)
    controller.attach()
    return controller


def uninstall_span(technique: str, model: nn.Module) -> None:
    controller = span_controller(model)
    if controller is not None and controller.technique == technique and isinstance(controller.predictor, TaylorPredictor):
        if controller.taylor_attached:
            raise CompatibilityError(
                f"TaylorSeer predicts the skipped residuals of {technique}; remove 'taylorseer' first "
                f"(hookwise.remove(model, 'taylorseer')), then {technique!r}"
            )
    remove_cache_hooks(model, technique)


def calibration_run(technique: str, model: nn.Module, run: Callable[[], Any], policy: Policy, predictor: Predictor) -> None:
    """Run `run()` once (one whole sampling run) with a span controller that records through `policy` /
    `predictor` and skips nothing; the model comes back as it was (its run state, if it had one, at a
    new run), also when `run()` raises."""
    if span_controller(model) is not None:
        raise CompatibilityError(f"{technique}: remove the block cache from the model first (hookwise.remove)")
    had_state = get_run_state(unwrap(model)) is not None
    state = run_state(model)
    ctrl = SpanController(f"{technique}_run", model, 0, 0, policy, predictor)
    for recorder in {id(policy): policy, id(predictor): predictor}.values():
        recorder.ctrl = ctrl
    ctrl.attach()
    try:
        state.new_run()
        with torch.no_grad():
            run()
    finally:
        ctrl.detach()
        state.new_run()
        if not had_state:  # leave the model as it was found
            remove_hook(unwrap(model), RUN_STATE_HOOK)
