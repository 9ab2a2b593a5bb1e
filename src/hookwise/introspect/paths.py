"""Dotted module paths ("blocks.0.attn"): joining them and walking their ancestors.

Shared by introspect/ and the technique folders, so every part of hookwise spells a path alike.
"""

from __future__ import annotations


def join(*parts: str) -> str:
    """The dotted path of `parts`, empty ones (the root) left out: join("", "a") == "a"."""
    return ".".join(p for p in parts if p)


def prefixes(path: str) -> list[str]:
    """`path` and each of its ancestors, outermost first, the root left out ("a.b" -> ["a", "a.b"])."""
    if not path:
        return []
    parts = path.split(".")
    return [".".join(parts[: i + 1]) for i in range(len(parts))]


def under(path: str, paths: set[str]) -> bool:
    """`path` is one of `paths` or lies below one of them."""
    return any(p in paths for p in prefixes(path))
