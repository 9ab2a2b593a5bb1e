"""Shared machinery of the step caches: the structure of a module's inputs and outputs.

Blocks' inputs and outputs are matched into *streams* (`StreamMap`), so a skipped block can return
its inputs in its own output structure, whatever the model (FLUX returns `(encoder, hidden)`, Wan
returns `hidden`, musubi-style blocks return `(img, txt)`). `map_output` applies a function over
the tensors of a module's output, keeping its structure.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from ..errors import ConfigError

Key = tuple[str, Any]  # ("a", position) or ("k", name)


def tensor_inputs(args: tuple, kwargs: dict) -> dict[Key, torch.Tensor]:
    out: dict[Key, torch.Tensor] = {}
    for i, a in enumerate(args):
        if isinstance(a, torch.Tensor) and a.is_floating_point():
            out[("a", i)] = a
    for k, v in kwargs.items():
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            out[("k", k)] = v
    return out


def input_of(key: Key, args: tuple, kwargs: dict) -> torch.Tensor:
    kind, where = key
    return args[where] if kind == "a" else kwargs[where]


@dataclass(frozen=True)
class StreamMap:
    """How a block's output is built from its inputs.

    `container`: "tensor", "tuple" or "list"; `slots`: per output element, the input key it
    continues (a residual stream), or None (not a stream: the cached value is reused);
    `constants`: non-tensor output elements, returned as they were.
    """

    container: str
    slots: tuple[Key | None, ...]
    constants: tuple[Any, ...]

    def values(self, output: Any) -> list[Any]:
        return [output] if self.container == "tensor" else list(output)

    def build(self, values: list[Any]) -> Any:
        if self.container == "tensor":
            return values[0]
        return tuple(values) if self.container == "tuple" else list(values)

    @property
    def streams(self) -> list[int]:
        """Indices of output elements that continue an input stream."""
        return [i for i, key in enumerate(self.slots) if key is not None]


def infer_stream_map(where: str, args: tuple, kwargs: dict, output: Any) -> StreamMap:
    """Match each tensor of a block's output with the input it continues (same shape and dtype).

    Ties (two inputs of the same shape) go to the input closest to the output, read once per block.
    """
    if isinstance(output, torch.Tensor):
        container, outs = "tensor", [output]
    elif isinstance(output, (tuple, list)):
        container, outs = ("tuple" if isinstance(output, tuple) else "list"), list(output)
    else:
        raise ConfigError(
            f"block {where} returns a {type(output).__name__}; step caches need blocks that return a tensor "
            f"or a tuple of tensors. Apply the cache to a model whose blocks do, or use an attention-level cache (PAB)"
        )
    inputs = tensor_inputs(args, kwargs)
    slots: list[Key | None] = []
    constants: list[Any] = []
    used: set[Key] = set()
    for out in outs:
        constants.append(None if isinstance(out, torch.Tensor) else out)
        if not isinstance(out, torch.Tensor):
            slots.append(None)
            continue
        candidates = [k for k, v in inputs.items() if k not in used and v.shape == out.shape and v.dtype == out.dtype]
        if len(candidates) > 1:
            with torch.no_grad():
                distance = [float((out.float() - inputs[k].float()).abs().mean()) for k in candidates]
            candidates = [candidates[min(range(len(candidates)), key=distance.__getitem__)]]
        key = candidates[0] if candidates else None
        if key is not None:
            used.add(key)
        slots.append(key)
    if not any(k is not None for k in slots):
        raise ConfigError(
            f"no output of block {where} has the shape of one of its inputs, so it is not a residual block a step "
            f"cache can skip (output shapes {[tuple(o.shape) for o in outs if isinstance(o, torch.Tensor)]})"
        )
    return StreamMap(container, tuple(slots), tuple(constants))


def identity_output(smap: StreamMap, args: tuple, kwargs: dict, cached: list[Any] | None) -> Any:
    """A skipped block's output: its input streams in its output structure (cached values elsewhere)."""
    values = []
    for i, key in enumerate(smap.slots):
        if key is not None:
            values.append(input_of(key, args, kwargs))
        elif smap.constants[i] is not None or cached is None:
            values.append(smap.constants[i])
        else:
            values.append(cached[i])
    return smap.build(values)


def rel_l1(now: list[torch.Tensor], before: list[torch.Tensor]) -> torch.Tensor:
    """Relative L1 change, sum |now - before| / sum |before| over all tensors, as a device scalar."""
    num = sum((a.float() - b.float()).abs().sum() for a, b in zip(now, before))
    den = sum(b.float().abs().sum() for b in before)
    return num / den.clamp_min(1e-12)


def map_output(fn: Callable[..., torch.Tensor], *outputs: Any) -> Any:
    """Apply `fn` elementwise over matching tensor outputs (a tensor or a tuple of tensors)."""
    first = outputs[0]
    if isinstance(first, torch.Tensor):
        return fn(*outputs)
    if isinstance(first, (tuple, list)):
        items = [
            map_output(fn, *parts) if isinstance(parts[0], (torch.Tensor, tuple, list)) else parts[0]
            for parts in zip(*outputs)
        ]
        return type(first)(items)
    return first
