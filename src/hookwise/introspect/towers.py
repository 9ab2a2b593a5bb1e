"""Finding towers: the runs of repeated blocks that every block-level technique works on.

A tower is either a `ModuleList` / `Sequential` whose children are blocks of one class (any count,
so a one-layer test model still has its tower), a run of at least two consecutive same-class blocks
inside a mixed container, or a run of at least two same-class blocks held as numbered attributes
(`block0, block1, ...`, `layer_1, layer_2, ...`). A block is a module with children and parameters;
single layers (a Linear) never make a tower. Towers are not searched for inside other towers.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

from .paths import join

_NUMBERED = re.compile(r"^(?P<prefix>.*?)(?P<index>\d+)$")


@dataclass(frozen=True)
class FoundTower:
    """A tower as found in the module tree, before sizes are measured."""

    name: str  # display / lookup name: the container path, or "path[i:j]" / "path.prefix*"
    container: str  # path of the module holding the blocks ("" for the model itself)
    members: tuple[tuple[str, nn.Module], ...]  # (path, block) in definition order

    @property
    def depth(self) -> int:
        return 0 if not self.container else self.container.count(".") + 1


def is_block(module: nn.Module) -> bool:
    """A block has submodules and at least one parameter somewhere below it."""
    has_child = next(module.children(), None) is not None
    return has_child and next(module.parameters(), None) is not None


def _runs(children: list[tuple[str, nn.Module]]) -> list[list[tuple[str, nn.Module]]]:
    """Maximal runs of consecutive same-class blocks."""
    runs: list[list[tuple[str, nn.Module]]] = []
    for name, child in children:
        if runs and runs[-1] and type(runs[-1][-1][1]) is type(child) and is_block(child):
            runs[-1].append((name, child))
        else:
            runs.append([(name, child)] if is_block(child) else [])
    return [r for r in runs if r]


def find_towers(model: nn.Module) -> list[FoundTower]:
    """Every tower of `model`, in definition order (a depth-first walk of the module tree)."""
    towers: list[FoundTower] = []

    def visit(module: nn.Module, path: str) -> None:
        children = list(module.named_children())
        claimed: set[str] = set()
        if isinstance(module, (nn.ModuleList, nn.Sequential)) and children:
            if len({type(c) for _, c in children}) == 1 and all(is_block(c) for _, c in children):
                towers.append(FoundTower(path, path, tuple((join(path, n), c) for n, c in children)))
                return
            names = [n for n, _ in children]
            for run in _runs(children):
                if len(run) < 2:
                    continue
                i, j = names.index(run[0][0]), names.index(run[-1][0]) + 1
                towers.append(FoundTower(f"{path}[{i}:{j}]", path, tuple((join(path, n), c) for n, c in run)))
                claimed.update(n for n, _ in run)
        else:
            groups: dict[tuple[str, type], list[tuple[int, str, nn.Module]]] = {}
            for name, child in children:
                match = _NUMBERED.match(name)
                if match and is_block(child):
                    key = (match["prefix"], type(child))
                    groups.setdefault(key, []).append((int(match["index"]), name, child))
            for (prefix, _), items in groups.items():
                if len(items) < 2:
                    continue
                items.sort(key=lambda t: t[0])
                members = tuple((join(path, n), c) for _, n, c in items)
                towers.append(FoundTower(join(path, f"{prefix}*") if prefix else f"{path}[*]", path, members))
                claimed.update(n for _, n, _ in items)
        for name, child in children:
            if name not in claimed:
                visit(child, join(path, name))

    visit(model, "")
    return towers
