"""Offload groups: the units that move between host (or disk) and the device, taken from the model map.

A group is a set of modules whose forward marks when its weights are needed, and the tensors
(parameters and buffers, whatever their dtype) that move with it. Block granularity groups the
blocks of each tower (`blocks_per_group` consecutive blocks at a time); leaf granularity makes one
group per Linear / Conv / Embedding leaf. Everything outside the towers (or outside the leaves)
forms groups of its own: a module that holds no tower block becomes one group for its whole
subtree; a module that holds tower blocks (or, at leaf level, a container with children) keeps
its own direct tensors *pinned resident* because they are read during its whole forward.

Each group has a flat layout: every tensor at an offset aligned to `ALIGN` bytes, so one flat
buffer holds the whole group and one copy moves it.

`declared_groups` forms the same groups from a footprint (leaf paths and sizes, no model), for the
planner's cost declaration of offloading.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor

from ..core.marks import user_trainable
from ..errors import ConfigError, NoTargetError
from ..introspect import ModelMap
from ..introspect.paths import join, prefixes, under

ALIGN = 64  # bytes; a multiple of every element size, and of the GPU's preferred copy alignment


def align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


@dataclass(eq=False)
class TensorRef:
    """One parameter or buffer of the model, by owner and attribute name (identity kept)."""

    module: nn.Module
    name: str
    path: str
    kind: str  # "param" | "buffer"
    tensor: torch.Tensor
    offset: int = 0  # byte offset in the group's flat layout

    def __post_init__(self) -> None:
        # Fixed when the group is formed: while offloaded, `tensor.data` changes but these do not.
        self.dtype: torch.dtype = self.tensor.dtype
        self.shape: torch.Size = self.tensor.shape
        self.nbytes: int = self.tensor.numel() * self.tensor.element_size()

    def view_in(self, flat: torch.Tensor) -> torch.Tensor:
        """A view of the group's flat uint8 buffer `flat` holding this tensor, at its offset, contiguous."""
        return flat[self.offset : self.offset + self.nbytes].view(self.dtype).view(self.shape)

    def current(self) -> torch.Tensor | None:
        """The tensor the owner holds under this name now (None if it was removed)."""
        table = self.module._parameters if self.kind == "param" else self.module._buffers
        return table.get(self.name)


@dataclass(eq=False)
class Group:
    """A unit of offloading: modules whose calls need it, and the tensors that move together."""

    index: int
    name: str
    kind: str  # "block" | "leaf" | "rest"
    modules: list[tuple[str, nn.Module]]
    tensors: list[TensorRef]
    in_tower: bool  # inside a tower (block groups, leaves of blocks): spread by the budget
    nbytes: int = 0  # padded flat size
    resident: bool = False  # decided by the budget plan

    def layout(self) -> None:
        """Give every tensor its aligned offset and set the padded size."""
        offset = 0
        for ref in self.tensors:
            ref.offset = offset
            offset = align(offset + ref.nbytes)
        self.nbytes = align(offset)

    @property
    def data_bytes(self) -> int:
        return sum(ref.nbytes for ref in self.tensors)

    def __repr__(self) -> str:
        return f"Group({self.index}, {self.name!r}, {self.kind}, {len(self.tensors)} tensors, {self.nbytes} B)"


@dataclass
class Partition:
    """The groups of a model plus the tensors that stay on the device whatever the budget."""

    granularity: str
    groups: list[Group]
    pinned: list[TensorRef] = field(default_factory=list)  # always resident (see `reasons`)
    reasons: dict[str, str] = field(default_factory=dict)  # tensor path -> why it is pinned resident

    @property
    def pinned_bytes(self) -> int:
        return sum(ref.nbytes for ref in self.pinned)


def _direct(module: nn.Module, path: str) -> Iterator[TensorRef]:
    for name, p in module._parameters.items():
        if p is not None:
            yield TensorRef(module, name, join(path, name), "param", p)
    for name, b in module._buffers.items():
        if b is not None:
            yield TensorRef(module, name, join(path, name), "buffer", b)


