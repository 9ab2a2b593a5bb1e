"""Small helpers the command-line modules share: sizes in MiB and argparse types."""

from __future__ import annotations

import argparse

_MIB = 1 / 2**20


def _mib(n: int) -> str:
    return f"{n * _MIB:,.1f}"


def _positive_int(text: str) -> int:
    """argparse type: a whole number >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value
