"""Errors raised by hookwise. Every message says what was wrong and what to do about it."""

from __future__ import annotations

import importlib


class HookwiseError(Exception):
    """Base class of every error hookwise raises on purpose."""


class ConfigError(HookwiseError, ValueError):
    """A technique config, or an argument, has a value that cannot work."""


class HookError(HookwiseError):
    """The hook engine was used in a way it cannot honour (duplicate name, missing hook, foreign wrapper)."""


class OffloadFileError(HookError):
    """A group's offload file changed on disk while a model used it."""


class CompatibilityError(HookwiseError):
    """Two techniques in a stack cannot be combined, or one appears twice."""


class NoTargetError(HookwiseError):
    """A technique matched no module of the model, so applying it would silently do nothing."""


class ModelResolveError(HookwiseError, LookupError):
    """A model reference (spec name, folder, or `module:factory`) could not be turned into a model."""


class MissingDependencyError(HookwiseError, ImportError):
    """An optional dependency is needed for what was asked."""


def require(module_name: str, extra: str, purpose: str):
    """Import an optional dependency or raise `MissingDependencyError` naming the extra to install."""
    try:
        return importlib.import_module(module_name)
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise MissingDependencyError(
            f"{purpose} needs the '{module_name}' package, which is not installed. "
            f"Install it with: pip install 'hookwise[{extra}]'"
        ) from exc