def tensors_of(module: nn.Module, path: str = "") -> Iterator[TensorRef]:
    """Every parameter and buffer in the subtree of `module` (paths prefixed by `path`)."""
    for sub_path, sub in module.named_modules(prefix=path, remove_duplicate=False):
        yield from _direct(sub, sub_path)


def _check_tensor(ref: TensorRef) -> str | None:
    """Why a tensor cannot be streamed (it then stays resident), or None."""
    t = ref.tensor
    if isinstance(t, FakeTensor):
        # The planner's fake run (`plan/_peak_stack.py`): a stand-in for a plain tensor, streamed as one.
        return None if t.layout == torch.strided and not t.is_sparse else "sparse / non-strided tensor"
    if type(t) not in (torch.Tensor, nn.Parameter) or type(t.data) is not torch.Tensor:
        return f"tensor subclass {type(t.data).__name__} (only plain tensors are streamed)"
    if t.is_sparse or t.is_quantized or t.layout != torch.strided:
        return "sparse / quantized / non-strided tensor"
    return None


def partition(
    model: nn.Module,
    model_map: ModelMap,
    granularity: str,
    *,
    blocks_per_group: int = 1,
    offload_trainable: bool | None = None,
) -> Partition:
    """Split `model` into offload groups at `granularity` ("block" or "leaf").

    Trainable parameters stay resident unless `offload_trainable` is True. With None, they stay
    resident when the user froze some parameters (LoRA training, training part of a model) and
    stream when the user froze none: that is how models load for inference (`requires_grad=True`
    is every module's default, not a sign of training), and a full fine-tune, where keeping them
    resident would offload nothing. A weight a storage technique replaced (casting's fp8, a
    quantized or GGUF weight) is frozen by that technique, not by the user: it counts with the flag
    it had before (`core.marks.user_trainable`), so storing weights smaller does not turn sampling
    into "LoRA training" and keep every other parameter resident.
    """
    if offload_trainable is None:
        offload_trainable = all(user_trainable(p) for p in model.parameters())
    for path, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.device.type == "meta":
            raise ConfigError(
                f"{path} is on the meta device: offloading needs real weights; load the checkpoint first "
                f"(e.g. from_pretrained, or load_state_dict(..., assign=True))"
            )
    if granularity == "block":
        groups, containers = _block_groups(model, model_map, blocks_per_group)
    elif granularity == "leaf":
        groups, containers = _leaf_groups(model, model_map)
    else:  # pragma: no cover - validated by the config
        raise ConfigError(f"granularity must be 'block' or 'leaf', got {granularity!r}")

    part = Partition(granularity, [])
    pinned: set[int] = set()

    def pin(ref: TensorRef, reason: str) -> None:
        if id(ref.tensor) not in pinned:
            pinned.add(id(ref.tensor))
            part.pinned.append(ref)
            part.reasons[ref.path] = reason

    # Tensors read by container modules during their whole forward stay resident.
    for ref in containers:
        pin(ref, "held directly by a module that contains other groups")
    groups_of: dict[int, int] = {}
    for group in groups:
        for key in {id(ref.tensor) for ref in group.tensors}:
            groups_of[key] = groups_of.get(key, 0) + 1
    for group in groups:
        kept: list[TensorRef] = []
        seen: set[int] = set()
        for ref in group.tensors:
            key = id(ref.tensor)
            if key in seen or key in pinned:
                continue
            seen.add(key)
            if groups_of[key] > 1:
                reason = "shared by several groups (tied weights)"
            elif ref.kind == "param" and ref.tensor.requires_grad and not offload_trainable:
                reason = "trainable (stays resident; offload_trainable=True streams it)"
            else:
                reason = _check_tensor(ref)
            if reason is None:
                kept.append(ref)
            else:
                pin(ref, reason)
        group.tensors = kept
    part.groups = [g for g in groups if g.tensors]
    for i, g in enumerate(part.groups):
        g.index = i
        g.layout()
    if not part.groups:
        raise NoTargetError(
            f"offloading found nothing to stream in {type(model).__name__} at granularity={granularity!r}: "
            f"every tensor is trainable, shared or held by a container ({len(part.pinned)} tensors). "
            f"Freeze the base weights (requires_grad_(False)) or pass offload_trainable=True (or None)"
        )
    return part


