"""Context parallelism: one sampling step's tokens split across processes, attention exchanged.

Every rank holds the whole model and runs the same call; each main tower's token streams are split
across the ranks where they enter the tower and gathered where they leave it (`_seq.py`: the plan,
uneven lengths, rotary tables following the split). Inside a tower every per-token computation runs
on the rank's own tokens; only attention needs the others', in one of three ways:

- Ulysses (`ulysses=N`): an all-to-all turns "all heads, my tokens" into "my heads, all tokens", the
  rank computes ordinary attention for its heads (through whatever attention backend is applied:
  this technique's hook sits inside the backends' hook, `Layer.PARALLEL_ATTENTION`), and a second
  all-to-all turns the result back. Two exchanges of q/k/v/out per call; heads need not divide evenly.
- Ring (`ring=N`): queries stay, K/V blocks travel around the ring while the rank attends to the one
  it holds, and the partial results merge by log-sum-exp (`_ring.py`). Any head count. Each step is
  an ordinary attention call, so the applied backend serves it too; its log-sum-exp comes from the
  kernel when the kernel returns one, and is computed otherwise (one warning says so).
- Both (`ulysses=U, ring=R`, U x R = the world): Ulysses inside groups of U consecutive ranks, ring
  across the groups (a 2-D mesh; `mesh=` takes a `DeviceMesh` with dims "ring" and "ulysses").

Key-padding masks (a text mask: the same for every query) follow the split like the keys: the
plan splits the mask argument with its streams, each attention call's mask then covers the rank's
own keys, and the ranks exchange their masks (small: one value per key) so Ulysses' local attention
and every ring step see the mask of the keys they attend to. The exchange runs once per distinct
mask per forward: a call whose mask is one this forward already exchanged (the same tensor at the
same version, or equal values) on every rank reuses it, which the ranks agree on through the token
counts they exchange anyway (no extra collective). A mask that differs between queries (causal,
block-sparse) is refused with the reason.

A step cache under context parallelism sees each rank's tokens; its decision statistic is reduced
across the ranks (the run state's `reduce_decisions`, one all-reduce of the cache's scalars per
decision), so every rank skips the same steps. Sampling only: the exchanges have no backward here.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from ..core.config import TechniqueConfig, check_int
from ..core.hooks import Layer, ModelHook, add_hook, hooks_named, iter_registries, remove_hook, unwrap
from ..core.state import attach_run_state, get_run_state
from ..core.techniques import apply_techniques, register_technique, remove_techniques
from ..errors import ConfigError, HookwiseError, NoTargetError
from ..introspect.model_map import describe
from ..introspect.sites import attention_sites
from ._dist import cfg_mesh_groups, group_of
from ._ring import ring_attention
from ._seq import PLANS, Splitter, gather_output, plan_from_dict
from ._ulysses import Traffic, gather_heads, head_sizes, scatter_heads

NAME = "context_parallel"
SPLIT_HOOK = "hookwise.context_parallel.split"
ATTN_HOOK = "hookwise.context_parallel.attention"
_SDPA = {F.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention}


@dataclass(frozen=True)
class ContextParallel(TechniqueConfig):
    """Split each sampling step's tokens across processes; attention by Ulysses, ring, or both.

    - `ulysses`, `ring`: the degrees; their product is the group's size. Give one and the other
      fills the group; give neither for Ulysses over the whole group.
    - `group`: the torch.distributed process group (None: the default world). `mesh`: a 2-D
      `DeviceMesh` with dims "ring" and "ulysses" instead. Neither is saved with the config.
    - `cfg`: 2 beside `CFGParallel(context=N)` on a world of 2 x N ranks (CFG-major: ranks [0, N) hold
      one CFG half, [N, 2N) the other): the sequence is split over the N ranks of this rank's half.
      Saved with the config (the stack the planner writes carries the split); 1: no CFG split.
    - `plan`: how the towers' first blocks' arguments follow the split, for a model whose
      architecture hookwise does not know and the structural default misreads: {"arg": split dim}
      for token streams, {"arg": {"dim": d, "parts": [streams in order]}} for per-token tables such
      as rotary embeddings (see `hookwise.parallel._seq`).
    """

    ulysses: int | None = None
    ring: int | None = None
    group: Any = field(default=None, compare=False)
    mesh: Any = field(default=None, compare=False)
    plan: dict | None = None
    cfg: int = 1

    def validate(self) -> None:
        check_int("ContextParallel.ulysses", self.ulysses, 1, optional=True)
        check_int("ContextParallel.ring", self.ring, 1, optional=True)
        check_int("ContextParallel.cfg", self.cfg, 1)
        if self.group is not None and self.mesh is not None:
            raise ConfigError("ContextParallel: give group= or mesh=, not both")
        if self.cfg not in (1, 2):
            raise ConfigError(
                f"ContextParallel(cfg={self.cfg}): CFG parallelism has degree 2; use cfg=2 beside CFGParallel(context=N), or 1"
            )
        if self.cfg > 1 and (self.group is not None or self.mesh is not None):
            raise ConfigError(
                "ContextParallel(cfg=2) builds its group from the world's 2 x N split; give cfg= or group= / mesh=, not both"
            )
        if self.plan is not None:
            if not isinstance(self.plan, dict) or not self.plan:
                raise ConfigError(f"ContextParallel(plan={self.plan!r}): give a dict from argument names to split specs")
            plan_from_dict(self.plan)

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict() if self.group is None and self.mesh is None else self.replace(group=None, mesh=None).to_dict()
        out.pop("group", None)
        out.pop("mesh", None)
        return out

    def __hash__(self) -> int:
        return hash((type(self), self.ulysses, self.ring, repr(self.plan), self.cfg))

    def refuses_to_follow(self, earlier: TechniqueConfig) -> str | None:
        return _mesh_mismatch(earlier, self) if getattr(earlier, "technique", None) == "cfg_parallel" else None

    def refuses_to_precede(self, later: TechniqueConfig) -> str | None:
        return _mesh_mismatch(later, self) if getattr(later, "technique", None) == "cfg_parallel" else None


def _mesh_mismatch(cfg: Any, cp: ContextParallel) -> str | None:
    """Why CFGParallel `cfg` and ContextParallel `cp` do not split the world the same way, or None."""
    context = getattr(cfg, "context", 1)
    if context > 1 and cp.cfg == 1:
        return (f"CFGParallel(context={context}) gives each CFG half {context} ranks, so context parallelism must split "
                f"the sequence within a half: use ContextParallel(..., cfg=2)")  # fmt: skip
    if cp.cfg > 1 and context == 1 and getattr(cfg, "group", None) is None:
        return ("ContextParallel(cfg=2) splits the sequence within a CFG half of a 2 x N world, so CFG parallelism must "
                "pair the halves across it: use CFGParallel(context=N)")  # fmt: skip
    degrees = [d for d in (cp.ulysses, cp.ring) if d]
    product = math.prod(degrees)
    if context > 1 and degrees and (product != context if len(degrees) == 2 else context % product):
        return (f"CFGParallel(context={context}) gives each CFG half {context} ranks, ContextParallel(ulysses={cp.ulysses}, "
                f"ring={cp.ring}) does not fill them")  # fmt: skip
    return None


# ---- the process layout -----------------------------------------------------------------------------
@dataclass
class Layout:
    """The groups one rank works in: the whole context-parallel group, its Ulysses group and ring."""

    group: Any
    rank: int  # in `group`: the index of this rank's chunk of every stream
    size: int
    ulysses: int
    ring: int
    u_group: Any = None
    r_group: Any = None

    @property
    def u_rank(self) -> int:
        return self.rank % self.ulysses

    @property
    def r_rank(self) -> int:
        return self.rank // self.ulysses


def _degrees(config: ContextParallel, size: int) -> tuple[int, int]:
    u, r = config.ulysses, config.ring
    if u is None and r is None:
        u, r = size, 1
    elif u is None:
        u = size // r if size % r == 0 else 0
    elif r is None:
        r = size // u if size % u == 0 else 0
    if u * r != size:
        raise HookwiseError(
            f"ContextParallel(ulysses={config.ulysses}, ring={config.ring}): the degrees must multiply to the group's "
            f"size, {size} processes here"
        )
    return u, r


def _layout(config: ContextParallel) -> Layout:
    if config.cfg > 1:  # this rank's CFG half of the world's 2 x N split
        config = config.replace(cfg=1, group=cfg_mesh_groups(config.cfg, "context", "ContextParallel", f"cfg={config.cfg}"))
    if config.mesh is not None:
        mesh = config.mesh
        names = tuple(getattr(mesh, "mesh_dim_names", None) or ())
        if mesh.ndim != 2 or set(names) != {"ring", "ulysses"}:
            raise HookwiseError(f"ContextParallel(mesh=...): use a 2-D DeviceMesh with dims named 'ring' and 'ulysses', got {names or mesh.ndim}")
        info = group_of(None, "ContextParallel")
        if mesh.size() != info.size:
            raise HookwiseError(f"ContextParallel(mesh=...): the mesh holds {mesh.size()} ranks, the world {info.size}; use a mesh over the whole world")
        u, r = mesh.size(names.index("ulysses")), mesh.size(names.index("ring"))
        if config.ulysses not in (None, u) or config.ring not in (None, r):
            raise HookwiseError(f"ContextParallel: the mesh is ulysses={u} x ring={r}, the config says ulysses={config.ulysses}, ring={config.ring}")
        ranks = mesh.mesh.permute(names.index("ring"), names.index("ulysses")).reshape(-1)
        if ranks.tolist() != list(range(info.size)):
            raise HookwiseError(
                f"ContextParallel(mesh=...): the mesh must hold the world's ranks in order, ring-major ({ranks.tolist()} "
                f"here), so each rank's share of the tokens is its rank's; build it with init_device_mesh(device, (ring, "
                f"ulysses), mesh_dim_names=('ring', 'ulysses'))"
            )
        return Layout(None, info.rank, info.size, u, r, mesh.get_group("ulysses"), mesh.get_group("ring"))
    info = group_of(config.group, "ContextParallel")
    u, r = _degrees(config, info.size)
    layout = Layout(config.group, info.rank, info.size, u, r)
    if u == info.size:
        layout.u_group = config.group
    if r == info.size:
        layout.r_group = config.group
    if 1 < u < info.size:
        # every rank creates every subgroup, in the same order (torch.distributed's rule for new_group)
        members = [dist.get_global_rank(config.group, i) if config.group is not None else i for i in range(info.size)]
        for k in range(r):
            g = dist.new_group(members[k * u : (k + 1) * u])
            if k == layout.r_rank:
                layout.u_group = g
        for j in range(u):
            g = dist.new_group(members[j::u])
            if j == layout.u_rank:
                layout.r_group = g
    return layout


# ---- attention ----------------------------------------------------------------------------------------
def _sdpa_args(args: tuple, kwargs: dict) -> dict[str, Any]:
    names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
    call = dict(zip(names, args))
    call.update(kwargs)
    return call


def _key_mask(mask: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """The call's mask as a key-padding mask [b|1, h|1, 1, local keys], or a clear error."""
    if mask.dim() > 4:
        raise HookwiseError(f"ContextParallel: an attention mask of {mask.dim()} dims; SDPA takes at most 4")
    while mask.dim() < 4:  # SDPA broadcasts from the right
        mask = mask.unsqueeze(0)
    if mask.shape[-1] != k.shape[2]:
        raise HookwiseError(
            f"ContextParallel: this attention call's mask covers {mask.shape[-1]} keys, this rank holds {k.shape[2]}: "
            "the mask did not follow the split. Name the argument that carries it in ContextParallel(plan=...) as a "
            "per-token table of the streams its keys come from ({'arg': {'dim': -1, 'parts': [...]}})"
        )
    if mask.shape[-2] != 1:
        if not bool((mask == mask[..., :1, :]).all()):
            raise HookwiseError(
                "ContextParallel: this attention call's mask differs between queries (causal or block-sparse); the split "
                "sequence supports key-padding masks (the same for every query), as the diffusion transformers' text "
                "masks are; remove ContextParallel for this model"
            )
        mask = mask[..., :1, :]
    if mask.shape[1] not in (1, q.shape[1]) or mask.shape[0] not in (1, q.shape[0]):
        raise HookwiseError(f"ContextParallel: a mask of shape {list(mask.shape)} for queries {list(q.shape)}")
    return mask


