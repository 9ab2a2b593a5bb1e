"""Helpers for the Kernels tests: count the calls of the fused functions the kernel hooks hold."""

from __future__ import annotations

from torch import nn

from hookwise.core.hooks import hooks_named
from hookwise.kernels import fused


def count_fused_calls(model: nn.Module) -> dict[str, int]:
    """Wrap every Kernels hook's fused functions (module, block, processor and structural hooks) with a call counter.

    Returns the counts by function name ("norm_modulate", "gated_residual", ...), filled as the model runs.
    A module listed at several paths is wrapped once.
    """
    calls: dict[str, int] = {}

    def wrap(name, fn):
        def counted(*args):
            calls[name] = calls.get(name, 0) + 1
            return fn(*args)

        return counted

    hooks = hooks_named(model, fused.HOOK_NAME, (fused.KernelHook, fused.ProcessorHook, fused.StructuralHook)).values()
    for hook in {id(h): h for h in hooks}.values():
        hook.ops = {name: wrap(name, fn) for name, fn in hook.ops.items()}
    return calls
