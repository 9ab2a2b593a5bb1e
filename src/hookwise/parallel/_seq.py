"""Where the token sequence is split and gathered: the sequence plan of a tower's blocks.

Context parallelism splits each main tower's token streams across the ranks when they enter the
tower's first block and gathers them when they leave its last block; code between towers (a
concatenation of text and image tokens, the final projection, an unpatchify) always sees whole
sequences. Every stream is cut into contiguous chunks, rank r taking chunk r (`tensor_split`:
uneven lengths work, the first ranks take one token more). Text tokens are split like image tokens:
attention is indifferent to the order of its keys, so each rank holding some of every stream is
exact, and no token is stored or attended twice.

A plan names, per argument of the entry block, how it follows the split:

- `Seq(dim)`: a token stream, split along `dim`.
- `Rope(dim, parts)`: a per-token tensor (or tuple of tensors: rotary cos / sin) laid out as the
  concatenation of the named streams in that order (FLUX's rotary table is `[text, image]`,
  HunyuanVideo's attention mask `[image, text]` on its last dim); each part is split like its
  stream and the local parts concatenated again, so every rank's rows are its own tokens' rows.
  A tensor of size 1 on `dim` broadcasts over the tokens and is left whole (LTX's `temb`, one row
  unless timesteps are given per token).
- `Tables(items)`: a tuple whose items follow different streams (Qwen-Image's rotary tables are
  `(image, text)`), one `Rope` per item.

Masks follow the split like any per-token table: a key-padding mask split with its keys is what
each rank's attention call needs, and context parallelism exchanges it with the keys.

Known architectures have their plan here; any other model takes the structural default: every 3-D
tensor argument `[batch, tokens, features]` with more than one token is a stream, an argument named
like a mask whose last dim is the length of exactly one stream follows that stream, a tuple or list
of tensors (rotary tables (cos, sin), [tokens, D] or [batch, tokens, D]) has each item split along
the one dim whose length is one stream's token count, and the rest is replicated. A tuple the
default cannot place for certain (two streams of that length, rows that could be several streams
concatenated, items that disagree) is refused naming the argument, never guessed. State a plan for a
model the default misreads with `ContextParallel(plan=...)`.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from ..errors import ConfigError, HookwiseError


@dataclass(frozen=True)
class Seq:
    dim: int = 1


@dataclass(frozen=True)
class Rope:
    dim: int
    parts: tuple[str, ...]


@dataclass(frozen=True)
class Tables:
    items: tuple[Rope, ...]


_FLUX = {"hidden_states": Seq(1), "encoder_hidden_states": Seq(1), "image_rotary_emb": Rope(0, ("encoder_hidden_states", "hidden_states"))}
_IMAGE, _TEXT = ("hidden_states",), ("encoder_hidden_states",)
PLANS: dict[str, dict[str, Any]] = {
    "flux": _FLUX,
    "wan": {"hidden_states": Seq(1), "encoder_hidden_states": Seq(1), "rotary_emb": Rope(1, _IMAGE)},
    # joint attention over [image, text] (both blocks), mask [B, 1, 1, image + text], rotary (cos, sin) [image, D]
    # (named freqs_cis by the double blocks, image_rotary_emb by the single ones)
    "hunyuanvideo": {
        "hidden_states": Seq(1), "encoder_hidden_states": Seq(1), "attention_mask": Rope(-1, _IMAGE + _TEXT),
        "image_rotary_emb": Rope(0, _IMAGE), "freqs_cis": Rope(0, _IMAGE),
    },
    # self-attention on the image with rotary (cos, sin) [B, image, D], cross-attention to the text with a
    # bias [B, 1, text]; temb [B, 1 | image, 6 D]
    "ltx-video": {
        "hidden_states": Seq(1), "encoder_hidden_states": Seq(1), "image_rotary_emb": Rope(1, _IMAGE),
        "encoder_attention_mask": Rope(-1, _TEXT), "temb": Rope(1, _IMAGE),
    },
    # joint attention, no rotary embedding (positions are added before the blocks)
    "sd3": {"hidden_states": Seq(1), "encoder_hidden_states": Seq(1)},
    # joint attention over [text, image]; rotary tables (image [N, D], text [T, D]); text mask [B, T]
    "qwen-image": {
        "hidden_states": Seq(1), "encoder_hidden_states": Seq(1), "encoder_hidden_states_mask": Rope(1, _TEXT),
        "image_rotary_emb": Tables((Rope(0, _IMAGE), Rope(0, _TEXT))), "modulate_index": Rope(1, _IMAGE),
    },
}  # fmt: skip


def _table_from_dict(name: str, spec: Any) -> Rope:
    if isinstance(spec, dict) and set(spec) == {"dim", "parts"} and isinstance(spec["parts"], (list, tuple)):
        if isinstance(spec["dim"], int) and not isinstance(spec["dim"], bool) and all(isinstance(p, str) for p in spec["parts"]):
            return Rope(spec["dim"], tuple(spec["parts"]))
    raise ConfigError(
        f"ContextParallel(plan={{{name!r}: {spec!r}}}): give a stream's split dimension (an int), "
        f"{{'dim': d, 'parts': [stream names in order]}} for a per-token table such as rotary embeddings or a "
        f"mask, or {{'items': [one such table per item]}} for a tuple whose items follow different streams"
    )


def plan_from_dict(raw: dict[str, Any]) -> dict[str, Any]:
    """{"arg": dim}, {"arg": {"dim": d, "parts": [...]}} or {"arg": {"items": [...]}} -> a plan (the config's
    serialisable form)."""
    plan: dict[str, Any] = {}
    for name, spec in raw.items():
        if isinstance(spec, int) and not isinstance(spec, bool):
            plan[name] = Seq(spec)
        elif isinstance(spec, dict) and set(spec) == {"items"} and isinstance(spec["items"], (list, tuple)) and spec["items"]:
            plan[name] = Tables(tuple(_table_from_dict(name, item) for item in spec["items"]))
        else:
            plan[name] = _table_from_dict(name, spec)
    return plan


def _table_dims(t: torch.Tensor, lengths: dict[str, int], batch: int | None) -> list[tuple[int, str]]:
    """(dim, stream) pairs where a per-token table's rows could be one stream's tokens: any dim but the last
    (the features), and not a leading batch dim."""
    out = []
    for d in range(max(t.dim() - 1, 0)):
        if d == 0 and t.dim() >= 3 and t.shape[0] == batch:
            continue
        out += [(d, s) for s, n in lengths.items() if t.shape[d] == n and n > 1]
    return out


def _tuple_tables(name: str, value: tuple | list, lengths: dict[str, int], batch: int | None) -> Tables | None:
    """The structural default for a tuple (or list) of tensors, such as rotary tables (cos, sin): each
    item split along the dim whose length is one stream's token count; None when no item has one (the
    tuple is replicated); a clear error naming the argument when the choice is not unique."""
    found = [_table_dims(t, lengths, batch) for t in value]
    total = sum(lengths.values())
    covers = [len(lengths) > 1 and any(t.shape[d] == total for d in range(max(t.dim() - 1, 0))) for t in value]
    if not any(found) and not any(covers):
        return None
    for matches, covers_all in zip(found, covers):
        if len(matches) != 1 or covers_all:
            shapes = [list(x.shape) for x in value]
            why = (
                "an item's rows could be the concatenation of several streams, in an order hookwise cannot know"
                if covers_all else "an item has no dim of any stream's length while others do" if not matches
                else f"an item fits several (dim, stream) pairs: {matches}"
            )  # fmt: skip
            raise HookwiseError(
                f"ContextParallel: cannot decide how the argument {name!r} (a {type(value).__name__} of tensors of "
                f"shapes {shapes}) follows the split of the streams {dict(lengths)}: {why}. State it with "
                f"ContextParallel(plan={{..., {name!r}: {{'items': [{{'dim': d, 'parts': [stream names in order]}}, "
                f"...]}}}}) (one entry per item), or {{'dim': d, 'parts': [...]}} for every item alike"
            )
    return Tables(tuple(Rope(m[0][0], (m[0][1],)) for m in found))


def _local(x: torch.Tensor, dim: int, rank: int, world: int) -> torch.Tensor:
    return x.tensor_split(world, dim=dim)[rank]


class Splitter:
    """Splits an entry block's arguments by its plan, for one rank of `world`."""

    def __init__(self, block: torch.nn.Module, plan: dict[str, Any] | None, rank: int, world: int) -> None:
        self.signature = inspect.signature(block.forward)
        self.plan = plan
        self.rank, self.world = rank, world
        # (whole value, its local part) of the entry's split arguments: the model passes the same
        # objects (rotary tables, a cross-attention context) to every block of the tower, and each
        # later block gets the local part in their place
        self.swaps: list[tuple[Any, Any]] = []

    def _streams(self, bound: dict[str, Any]) -> dict[str, Any]:
        if self.plan is not None:
            return self.plan
        tensors = {k: v for k, v in bound.items() if isinstance(v, torch.Tensor)}
        batch = next(iter(tensors.values())).shape[0] if tensors else None
        plan: dict[str, Any] = {
            k: Seq(1) for k, v in tensors.items() if v.dim() == 3 and v.shape[0] == batch and v.shape[1] > 1
        }
        lengths = {k: tensors[k].shape[1] for k in plan}
        for k, v in tensors.items():
            if k in plan or "mask" not in k.lower() or v.dim() < 2:
                continue
            follows = [s for s, n in lengths.items() if v.shape[-1] == n]
            if len(follows) == 1:  # a key-padding mask of one stream (two of that length: not guessed)
                plan[k] = Rope(-1, (follows[0],))
        for k, v in bound.items():
            if k not in plan and isinstance(v, (tuple, list)) and v and all(isinstance(t, torch.Tensor) for t in v):
                tables = _tuple_tables(k, v, lengths, batch)
                if tables is not None:
                    plan[k] = tables
        return plan

    def split(self, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        try:
            bound = self.signature.bind(*args, **kwargs)
        except TypeError as exc:
            raise HookwiseError(f"ContextParallel: the tower's first block was called with arguments its signature refuses ({exc})") from exc
        values = bound.arguments
        whole = dict(values)
        plan = self._streams(values)
        lengths: dict[str, int] = {}
        for name, spec in plan.items():
            value = values.get(name)
            if isinstance(spec, Seq) and isinstance(value, torch.Tensor):
                lengths[name] = value.shape[spec.dim]
                values[name] = _local(value, spec.dim, self.rank, self.world)
        for name, spec in plan.items():
            value = values.get(name)
            if isinstance(spec, Rope) and value is not None:
                values[name] = self._rope(name, spec, value, lengths)
            elif isinstance(spec, Tables) and isinstance(value, (tuple, list)):
                if len(value) != len(spec.items):
                    raise HookwiseError(
                        f"ContextParallel: {name} holds {len(value)} items, the plan names {len(spec.items)}; state the "
                        f"plan of this model with ContextParallel(plan=...)"
                    )
                values[name] = type(value)(self._rope(name, s, v, lengths) for s, v in zip(spec.items, value))
        self.swaps = [(whole[name], values[name]) for name in plan if name in values and values[name] is not whole[name]]
        return bound.args, bound.kwargs

    def substitute(self, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """A later block's arguments with the entry's whole values replaced by their local parts."""

        def local(value: Any) -> Any:
            for whole, part in self.swaps:
                if value is whole:
                    return part
            return value

        return tuple(local(a) for a in args), {k: local(v) for k, v in kwargs.items()}

    def done(self) -> None:
        self.swaps = []

    def _rope(self, name: str, spec: Rope, value: Any, lengths: dict[str, int]) -> Any:
        if isinstance(value, (tuple, list)):
            return type(value)(self._rope(name, spec, v, lengths) for v in value)
        if not isinstance(value, torch.Tensor):
            return value
        missing = [p for p in spec.parts if p not in lengths]
        total = sum(lengths.get(p, 0) for p in spec.parts)
        if not -value.dim() <= spec.dim < value.dim():
            raise HookwiseError(
                f"ContextParallel: {name} has {value.dim()} dims, the plan splits its dim {spec.dim}; state the plan "
                f"of this model with ContextParallel(plan=...)"
            )
        if value.shape[spec.dim] == 1 and total != 1:
            return value  # one row for every token: it broadcasts
        if missing or value.shape[spec.dim] != total:
            raise HookwiseError(
                f"ContextParallel: {name} has {value.shape[spec.dim]} rows on dim {spec.dim}, the plan says it covers "
                f"{list(spec.parts)} ({total} tokens{'; not streams here: ' + str(missing) if missing else ''}); "
                f"state the plan of this model with ContextParallel(plan=...)"
            )
        parts = value.split([lengths[p] for p in spec.parts], dim=spec.dim)
        return torch.cat([_local(p, spec.dim, self.rank, self.world) for p in parts], dim=spec.dim)


def gather_output(out: Any, group, world: int, traffic=None, dim: int = 1) -> Any:
    """Every 3-D-or-more tensor of a tower's output gathered along `dim` (rank order: the original order)."""
    if isinstance(out, torch.Tensor):
        if out.dim() < 3:
            return out
        return _gather(out, group, world, dim, traffic)
    if isinstance(out, (tuple, list)):
        return type(out)(gather_output(o, group, world, traffic, dim) for o in out)
    return out


def _gather(x: torch.Tensor, group, world: int, dim: int, traffic) -> torch.Tensor:
    local = torch.tensor([x.shape[dim]], dtype=torch.int64, device=x.device)
    sizes = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(sizes, local, group=group)
    sizes = [int(s.item()) for s in sizes]
    top = max(sizes)
    if x.shape[dim] < top:
        pad = list(x.shape)
        pad[dim] = top - x.shape[dim]
        x = torch.cat([x, x.new_zeros(pad)], dim=dim)
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x, group=group)
    if traffic is not None:
        traffic.add("gather", x.numel() * x.element_size() * (world - 1))
    return torch.cat([p.narrow(dim, 0, n) for p, n in zip(parts, sizes)], dim=dim)
