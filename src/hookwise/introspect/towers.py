"""Finding towers: the runs of repeated blocks that every block-level technique works on.

A tower is either a `ModuleList` / `Sequential` whose children are blocks of one class (any count,
so a one-layer test model still has its tower), a run of at least two consecutive same-class blocks
inside a mixed container, or a run of at least two same-class blocks held as numbered attributes
(`block0, block1, ...`, `layer_1, layer_2, ...`). A block is a module with children and parameters;
single layers (a Linear) never make a tower. Towers are not searched for inside other towers.

A container is never a block: `ModuleList` and `ModuleDict` have no `forward` and are never called,
a plain holder class (no `forward`) of such lists neither, and a `Sequential` of same-class blocks is
a tower itself. So a
`ModuleList` of `ModuleDict`s / `Sequential`s / holders that keep the real block lists is searched
through, at any depth, and the towers are the lists inside.

With a traced forward (`called`), a block must also have been called: blocks defined but never run
are left out of their tower, and a container whose members never ran is no tower.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

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


def has_forward(module: nn.Module) -> bool:
    """Whether the module's class defines a `forward` (ModuleList, ModuleDict and plain holders do not)."""
    return type(module).forward is not nn.Module.forward


def is_container(module: nn.Module) -> bool:
    """A module that only holds others: a `ModuleList` / `ModuleDict`, a `Sequential` of same-class
    blocks, or a module with no `forward` of its own that holds such containers of blocks.
    """
    if isinstance(module, (nn.ModuleList, nn.ModuleDict)):
        return True
    if isinstance(module, nn.Sequential):
        children = list(module.children())
        return bool(children) and len({type(c) for c in children}) == 1 and all(is_block(c) for c in children)
    if not has_forward(module):
        # A forward-less class holding only layers is still a block statically (test models often
        # leave forward out); one holding lists of blocks is a holder.
        return any(_holds_blocks(c) for c in module.children())
    return False


def _holds_blocks(module: nn.Module) -> bool:
    """Whether `module` is a container with a block somewhere inside it, through containers only."""
    return is_container(module) and any(is_block(c) or _holds_blocks(c) for c in module.children())


def is_block(module: nn.Module) -> bool:
    """A block has submodules and at least one parameter somewhere below it, and is not a container."""
    has_child = next(module.children(), None) is not None
    return has_child and next(module.parameters(), None) is not None and not is_container(module)


def _runs(
    children: list[tuple[str, nn.Module]], block: Callable[[nn.Module], bool]
) -> list[list[tuple[str, nn.Module]]]:
    """Maximal runs of consecutive same-class blocks."""
    runs: list[list[tuple[str, nn.Module]]] = []
    for name, child in children:
        if runs and runs[-1] and type(runs[-1][-1][1]) is type(child) and block(child):
            runs[-1].append((name, child))
        else:
            runs.append([(name, child)] if block(child) else [])
    return [r for r in runs if r]


def find_towers(model: nn.Module, called: Callable[[nn.Module], bool] | None = None) -> list[FoundTower]:
    """Every tower of `model`, in definition order (a depth-first walk of the module tree).

    `called`, from a trace, says which modules ran: then only called modules are blocks.
    """
    towers: list[FoundTower] = []

    def block(module: nn.Module) -> bool:
        return is_block(module) and (called is None or called(module))

    def visit(module: nn.Module, path: str) -> None:
        children = list(module.named_children())
        claimed: set[str] = set()
        if called is not None and isinstance(module, (nn.ModuleList, nn.Sequential)):
            # Blocks defined but never run are not members; the list of those that ran is the tower.
            ran = [(n, c) for n, c in children if called(c)]
            if ran and len({type(c) for _, c in ran}) == 1 and all(block(c) for _, c in ran):
                towers.append(FoundTower(path, path, tuple((join(path, n), c) for n, c in ran)))
                return
        if isinstance(module, (nn.ModuleList, nn.Sequential)) and children:
            if len({type(c) for _, c in children}) == 1 and all(block(c) for _, c in children):
                towers.append(FoundTower(path, path, tuple((join(path, n), c) for n, c in children)))
                return
            names = [n for n, _ in children]
            for run in _runs(children, block):
                if len(run) < 2:
                    continue
                i, j = names.index(run[0][0]), names.index(run[-1][0]) + 1
                towers.append(FoundTower(f"{path}[{i}:{j}]", path, tuple((join(path, n), c) for n, c in run)))
                claimed.update(n for n, _ in run)
        else:
            groups: dict[tuple[str, type], list[tuple[int, str, nn.Module]]] = {}
            for name, child in children:
                match = _NUMBERED.match(name)
                if match and block(child):
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
