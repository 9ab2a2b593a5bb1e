"""Layer skip: leave out whole blocks, or their attention / feed-forward modules, by index.

`blocks` index the main blocks of the model map in call order (FLUX: double blocks, then single
blocks). `what="block"` returns a block's inputs as its outputs (in its own output structure);
`"attention"` / `"ffn"` make those modules contribute nothing (zeros shaped like their output),
so the block's residual connections carry the stream on. `steps=(first, last)` restricts skipping
to those steps of each run (inclusive); None skips on every step. A module's output structure is
learned from its first call, which therefore runs once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from ..core.config import TechniqueConfig
from ..core.hooks import Layer, ModelHook, unwrap
from ..core.techniques import apply_techniques, register_technique, remove_techniques
from ..errors import ConfigError, NoTargetError
from ._blocks import main_blocks
from ._state import add_cache_hook, remove_cache_hooks, resolved_step, run_state
from ._streams import StreamMap, identity_output, infer_stream_map, map_output

NAME = "layer_skip"
RUN, LEARN = object(), object()
WHAT = ("block", "attention", "ffn")


@dataclass(frozen=True)
class LayerSkip(TechniqueConfig):
    """Layer skip: drop main blocks, or their attention / feed-forward modules, by index.

    - `blocks`: indices into the model's main blocks, in call order (negative counts from the end).
    - `what`: "block", "attention" or "ffn".
    - `steps`: (first, last) steps of each run to skip on (inclusive); None: every step.
    """

    blocks: tuple[int, ...] = ()
    what: str = "block"
    steps: tuple[int, int] | None = None

    def validate(self) -> None:
        if not isinstance(self.blocks, (tuple, list)) or not self.blocks:
            raise ConfigError(f"LayerSkip.blocks must name at least one block index, got {self.blocks!r}")
        if not all(isinstance(i, int) and not isinstance(i, bool) for i in self.blocks):
            raise ConfigError(f"LayerSkip.blocks must be integers, got {self.blocks!r}")
        if len(set(self.blocks)) != len(self.blocks):
            raise ConfigError(f"LayerSkip.blocks lists a block twice: {self.blocks!r}")
        if self.what not in WHAT:
            raise ConfigError(f"LayerSkip.what must be one of {WHAT}, got {self.what!r}")
        if self.steps is not None and (
            not isinstance(self.steps, (tuple, list))
            or len(self.steps) != 2
            or not all(isinstance(s, int) and s >= 0 for s in self.steps)
            or self.steps[0] > self.steps[1]
        ):
            raise ConfigError(f"LayerSkip.steps must be (first, last) step indices with first <= last, or None; got {self.steps!r}")


class SkipHook(ModelHook):
    """Returns the inputs of a block (or zeros for an attention / FFN module) instead of computing it."""

    layer = Layer.CACHE_SKIP

    def __init__(self, model: nn.Module, where: str, zeros: bool, steps: tuple[int, int] | None) -> None:
        self.state = run_state(model)
        self.where, self.zeros, self.steps = where, zeros, steps
        self.smap: StreamMap | None = None
        self.template: Any = None
        self.skipped = 0

    def stats(self) -> dict[str, Any]:
        """For `cache_stats`: the calls answered without computing, since it was applied."""
        return {"skipped": self.skipped}

    @torch.compiler.disable(recursive=False)
    def new_forward(self, module: nn.Module, next_fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        out = self.before(args, kwargs)
        if out is RUN:
            out = next_fn(*args, **kwargs)
        elif out is LEARN:
            out = self.learn(args, kwargs, next_fn(*args, **kwargs))
        return out

    @torch.compiler.disable
    def before(self, args: tuple, kwargs: dict) -> Any:
        if self.steps is not None:
            step = resolved_step(self.state)
            if not self.steps[0] <= step <= self.steps[1]:
                return RUN
        if (self.template if self.zeros else self.smap) is None:
            return LEARN
        self.skipped += 1
        if self.zeros:
            return map_output(lambda t: torch.zeros_like(t), self.template)
        return identity_output(self.smap, args, kwargs, None)

    @torch.compiler.disable
    def learn(self, args: tuple, kwargs: dict, out: Any) -> Any:
        """The first skipped call runs once to learn the output's structure, then answers as skipped."""
        if self.zeros:
            self.template = map_output(lambda t: torch.zeros_like(t), out)
        else:
            self.smap = infer_stream_map(self.where, args, kwargs, out)
        return self.before(args, kwargs)


def _targets(model: nn.Module, config: LayerSkip) -> list[tuple[str, nn.Module]]:
    model_map, blocks = main_blocks(model, NAME)
    n = len(blocks)
    bad = [i for i in config.blocks if not -n <= i < n]
    if bad:
        raise NoTargetError(f"LayerSkip: block indices {bad} are out of range for a model with {n} main blocks")
    chosen = [blocks[i % n] for i in config.blocks]
    if config.what == "block":
        return chosen
    roles = model_map.attention if config.what == "attention" else model_map.ffn
    paths = {p for p, _ in chosen}
    out = [(r.path, model.get_submodule(r.path)) for r in roles if r.block in paths]
    if not out:
        raise NoTargetError(
            f"LayerSkip: the chosen blocks {[p for p, _ in chosen]} have no {config.what} module in the model map; "
            f"skip whole blocks with what='block'"
        )
    return out


def _apply_layer_skip(model: nn.Module, config: LayerSkip) -> None:
    """Skip the configured blocks (or their attention / FFN modules) of `model`."""
    model = unwrap(model)
    for path, module in _targets(model, config):
        add_cache_hook(module, SkipHook(model, path, config.what != "block", config.steps), NAME)


def _remove_layer_skip(model: nn.Module, config: LayerSkip | None = None) -> None:
    remove_cache_hooks(model, NAME)


def apply_layer_skip(model: nn.Module, config: LayerSkip) -> None:
    """Skip the configured blocks (or their attention / FFN modules) of `model`.

    The same as `hookwise.apply(model, config)`.
    """
    apply_techniques(model, [config])


def remove_layer_skip(model: nn.Module) -> None:
    """Remove LayerSkip from `model` (the same as `hookwise.remove(model, "layer_skip")`)."""
    remove_techniques(model, [NAME])


register_technique(NAME, LayerSkip, apply=_apply_layer_skip, remove=_remove_layer_skip, layer=Layer.CACHE)
