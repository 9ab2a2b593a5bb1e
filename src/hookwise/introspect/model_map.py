"""`describe(model) -> ModelMap`: one description of a model that every technique takes its targets from.

The map lists the towers (with each block's parameter and buffer bytes), the leaves (Linear, Conv,
Embedding) with their bytes, the modules that keep high precision and why, the attention and
feed-forward modules, and the known architecture. It works on models on the `meta` device: sizes
come from shapes and nothing is allocated.

Without example inputs the towers and roles come from static rules (structure, names, known
architectures). With example inputs, one forward is traced (`trace.py`) and the map follows what ran:
a block is a module that was called, an attention module is the innermost module in which attention
was computed and never a whole block. Towers and attention modules the user states (`towers=`,
`attention=`, module paths) win over both and are kept in `ModelMap.overrides`.

Inside `describe_cache()` (`_cache.py`; the planner holds one open per plan) the map of an unchanged
model is reused; traced maps (with example inputs) never are.
"""

from __future__ import annotations

import difflib
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from ..core.hooks import unwrap
from ..core.ledger import stated_map
from ..core.state import find_timestep_parameter
from ..errors import ConfigError
from ._cache import cached
from ._roles import LEAF_TYPES  # noqa: F401 - kept importable from here
from ._roles import ADAPTER_PART, attention_kind, holds_block_parts, is_attention, is_ffn, leaf_kind
from .architectures import Architecture, architecture_named, detect_architecture
from .paths import prefixes as _prefixes
from .precision import find_high_precision
from .towers import FoundTower, find_towers
from .trace import CallTrace, trace_calls


@dataclass(frozen=True)
class LeafInfo:
    path: str
    kind: str  # "linear" | "conv" | "embedding"
    cls: str
    shape: tuple[int, ...]  # weight shape
    dtype: str
    param_count: int
    param_bytes: int
    block: str | None  # the tower block holding it
    keep: str | None  # why it keeps high precision ("adapter" for LoRA layers), or None


@dataclass(frozen=True)
class BlockInfo:
    path: str
    index: int
    cls: str
    param_count: int
    param_bytes: int
    buffer_bytes: int
    leaves: int


@dataclass(frozen=True)
class TowerInfo:
    name: str
    container: str
    block_cls: str
    blocks: tuple[BlockInfo, ...]
    main: bool

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def param_bytes(self) -> int:
        return sum(b.param_bytes for b in self.blocks)

    @property
    def buffer_bytes(self) -> int:
        return sum(b.buffer_bytes for b in self.blocks)

    @property
    def block_paths(self) -> tuple[str, ...]:
        return tuple(b.path for b in self.blocks)


@dataclass(frozen=True)
class ModuleRole:
    path: str
    cls: str
    kind: str  # attention: "self" | "cross" | "joint" | "temporal"; ffn: "ffn"
    block: str | None