def block_ancestors(paths: Iterable[str]) -> set[str]:
    """The modules that hold the tower blocks at `paths`: the root and every proper ancestor."""
    ancestors = {""}
    for path in paths:
        ancestors.update(prefixes(path)[:-1])
    return ancestors


def rest_group_of(path: str, ancestors: set[str]) -> str:
    """The block-granularity group of a module or tensor at `path` outside every tower block: the
    subtree of its outermost ancestor that holds no block (`ancestors`: `block_ancestors`). A tensor
    held directly by one of `ancestors` belongs to none (it is pinned resident): its owner's path."""
    for prefix in prefixes(path):
        if prefix not in ancestors:
            return prefix
    return path


def _block_groups(model: nn.Module, model_map: ModelMap, per_group: int) -> tuple[list[Group], list[TensorRef]]:
    if not model_map.towers:
        raise NoTargetError(
            f"{type(model).__name__} has no tower of repeated blocks, so granularity='block' has nothing to "
            f"group; use granularity='leaf' (or 'auto')"
        )
    groups: list[Group] = []
    block_paths: set[str] = set()
    towers = list(model_map.main_towers) + [t for t in model_map.towers if not t.main]
    for tower in towers:
        blocks = list(tower.blocks)
        for i in range(0, len(blocks), per_group):
            chunk = blocks[i : i + per_group]
            mods = [(b.path, model.get_submodule(b.path)) for b in chunk]
            refs = [ref for path, m in mods for ref in tensors_of(m, path)]
            name = chunk[0].path if len(chunk) == 1 else f"{chunk[0].path}..{chunk[-1].path.rsplit('.', 1)[-1]}"
            groups.append(Group(len(groups), name, "block", mods, refs, in_tower=True))
            block_paths.update(b.path for b in chunk)

    ancestors = block_ancestors(block_paths)
    containers: list[TensorRef] = []

    def visit(path: str, module: nn.Module) -> None:
        if path in block_paths:
            return
        if path not in ancestors:
            refs = list(tensors_of(module, path))
            if refs:
                groups.append(Group(len(groups), path, "rest", [(path, module)], refs, in_tower=False))
            return
        containers.extend(_direct(module, path))
        for name, child in module.named_children():
            visit(join(path, name), child)

    visit("", model)
    return groups, containers


def _leaf_groups(model: nn.Module, model_map: ModelMap) -> tuple[list[Group], list[TensorRef]]:
    if not model_map.leaves:
        raise NoTargetError(
            f"{type(model).__name__} has no Linear / Conv / Embedding leaf, so granularity='leaf' has nothing "
            f"to offload"
        )
    groups: list[Group] = []
    leaf_paths = {leaf.path for leaf in model_map.leaves}
    for leaf in model_map.leaves:
        module = model.get_submodule(leaf.path)
        refs = list(tensors_of(module, leaf.path))
        groups.append(Group(len(groups), leaf.path, "leaf", [(leaf.path, module)], refs, leaf.block is not None))
    containers: list[TensorRef] = []
    for path, module in model.named_modules():
        if under(path, leaf_paths):
            continue
        direct = list(_direct(module, path))
        if not direct:
            continue
        if next(module.children(), None) is None:
            # A norm or similar module without children: its tensors are read only inside its forward.
            block = model_map.block_of(path)
            groups.append(Group(len(groups), path, "rest", [(path, module)], direct, in_tower=block is not None))
        else:
            containers.extend(direct)
    return groups, containers