@dataclass
class Record:
    """One application: the layout, the bytes sent, the calls exchanged."""

    layout: Layout
    traffic: Traffic = field(default_factory=Traffic)
    calls: int = 0
    lse_computed: int = 0  # ring steps whose kernel gave no log-sum-exp (computed instead)
    warned: bool = False
    mask_exchanges: int = 0  # mask all-gathers run
    masks_reused: int = 0  # masked calls served by this forward's earlier exchange
    # This forward's exchanged masks: (the call's mask, its version, the key mask, every ring block's mask).
    # Emptied when a forward enters the first tower, so it holds at most a forward's distinct masks.
    mask_cache: list[tuple[torch.Tensor, int, torch.Tensor, list[torch.Tensor]]] = field(default_factory=list)

    def new_forward(self) -> None:
        self.mask_cache.clear()

    def _cached_mask(self, raw: torch.Tensor | None, mask: torch.Tensor | None) -> int:
        """The index of this forward's exchanged mask equal to this call's (the same tensor at the same
        version, or equal values), -1 if none. Every rank sends its index with the call's token counts and
        the exchange is skipped only when all ranks found the same entry, so the ranks never disagree on
        whether the collective runs."""
        if mask is None:
            return -1
        for i, (seen, version, key, _) in enumerate(self.mask_cache):
            if seen is raw and version == raw._version:
                return i
        for i, (_, _, key, _) in enumerate(self.mask_cache):
            if key.shape == mask.shape and key.dtype == mask.dtype and key.device == mask.device and torch.equal(key, mask):
                return i
        return -1

    def _lse_computed(self, kernels: list[str]) -> None:
        self.lse_computed += 1
        if not self.warned:
            self.warned = True
            seen = ", ".join(dict.fromkeys(kernels)) or "PyTorch's math kernel or another library's"
            warnings.warn(
                f"hookwise ContextParallel (ring): the attention kernel that served a ring step returns no log-sum-exp "
                f"(ran: {seen}); the ring computes it in float32 from q and k instead (one more q k^T product per "
                f"step). The output is exact; for speed, use a backend whose kernel returns it (sdpa-flash, "
                f"sdpa-efficient, or the model's own call)",
                stacklevel=2,
            )

    def _gather_masks(self, mask: torch.Tensor, k_tokens: list[int]) -> list[torch.Tensor]:
        """Every rank's key mask, in rank order (padded to the longest for the exchange)."""
        lay = self.layout
        kind = mask.dtype
        wire = mask.to(torch.uint8) if kind == torch.bool else mask.contiguous()  # gloo moves no bools
        top = max(k_tokens)
        if wire.shape[-1] < top:
            pad = list(wire.shape)
            pad[-1] = top - wire.shape[-1]
            wire = torch.cat([wire, wire.new_zeros(pad)], dim=-1)
        parts = [torch.empty_like(wire) for _ in range(lay.size)]
        dist.all_gather(parts, wire.contiguous(), group=lay.group)
        self.traffic.add("mask", wire.numel() * wire.element_size() * (lay.size - 1))
        return [p[..., :n].to(kind) for p, n in zip(parts, k_tokens)]

    def attend(self, args: tuple, kwargs: dict) -> torch.Tensor:
        lay = self.layout
        if lay.size == 1:
            return F.scaled_dot_product_attention(*args, **kwargs)
        call = _sdpa_args(args, kwargs)
        q, k, v = call["query"], call["key"], call["value"]
        if call.get("is_causal") or call.get("dropout_p", 0.0):
            raise HookwiseError(
                "ContextParallel: this attention call is causal or uses dropout; the split sequence supports "
                "non-causal attention without dropout (the diffusion transformers' self- and cross-attention), with "
                "or without a key-padding mask; remove ContextParallel for this model"
            )
        if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
            raise HookwiseError(
                "ContextParallel is for sampling: its exchanges have no backward; run the model under "
                "torch.no_grad() (or torch.inference_mode()), or train with data parallelism"
            )
        if q.dim() != 4:
            raise HookwiseError(f"ContextParallel: attention on {q.dim()}-D queries; expected [batch, heads, tokens, head_dim]")
        raw = mask = call.get("attn_mask")
        if mask is not None:
            mask = _key_mask(mask, q, k)
        if k.shape[1] != q.shape[1]:  # grouped-query attention: each rank needs its query heads' keys
            k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
            v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
        scale = call.get("scale") or 1.0 / math.sqrt(q.shape[-1])
        self.calls += 1
        cached = self._cached_mask(raw, mask)
        local = torch.tensor([q.shape[2], k.shape[2], cached], dtype=torch.int64, device=q.device)
        table = [torch.empty_like(local) for _ in range(lay.size)]
        dist.all_gather(table, local, group=lay.group)
        table = [t.tolist() for t in table]
        heads = q.shape[1]
        # each ring member's block of keys: the keys of its Ulysses group's ranks, in rank order
        members = [[j * lay.ulysses + i for i in range(lay.ulysses)] for j in range(lay.ring)]
        masks = None
        if mask is not None and cached >= 0 and all(row[2] == cached for row in table):
            masks = self.mask_cache[cached][3]  # every rank holds the mask it sent before: no exchange
            self.masks_reused += 1
        elif mask is not None:
            every = self._gather_masks(mask, [row[1] for row in table])
            self.mask_exchanges += 1
            if mask.shape[1] > 1 and lay.ulysses > 1:  # per-head masks: this rank's heads after the exchange
                start = sum(head_sizes(heads, lay.ulysses)[: lay.u_rank])
                every = [m.narrow(1, start, head_sizes(heads, lay.ulysses)[lay.u_rank]) for m in every]
            masks = [torch.cat([every[r] for r in ranks], dim=-1) for ranks in members]
            self.mask_cache.append((raw, raw._version, mask.clone(), masks))  # a copy: the caller may write into it
        u0 = lay.r_rank * lay.ulysses
        q_tokens = [table[u0 + i][0] for i in range(lay.ulysses)]
        if lay.ulysses > 1:
            k_tokens = [table[u0 + i][1] for i in range(lay.ulysses)]
            q = scatter_heads(q.contiguous(), q_tokens, lay.u_group, lay.u_rank, self.traffic)
            k = scatter_heads(k.contiguous(), k_tokens, lay.u_group, lay.u_rank, self.traffic)
            v = scatter_heads(v.contiguous(), k_tokens, lay.u_group, lay.u_rank, self.traffic)
        if lay.ring > 1:
            kv = [sum(table[r][1] for r in ranks) for ranks in members]
            out = ring_attention(q, k, v, scale, kv, lay.r_group, lay.r_rank, self.traffic, masks, self._lse_computed)
        else:  # the applied backend, if any, serves it (its mode is below this one)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=masks[0] if masks else None, scale=scale)
        if lay.ulysses > 1:
            out = gather_heads(out, q_tokens, heads, lay.u_group, lay.u_rank, self.traffic)
        return out