@dataclass(frozen=True)
class ModelMap:
    """What hookwise knows about a model's structure. Paths are `named_modules` paths ("" = the model)."""

    model_cls: str
    architecture: str | None
    towers: tuple[TowerInfo, ...]
    leaves: tuple[LeafInfo, ...]
    high_precision: dict[str, str]  # path -> reason, outermost matching module (or direct parameter)
    high_precision_bytes: dict[str, int]  # path -> parameter + buffer bytes under it
    attention: tuple[ModuleRole, ...]
    ffn: tuple[ModuleRole, ...]
    param_count: int
    param_bytes: int
    buffer_bytes: int
    dtype_bytes: dict[str, int]
    device: str
    timestep_arg: str | None
    notes: tuple[str, ...] = field(default=())
    traced: bool = False  # towers and roles were checked against a traced forward
    overrides: dict[str, tuple[str, ...]] = field(default_factory=dict)  # "towers" / "attention" -> stated paths

    # ---- towers and blocks --------------------------------------------------------------------
    @property
    def has_towers(self) -> bool:
        return bool(self.towers)

    @property
    def main_towers(self) -> tuple[TowerInfo, ...]:
        """The towers the model's denoising runs through, in call order (for known architectures)."""
        return tuple(t for t in self.towers if t.main)

    @property
    def blocks(self) -> tuple[BlockInfo, ...]:
        """Every block of every tower, main towers first, in call order."""
        main = [b for t in self.main_towers for b in t.blocks]
        rest = [b for t in self.towers if not t.main for b in t.blocks]
        return tuple(main + rest)

    @property
    def block_classes(self) -> tuple[str, ...]:
        """The repeated block classes, one entry each, in tower order."""
        return tuple(dict.fromkeys(t.block_cls for t in self.towers))

    def tower(self, name: str) -> TowerInfo:
        for t in self.towers:
            if t.name == name:
                return t
        raise ConfigError(f"the model has no tower {name!r}; its towers: {[t.name for t in self.towers]}")

    def block_of(self, path: str) -> str | None:
        """The tower block that holds the module at `path` (or is it), or None."""
        blocks = {b.path for t in self.towers for b in t.blocks}
        for prefix in reversed(_prefixes(path)):
            if prefix in blocks:
                return prefix
        return None

    @property
    def tower_bytes(self) -> int:
        return sum(t.param_bytes + t.buffer_bytes for t in self.towers)

    @property
    def outside_tower_bytes(self) -> int:
        """Parameter and buffer bytes outside every tower (embedders, output layers...)."""
        return self.param_bytes + self.buffer_bytes - self.tower_bytes

    # ---- precision ------------------------------------------------------------------------------
    def keep_reason(self, path: str) -> str | None:
        """Why the module or parameter at `path` keeps high precision (inherited from ancestors), or None."""
        for prefix in _prefixes(path):
            if prefix in self.high_precision:
                return self.high_precision[prefix]
        return None

    def castable_leaves(self, kinds: tuple[str, ...] = ("linear", "conv")) -> tuple[LeafInfo, ...]:
        """Leaves a storage-dtype technique may change: of the given kinds, not kept high precision."""
        return tuple(leaf for leaf in self.leaves if leaf.kind in kinds and leaf.keep is None)

    # ---- reporting ------------------------------------------------------------------------------
    def capabilities(self) -> list[dict[str, Any]]:
        """What the structure supports, for `hookwise inspect`."""
        mb = 1 / 2**20
        castable = self.castable_leaves()
        leaf_bytes = sum(leaf.param_bytes for leaf in self.leaves)
        cast_bytes = sum(leaf.param_bytes for leaf in castable)
        blocks = self.blocks
        kinds: dict[str, int] = {}
        for a in self.attention:
            kinds[a.kind] = kinds.get(a.kind, 0) + 1
        main = self.main_towers
        return [
            {
                "name": "block-level grouping",
                "available": bool(blocks),
                "detail": (
                    f"{len(blocks)} blocks in {len(self.towers)} tower(s), largest {max(b.param_bytes for b in blocks) * mb:.1f} MiB"
                    if blocks
                    else "no tower of repeated blocks found"
                ),
            },
            {
                "name": "leaf-level grouping",
                "available": bool(self.leaves),
                "detail": f"{len(self.leaves)} leaves, {leaf_bytes * mb:.1f} MiB",
            },
            {
                "name": "castable weights",
                "available": bool(castable),
                "detail": f"{len(castable)} leaves, {cast_bytes * mb:.1f} MiB "
                f"({100 * cast_bytes / max(self.param_bytes, 1):.0f}% of parameter bytes)",
            },
            {
                "name": "block step caches",
                "available": bool(main),
                "detail": (
                    f"first block {main[0].blocks[0].path}, last block {main[-1].blocks[-1].path}"
                    if main
                    else "needs a tower"
                ),
            },
            {
                "name": "attention reuse",
                "available": bool(self.attention),
                "detail": ", ".join(f"{n} {k}" for k, n in sorted(kinds.items())) or "no attention module found",
            },
            {
                "name": "timestep from signature",
                "available": self.timestep_arg is not None,
                "detail": f"argument {self.timestep_arg!r}" if self.timestep_arg else "forward takes no timestep",
            },
        ]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe dict of the whole map, with the capabilities and per-tower totals."""
        out = asdict(self)
        for tower, data in zip(self.towers, out["towers"]):
            data["num_blocks"] = tower.num_blocks
            data["param_bytes"] = tower.param_bytes
            data["buffer_bytes"] = tower.buffer_bytes
        out["capabilities"] = self.capabilities()
        out["block_classes"] = list(self.block_classes)
        out["outside_tower_bytes"] = self.outside_tower_bytes
        return out

    def __repr__(self) -> str:
        towers = ", ".join(f"{t.name}[{t.num_blocks}]" for t in self.towers) or "none"
        return (
            f"ModelMap({self.model_cls}, arch={self.architecture}, params={self.param_count:,}, "
            f"towers={towers}, leaves={len(self.leaves)}, high_precision={len(self.high_precision)})"
        )


# ---- building the map ---------------------------------------------------------------------------
def _tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _sizes(module: nn.Module) -> tuple[int, int, int]:
    """(parameter count, parameter bytes, buffer bytes) of `module`, shared tensors counted once."""
    seen: set[int] = set()
    count = pbytes = bbytes = 0
    for p in module.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            count += p.numel()
            pbytes += _tensor_bytes(p)
    for b in module.buffers():
        if id(b) not in seen:
            seen.add(id(b))
            bbytes += _tensor_bytes(b)
    return count, pbytes, bbytes


def _main_towers(found: list[FoundTower], arch: Architecture | None, notes: list[str]) -> list[str]:
    """Names of the main towers, in call order."""
    by_name = {t.name: t for t in found}
    if arch is not None:
        missing = [n for n in arch.towers if n not in by_name]
        if not missing:
            return list(arch.towers)
        notes.append(f"architecture {arch.name}: expected towers {missing} not found; main towers chosen by depth")
    if not found:
        return []
    depth = min(t.depth for t in found)
    return [t.name for t in found if t.depth == depth]


def _module_at(modules: dict[str, nn.Module], path: Any, what: str) -> nn.Module:
    """The module at a user-stated `path`, or a ConfigError naming the nearest paths."""
    if not isinstance(path, str) or path not in modules or not path:
        near = difflib.get_close_matches(str(path), [p for p in modules if p], n=5)
        hint = f" Nearest module paths: {near}." if near else ""
        raise ConfigError(
            f"describe({what}=[...]): the model has no module {path!r}; give paths as in "
            f"model.named_modules() (e.g. 'blocks' for a tower, 'blocks.0.attn' for an attention module).{hint}"
        )
    return modules[path]


def _stated_towers(
    modules: dict[str, nn.Module], paths: list[str], trace: CallTrace | None
) -> list[FoundTower]:
    """Towers the user stated: each path is the container whose children (those that ran, if traced) are the blocks."""
    found = []
    for path in paths:
        container = _module_at(modules, path, "towers")
        members = [
            (f"{path}.{n}", c) for n, c in container.named_children() if trace is None or trace.ran(f"{path}.{n}")
        ]
        if not members:
            raise ConfigError(
                f"describe(towers=[...]): {path!r} holds no blocks"
                + (" that ran in the traced forward" if trace is not None else "")
                + "; name the container (ModuleList, Sequential...) whose children are the blocks"
            )
        found.append(FoundTower(path, path, tuple(members)))
    return found


def _traced_roles(
    model: nn.Module, trace: CallTrace, block_set: set[str], block_of, notes: list[str]
) -> tuple[list[ModuleRole], list[ModuleRole]]:
    """Attention and feed-forward modules from a trace: attention where it ran innermost, never a whole block."""
    attention: list[ModuleRole] = []
    ffn: list[ModuleRole] = []
    claimed: set[str] = set()
    inline: list[str] = []
    for path, module in model.named_modules():
        if not path or not trace.ran(path) or claimed.intersection(_prefixes(path)[:-1]):
            continue
        if path in trace.attention:
            whole_block = path in block_set or any(b.startswith(path + ".") for b in block_set)
            if whole_block or holds_block_parts(module):
                inline.append(path)
                continue
            attention.append(ModuleRole(path, type(module).__name__, attention_kind(path, module), block_of(path)))
            claimed.add(path)
        elif is_ffn(path, module) and leaf_kind(module) is None and path not in block_set:
            if not any(a.startswith(path + ".") for a in trace.attention):
                ffn.append(ModuleRole(path, type(module).__name__, "ffn", block_of(path)))
                claimed.add(path)
    if inline:
        shown = ", ".join(inline[:4]) + (", ..." if len(inline) > 4 else "")
        notes.append(
            f"attention is computed inline in the forward of {len(inline)} module(s) that are whole blocks "
            f"({shown}): no attention module to target there"
        )
    return attention, ffn


def describe(
    model: nn.Module,
    example_inputs: Any = None,
    *,
    towers: list[str] | tuple[str, ...] | None = None,
    attention: list[str] | tuple[str, ...] | None = None,
    architecture: str | None = "auto",
    timestep_arg: str | None = None,
) -> ModelMap:
    """Map `model`: towers, blocks, leaves, high-precision modules, attention / FFN, architecture.

    `example_inputs` (a kwargs dict, an args tuple or one tensor, on the model's device, `meta`
    included) runs one traced forward, and the towers and attention modules are those that ran.
    `towers=` (container paths) and `attention=` (module paths) state them outright and win over the
    static rules and the trace; left out, they default to those stated when techniques were applied
    (`hookwise.apply(model, ..., towers=..., attention=...)`). `architecture="auto"` recognises known
    architectures; pass a name to force one, or None to map the model purely structurally.
    """
    model = unwrap(model)
    if not isinstance(model, nn.Module):
        raise ConfigError(f"describe() needs a torch.nn.Module, got {type(model).__name__}")
    def make() -> ModelMap:
        return _describe(model, example_inputs, towers, attention, architecture, timestep_arg)

    if example_inputs is not None:
        return make()
    stated = tuple(sorted((k, tuple(v)) for k, v in stated_map(model).items() if v is not None))
    args = tuple(tuple(v) if isinstance(v, (list, tuple)) else v for v in (towers, attention, architecture, timestep_arg))
    return cached(model, (args, stated), make)


def _describe(
    model: nn.Module,
    example_inputs: Any,
    towers: list[str] | tuple[str, ...] | None,
    attention: list[str] | tuple[str, ...] | None,
    architecture: str | None,
    timestep_arg: str | None,
) -> ModelMap:
    notes: list[str] = []
    modules = dict(model.named_modules())
    stated = stated_map(model)  # the map stated when techniques were applied: theirs and ours agree
    towers = stated.get("towers") if towers is None else towers
    attention = stated.get("attention") if attention is None else attention
    overrides: dict[str, tuple[str, ...]] = {}
    for key, value in (("towers", towers), ("attention", attention)):
        if value is not None:
            if isinstance(value, str) or not all(isinstance(p, str) for p in value):
                raise ConfigError(f"describe({key}=...) takes a list of module paths, got {value!r}")
            for path in value:
                _module_at(modules, path, key)
            overrides[key] = tuple(value)
    trace = trace_calls(model, example_inputs) if example_inputs is not None else None
    if architecture == "auto":
        arch = detect_architecture(model)
    elif architecture is None:
        arch = None
    else:
        arch = architecture_named(architecture)
        if not arch.matches(model):
            notes.append(f"architecture {arch.name} was forced on a {type(model).__name__}")

    if "towers" in overrides:
        found = _stated_towers(modules, list(overrides["towers"]), trace)
        main_names = [t.name for t in found]
    else:
        called = None
        if trace is not None:
            ran = {id(modules[p]) for p in trace.order}
            called = lambda m: id(m) in ran  # noqa: E731
        found = find_towers(model, called)
        main_names = _main_towers(found, arch, notes)
        if trace is not None and arch is None:
            first = trace.first_calls
            main_names.sort(key=lambda n: first[next(t for t in found if t.name == n).members[0][0]])
    order = {name: i for i, name in enumerate(main_names)}
    found.sort(key=lambda t: (0, order[t.name]) if t.name in order else (1, 0))
    if not found:
        notes.append("no tower of repeated blocks: block-level techniques are unavailable, leaf-level ones work")

    block_paths = [p for t in found for p, _ in t.members]
    high = find_high_precision(model, arch_patterns=arch.high_precision if arch else (), tower_blocks=block_paths)

    def keep_of(path: str) -> str | None:
        for prefix in _prefixes(path):
            if prefix in high:
                return high[prefix]
        return None

    block_set = set(block_paths)

    def block_of(path: str) -> str | None:
        for prefix in reversed(_prefixes(path)):
            if prefix in block_set:
                return prefix
        return None

    leaves: list[LeafInfo] = []
    leaf_count: dict[str, int] = {}
    attention_roles: list[ModuleRole] = []
    ffn: list[ModuleRole] = []
    inside_role: set[str] = set()
    for path, module in model.named_modules():
        kind = leaf_kind(module)
        if kind is not None:
            weight = getattr(module, "weight", None)
            count, pbytes, _ = _sizes(module)
            adapter = any(ADAPTER_PART.match(part) for part in path.split("."))
            block = block_of(path)
            leaves.append(
                LeafInfo(
                    path=path,
                    kind=kind,
                    cls=type(module).__name__,
                    shape=tuple(weight.shape) if isinstance(weight, torch.Tensor) else (),
                    dtype=str(weight.dtype).removeprefix("torch.") if isinstance(weight, torch.Tensor) else "",
                    param_count=count,
                    param_bytes=pbytes,
                    block=block,
                    keep="adapter" if adapter else keep_of(path),
                )
            )
            if block is not None:
                leaf_count[block] = leaf_count.get(block, 0) + 1
        if path and not inside_role.intersection(_prefixes(path)[:-1]):
            if is_attention(path, module, block_set):
                attention_roles.append(
                    ModuleRole(path, type(module).__name__, attention_kind(path, module), block_of(path))
                )
                inside_role.add(path)
            elif is_ffn(path, module) and kind is None:
                ffn.append(ModuleRole(path, type(module).__name__, "ffn", block_of(path)))
                inside_role.add(path)

    if trace is not None:
        attention_roles, ffn = _traced_roles(model, trace, block_set, block_of, notes)
    if "attention" in overrides:
        attention_roles = [
            ModuleRole(p, type(modules[p]).__name__, attention_kind(p, modules[p]), block_of(p))
            for p in overrides["attention"]
        ]

    tower_infos: list[TowerInfo] = []
    for t in found:
        blocks = []
        for index, (path, block) in enumerate(t.members):
            count, pbytes, bbytes = _sizes(block)
            blocks.append(BlockInfo(path, index, type(block).__name__, count, pbytes, bbytes, leaf_count.get(path, 0)))
        tower_infos.append(
            TowerInfo(t.name, t.container, type(t.members[0][1]).__name__, tuple(blocks), t.name in order)
        )
    params = dict(model.named_parameters())
    high_bytes: dict[str, int] = {}
    for path in high:
        if path in modules:
            _, p, b = _sizes(modules[path])
            high_bytes[path] = p + b
        elif path in params:
            high_bytes[path] = _tensor_bytes(params[path])

    count, pbytes, bbytes = _sizes(model)
    dtype_bytes: dict[str, int] = {}
    devices: set[str] = set()
    for tensor in list(model.parameters()) + list(model.buffers()):
        key = str(tensor.dtype).removeprefix("torch.")
        dtype_bytes[key] = dtype_bytes.get(key, 0) + _tensor_bytes(tensor)
        devices.add(tensor.device.type)

    if arch is not None and arch.timestep_arg is not None and timestep_arg is None:
        timestep_arg = arch.timestep_arg
    try:
        t_name, _ = find_timestep_parameter(model, timestep_arg)
    except ConfigError:
        t_name = None
        notes.append(f"timestep argument {timestep_arg!r} is not in the forward signature")

    return ModelMap(
        model_cls=type(model).__name__,
        architecture=arch.name if arch else None,
        towers=tuple(tower_infos),
        leaves=tuple(leaves),
        high_precision=high,
        high_precision_bytes=high_bytes,
        attention=tuple(attention_roles),
        ffn=tuple(ffn),
        param_count=count,
        param_bytes=pbytes,
        buffer_bytes=bbytes,
        dtype_bytes=dtype_bytes,
        device=",".join(sorted(devices)) or "none",
        timestep_arg=t_name,
        notes=tuple(notes),
        traced=trace is not None,
        overrides=overrides,
    )