# ---- the groups of a footprint (the planner's model of a partition) ------------------------------------
# The planner asks for the groups of equal footprints many times (every option built on one, block and
# leaf, with and without a budget, and the same footprint reached by several orders of a stack): they
# are formed once per (footprint, granularity, blocks per group). A footprint is a frozen dataclass,
# hashed and compared by value. The groups returned are shared: callers read them (choose_residency
# does), never change them.
_GROUPS_CACHE: dict[tuple[Any, str, int], tuple[list[Group], int]] = {}
_GROUPS_CACHE_SIZE = 256


def declared_groups(fp: Any, granularity: str, blocks_per_group: int) -> tuple[list[Group], int]:
    """`_form_declared_groups`, formed once per footprint (see _GROUPS_CACHE)."""
    key = (fp, granularity, blocks_per_group)
    hit = _GROUPS_CACHE.get(key)
    if hit is not None:
        return hit
    found = _form_declared_groups(fp, granularity, blocks_per_group)
    if len(_GROUPS_CACHE) >= _GROUPS_CACHE_SIZE:
        del _GROUPS_CACHE[next(iter(_GROUPS_CACHE))]  # the oldest entry
    _GROUPS_CACHE[key] = found
    return found


def _form_declared_groups(fp: Any, granularity: str, blocks_per_group: int) -> tuple[list[Group], int]:
    """(groups, bytes pinned resident) of a footprint, formed as `partition` forms them.

    Block granularity: `blocks_per_group` tower blocks per group, and outside the towers one group
    per subtree that holds no block (`rest_group_of`, the partition's own rule), sized by the leaves
    in it. Leaf granularity: one group per leaf. The footprint knows only its leaves' paths, so the
    tensors outside every leaf (norms, a root's `scale_shift_table`, buffers) cannot be placed: they
    count as resident, as a container's direct tensors are (an upper bound for the device)."""
    groups: list[Group] = []

    def add(name: str, kind: str, raw: int, padded: int, in_tower: bool) -> None:
        group = Group(len(groups), name, kind, [], [], in_tower)
        group.nbytes = align(padded)
        groups.append(group)

    def padded(leaf: Any) -> int:
        # Each tensor sits at an aligned offset in its group's layout: the weight, then the rest (bias).
        weight = leaf.itemsize
        for n in leaf.shape:
            weight *= n
        weight = min(weight, leaf.nbytes)
        return align(weight) + align(leaf.nbytes - weight)

    if granularity == "block" and fp.blocks:
        blocks = list(fp.blocks)
        in_block = [0] * len(blocks)
        in_block_padded = [0] * len(blocks)
        for leaf in fp.leaves:
            if leaf.block is not None:
                in_block[leaf.block] += leaf.nbytes
                in_block_padded[leaf.block] += padded(leaf)
        for i in range(0, len(blocks), blocks_per_group):
            chunk = range(i, min(i + blocks_per_group, len(blocks)))
            raw = sum(blocks[j] for j in chunk)
            add(f"block {i}", "block", raw, sum(in_block_padded[j] + align(blocks[j] - in_block[j]) for j in chunk), True)
        ancestors = block_ancestors(leaf.path for leaf in fp.leaves if leaf.block is not None)
        rest: dict[str, list[int]] = {}
        for leaf in fp.leaves:
            if leaf.block is None:
                sizes = rest.setdefault(rest_group_of(leaf.path, ancestors), [0, 0])
                sizes[0] += leaf.nbytes
                sizes[1] += padded(leaf)
        for name, (raw, pad) in rest.items():
            add(name, "rest", raw, pad, False)
        placed = sum(fp.blocks) + sum(raw for raw, _ in rest.values())
    else:
        for leaf in fp.leaves:
            add(leaf.path, "leaf", leaf.nbytes, padded(leaf), leaf.block is not None)
        placed = sum(leaf.nbytes for leaf in fp.leaves)
    return groups, max(fp.total_bytes - placed, 0)