class _Exchange(TorchFunctionMode):
    def __init__(self, record: Record) -> None:
        super().__init__()
        self.record = record

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _SDPA:
            return self.record.attend(args, kwargs)
        return func(*args, **kwargs)


class AttentionHook(ModelHook):
    """On one attention site of a tower: its attention calls see every rank's tokens."""

    layer = Layer.PARALLEL_ATTENTION

    def __init__(self, record: Record) -> None:
        self.record = record

    @torch.compiler.disable
    def new_forward(self, module: nn.Module, next_fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        with _Exchange(self.record):
            return next_fn(*args, **kwargs)


class SplitHook(ModelHook):
    """On every block of a tower: the first splits its streams, the others take the local parts of the
    values the model passes to every block, the last gathers its outputs."""

    layer = Layer.PARALLEL_SPLIT

    def __init__(self, record: Record, splitter: Splitter, entry: bool, exit: bool, first: bool = False) -> None:
        self.record = record
        self.splitter = splitter
        self.entry, self.exit = entry, exit
        self.first = first  # the first tower's entry: a new forward begins

    @torch.compiler.disable
    def new_forward(self, module: nn.Module, next_fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        lay = self.record.layout
        if lay.size == 1:
            return next_fn(*args, **kwargs)
        if self.entry:
            if self.first:
                self.record.new_forward()
            args, kwargs = self.splitter.split(args, kwargs)
        else:
            args, kwargs = self.splitter.substitute(args, kwargs)
        out = next_fn(*args, **kwargs)
        if self.exit:
            self.splitter.done()
            out = gather_output(out, lay.group, lay.size, self.record.traffic)
        return out


# ---- apply / remove -----------------------------------------------------------------------------------
def _sites(model: nn.Module, model_map) -> list[str]:
    """The attention sites inside the main towers' blocks (a block itself when none is found inside it)."""
    found = attention_sites(model, model_map)
    sites = []
    for tower in model_map.main_towers:
        for block in tower.blocks:
            inside = [p for p in found if p == block.path or p.startswith(block.path + ".")]
            sites += inside or [block.path]
    return sites


def _reducer(layout: Layout) -> Callable[[torch.Tensor], torch.Tensor]:
    def reduce(values: torch.Tensor) -> torch.Tensor:
        values = values.clone()
        dist.all_reduce(values, group=layout.group)
        return values / layout.size  # the mean over ranks (gloo has no AVG)

    return reduce


def _apply_context_parallel(model: nn.Module, config: ContextParallel) -> None:
    model = unwrap(model)
    model_map = describe(model)
    if not model_map.main_towers:
        raise NoTargetError(
            f"ContextParallel: {type(model).__name__} has no tower of repeated blocks to split the sequence over "
            f"(see hookwise.describe(model)); state them with hookwise.apply(model, ContextParallel(), towers=[...])"
        )
    layout = _layout(config)
    arch = model_map.architecture
    plan = plan_from_dict(config.plan) if config.plan is not None else PLANS.get(arch) if arch else None
    record = Record(layout)
    for t, tower in enumerate(model_map.main_towers):
        paths = [b.path for b in tower.blocks]
        splitter = Splitter(model.get_submodule(paths[0]), plan, layout.rank, layout.size)
        for i, path in enumerate(paths):
            hook = SplitHook(record, splitter, entry=i == 0, exit=i == len(paths) - 1, first=t == 0 and i == 0)
            add_hook(model.get_submodule(path), hook, SPLIT_HOOK)
    for path in dict.fromkeys(_sites(model, model_map)):
        add_hook(model.get_submodule(path), AttentionHook(record), ATTN_HOOK)
    attach_run_state(model).state.reduce_decisions = _reducer(layout) if layout.size > 1 else None


def _remove_context_parallel(model: nn.Module, config: ContextParallel | None = None) -> int:
    model = unwrap(model)
    count = 0
    for _, registry in list(iter_registries(model)):
        for name in (SPLIT_HOOK, ATTN_HOOK):
            if name in registry:
                remove_hook(registry.module, name)
                count += 1
    state = get_run_state(model)
    if state is not None:
        state.reduce_decisions = None
    return count


def apply_context_parallel(model: nn.Module, config: ContextParallel | None = None, **kwargs: Any) -> None:
    """Split the model's tokens across processes (`hookwise.apply(model, ContextParallel(...))`)."""
    apply_techniques(model, [config or ContextParallel(**kwargs)])


def remove_context_parallel(model: nn.Module) -> list[str]:
    """Remove context parallelism (the same as `hookwise.remove(model, "context_parallel")`)."""
    return remove_techniques(model, [NAME])


def context_parallel_stats(model: nn.Module) -> dict[str, Any]:
    """{"ulysses", "ring", "world", "attention_calls", "sent_bytes": {kind: bytes this rank sent},
    "lse_computed": ring steps whose attention kernel returned no log-sum-exp (computed instead),
    "mask_exchanges": masks all-gathered, "masks_reused": masked calls that reused this forward's exchange}."""
    hooks = hooks_named(model, ATTN_HOOK, AttentionHook)
    if not hooks:
        return {}
    record = next(iter(hooks.values())).record
    lay = record.layout
    return {
        "world": lay.size, "ulysses": lay.ulysses, "ring": lay.ring, "attention_calls": record.calls,
        "sent_bytes": dict(record.traffic.bytes), "lse_computed": record.lse_computed,
        "mask_exchanges": record.mask_exchanges, "masks_reused": record.masks_reused,
    }  # fmt: skip


register_technique(
    NAME,
    ContextParallel,
    apply=_apply_context_parallel,
    remove=_remove_context_parallel,
    layer=Layer.PARALLEL_SPLIT,
    description="context parallelism: tokens split across processes, attention by Ulysses all-to-all and / or ring",
)
