"""One description per plan: `describe_cache()` lets `describe` reuse the map of an unchanged model.

The planner describes the same model many times in one plan (measuring it, estimating its step,
each fake run of a stack), and a full-size model takes about a second each time. Inside the
context a map is reused for a model described already with the same arguments while the model is
unchanged: the same object, the same modules (by path and class) and the same parameters and
buffers (by name, shape, dtype, device and whether they train) as when it was mapped. A model
changed in any of these is described again. Outside the context nothing is kept.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Any, Callable, Iterator

from torch import nn

_CACHE: contextvars.ContextVar[dict | None] = contextvars.ContextVar("hookwise_describe_cache", default=None)


@contextlib.contextmanager
def describe_cache() -> Iterator[None]:
    """Within this context `describe` reuses the map of a model it mapped already and that has not
    changed since. Nested contexts share the outermost cache."""
    token = _CACHE.set({}) if _CACHE.get() is None else None
    try:
        yield
    finally:
        if token is not None:
            _CACHE.reset(token)


def signature(model: nn.Module) -> tuple:
    """What a map depends on that a technique or a user may change: modules, parameters, buffers."""
    modules = tuple((path, type(m).__qualname__) for path, m in model.named_modules(remove_duplicate=False))
    tensors = tuple(
        (name, tuple(t.shape), t.dtype, t.device.type, t.requires_grad)
        for name, t in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    )
    return modules, tensors


def cached(model: nn.Module, args: tuple, make: Callable[[], Any]) -> Any:
    """`make()`, or the map made for `model` with `args` in the open cache while it is unchanged."""
    cache = _CACHE.get()
    if cache is None:
        return make()
    key = (id(model), args)
    now = signature(model)
    hit = cache.get(key)
    # The entry holds the model, so its id cannot pass to another object while the cache lives.
    if hit is not None and hit[0] is model and hit[1] == now:
        return hit[2]
    made = make()
    cache[key] = (model, now, made)
    return made
