"""LoRA files every tool reads: save and load LoRA weights as safetensors in the formats people exchange.

Formats (`format=` / `target_format=`):

- ``"diffusers"``: ``transformer.<module>.lora_A.weight`` / ``lora_B.weight`` with the model's own module
  names; alphas in the safetensors metadata under ``lora_adapter_metadata`` (a PEFT ``LoraConfig`` as
  JSON, which diffusers' ``load_lora_adapter`` / ``load_lora_weights`` read).
- ``"peft"``: the same tensors under ``base_model.model.<module>`` (PEFT's ``adapter_model`` layout).
- ``"kohya"``: kohya / musubi-tuner keys ``lora_unet_<name with _ for .>.lora_down.weight`` /
  ``lora_up.weight`` / ``.alpha``; for an architecture with an original-names table (FLUX, Wan) the
  names are the original ones (BFL ``double_blocks_0_img_attn_qkv``, Wan ``blocks_0_self_attn_q``).
- ``"bfl"``: the original module names with ``lora_A`` / ``lora_B`` keys and ``.alpha`` tensors (BFL
  names for FLUX, the reference-code names for Wan).

Alpha is kept, never folded: a module's LoRA delta is ``up @ down * alpha / rank`` in every format, and a
missing alpha means ``alpha == rank``. Where one original module is several model modules (FLUX's fused
``qkv``), saving concatenates: the downs are stacked (rank ``n*r``, alpha ``n*alpha``) and the up is
block-diagonal, so loading splits it back exactly; a fused LoRA trained as one (dense up) splits into
parts that share the down, as diffusers' converter does. Both are exact, no arithmetic on values.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Mapping

import torch
from torch import nn

from ..errors import ConfigError, NoTargetError, require
from ..introspect.architectures import ARCHITECTURES, Architecture, architecture_named, detect_architecture
from ..introspect.lora_keys import OriginalGroup, group_of_module, group_of_original

FORMATS = ("diffusers", "peft", "kohya", "bfl")
METADATA_KEY = "lora_adapter_metadata"  # the key diffusers reads a LoraConfig from
_PREFIXES = ("base_model.model.", "transformer.", "diffusion_model.")
_KOHYA_PREFIXES = ("lora_unet_", "lora_transformer_")
# key suffix -> role ("down" / "up" weight, or the alpha) in each key style
_PEFT_SUFFIXES = ((".lora_A.weight", "down"), (".lora_B.weight", "up"), (".alpha", "alpha"))
_KOHYA_SUFFIXES = ((".lora_down.weight", "down"), (".lora_up.weight", "up"), (".alpha", "alpha"))
_SHOWN = 8  # unmatched keys listed in an error


@dataclass
class LoraWeights:
    """One module's LoRA: delta = up @ down * alpha / rank (alpha None means alpha == rank)."""

    down: torch.Tensor  # [rank, in_features, ...]
    up: torch.Tensor  # [out_features, rank, ...]
    alpha: float | None = None

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def scale(self) -> float:
        return 1.0 if self.alpha is None else self.alpha / self.rank


Lora = dict[str, LoraWeights]  # model module name -> weights


# ---------------------------------------------------------------------------------------------- reading


def lora_from_model(model: nn.Module, adapter_name: str = "default") -> Lora:
    """The LoRA weights of a PEFT adapter injected in `model` (peft `inject_adapter_in_model`,
    diffusers `add_adapter` / `load_lora_adapter`, or a `PeftModel`), keyed by module name."""
    found: Lora = {}
    for name, module in model.named_modules():
        lora_a = getattr(module, "lora_A", None)
        if not isinstance(lora_a, nn.ModuleDict) or adapter_name not in lora_a:
            continue
        if module.scaling[adapter_name] != module.lora_alpha[adapter_name] / module.r[adapter_name]:
            raise ConfigError(
                f"module {name!r} scales its LoRA by {module.scaling[adapter_name]}, not alpha / rank (rsLoRA?): "
                "the exchange formats cannot express that; train with use_rslora=False."
            )
        for prefix in ("base_model.model.",):
            name = name.removeprefix(prefix)
        found[name] = LoraWeights(
            lora_a[adapter_name].weight.detach(),
            module.lora_B[adapter_name].weight.detach(),
            float(module.lora_alpha[adapter_name]),
        )
    if not found:
        raise NoTargetError(
            f"the model has no LoRA adapter named {adapter_name!r}; add one (peft / diffusers add_adapter) "
            "or pass its name as adapter_name="
        )
    return found


def _alphas_from_metadata(metadata: Mapping[str, str] | None) -> tuple[float | None, dict[str, float]]:
    raw = (metadata or {}).get(METADATA_KEY)
    if not raw:
        return None, {}
    config = {k.removeprefix("transformer."): v for k, v in json.loads(raw).items()}
    return config.get("lora_alpha"), dict(config.get("alpha_pattern") or {})


def _strip(key: str, prefixes: tuple[str, ...]) -> str:
    for p in prefixes:
        if key.startswith(p):
            return key[len(p) :]
    return key


def _guess_format(keys: list[str]) -> str:
    if any(k.endswith(".lora_down.weight") for k in keys):
        return "kohya"
    if any(k.startswith("base_model.model.") for k in keys):
        return "peft"
    return "diffusers"  # "bfl" is told apart once names are resolved against a model or table


def _modules_of(model: nn.Module | None) -> set[str] | None:
    if model is None:
        return None
    # A module wrapped by PEFT keeps its name; its inner base_layer is not a LoRA target.
    return {n.removeprefix("base_model.model.") for n, _ in model.named_modules() if n and not n.endswith(".base_layer")}


def _unmatched_error(unmatched: list[str], guessed: str, where: str) -> NoTargetError:
    shown = ", ".join(unmatched[:_SHOWN]) + (" ..." if len(unmatched) > _SHOWN else "")
    return NoTargetError(
        f"{len(unmatched)} LoRA key(s) match no module of {where} (format guessed: {guessed!r}): {shown}. "
        "Check that the file was made for this model (architecture, depth), or pass architecture= / model=."
    )


def _split(group: OriginalGroup, w: LoraWeights, sizes: list[int]) -> Lora:
    n = len(group.modules)
    up = w.up
    if group.swap_halves:
        up = torch.cat(up.chunk(2, dim=0)[::-1], dim=0)
    if n == 1:
        return {group.modules[0]: LoraWeights(w.down, up, w.alpha)}
    if sum(sizes) != up.shape[0]:
        raise ConfigError(
            f"LoRA for {group.original!r} has {up.shape[0]} output rows, but its parts {list(group.modules)} "
            f"have {sizes}; pass the model (model=) so the sizes come from it."
        )
    rank = w.rank
    ups = up.split(sizes, dim=0)
    if rank % n == 0:
        r = rank // n
        block = all(
            not torch.any(part[:, j * r : (j + 1) * r]) for i, part in enumerate(ups) for j in range(n) if j != i
        )
        if block:
            alpha = None if w.alpha is None else w.alpha / n
            return {
                m: LoraWeights(w.down[i * r : (i + 1) * r].contiguous(), ups[i][:, i * r : (i + 1) * r].contiguous(), alpha)
                for i, m in enumerate(group.modules)
            }
    # Trained fused: each part keeps the whole down (same product, same scale).
    return {m: LoraWeights(w.down, ups[i].contiguous(), w.alpha) for i, m in enumerate(group.modules)}


def _part_sizes(group: OriginalGroup, out: int, model: nn.Module | None) -> list[int]:
    if model is not None:
        try:
            return [_out_features(model.get_submodule(m)) for m in group.modules]
        except AttributeError:
            pass
    total = sum(group.weights)
    return [out * wt // total for wt in group.weights]


def _out_features(module: nn.Module) -> int:
    base = getattr(module, "base_layer", module)
    return base.weight.shape[0]


def to_lora(
    state: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str] | None = None,
    model: nn.Module | None = None,
    architecture: str | Architecture | None = None,
) -> tuple[Lora, str]:
    """A LoRA state dict in any supported format as {model module name: LoraWeights}, and the format found.

    Names are resolved against `model` when given (every key must match one of its modules), else
    against the architecture's original-names table (`architecture`, or the one detected from `model`).
    """
    keys = list(state)
    fmt = _guess_format(keys)
    arch = _architecture(model, architecture, keys)
    table = arch.lora_names if arch else ()
    modules = _modules_of(model)
    default_alpha, alpha_pattern = _alphas_from_metadata(metadata)

    # Group the tensors by the name they belong to.
    parts: dict[str, dict[str, torch.Tensor]] = {}
    if fmt == "kohya":
        prefixes, suffixes, expected = _KOHYA_PREFIXES, _KOHYA_SUFFIXES, "a kohya LoRA (expected lora_down / lora_up / alpha)"
    else:
        prefixes, suffixes, expected = _PREFIXES, _PEFT_SUFFIXES, "a LoRA file (expected lora_A / lora_B / alpha)"
    for key, value in state.items():
        stem = _strip(key, prefixes)
        for suffix, role in suffixes:
            if stem.endswith(suffix):
                parts.setdefault(stem[: -len(suffix)], {})[role] = value
                break
        else:
            raise _unmatched_error([key], fmt, expected)

    underscored = {m.replace(".", "_"): m for m in modules} if (fmt == "kohya" and modules) else {}
    lora: Lora = {}
    unmatched: list[str] = []
    found_original = False
    for name, tensors in parts.items():
        if "down" not in tensors or "up" not in tensors:
            raise ConfigError(f"LoRA entry {name!r} lacks its {'up' if 'down' in tensors else 'down'} weight; the file is incomplete.")
        alpha = tensors["alpha"].item() if "alpha" in tensors else None
        w = LoraWeights(tensors["down"], tensors["up"], alpha)
        if modules is not None:
            direct = underscored.get(name) if fmt == "kohya" else (name if name in modules else None)
        else:
            # Without a model, a name the table knows is an original one; any other is taken as is.
            known = group_of_original(table, name, underscored=(fmt == "kohya"))
            direct = name if (known is None and fmt != "kohya") else None
        if direct is not None:
            if w.alpha is None:
                w.alpha = alpha_pattern.get(direct, default_alpha)
            lora[direct] = w
            continue
        group = group_of_original(table, name, underscored=(fmt == "kohya"))
        if group is None:
            unmatched.append(name)
            continue
        found_original = True
        split = _split(group, w, _part_sizes(group, w.up.shape[0], model))
        for m, part in split.items():
            if modules is not None and m not in modules:
                unmatched.append(f"{name} -> {m}")
            lora[m] = part
    if fmt == "diffusers" and found_original:
        fmt = "bfl"
    if unmatched:
        where = type(model).__name__ if model is not None else (f"architecture {arch.name!r}" if arch else "any known table")
        raise _unmatched_error(unmatched, fmt, where)
    return lora, fmt


def _architecture(model: nn.Module | None, architecture: str | Architecture | None, keys: list[str]) -> Architecture | None:
    if isinstance(architecture, Architecture):
        return architecture
    if architecture is not None:
        return architecture_named(architecture)
    if model is not None:
        return detect_architecture(getattr(model, "base_model", None) and getattr(model.base_model, "model", model) or model)
    # No model: the architecture whose table knows a name in the file.
    stems = [_strip(_strip(k, _KOHYA_PREFIXES), _PREFIXES).rsplit(".lora_", 1)[0].removesuffix(".alpha") for k in keys]
    for arch in ARCHITECTURES:
        if arch.lora_names and any(
            group_of_original(arch.lora_names, s) or group_of_original(arch.lora_names, s, underscored=True) or group_of_module(arch.lora_names, s)
            for s in stems
        ):
            return arch
    return None


# ---------------------------------------------------------------------------------------------- writing


def _fuse(group: OriginalGroup, lora: Lora) -> LoraWeights:
    parts = [lora.get(m) for m in group.modules]
    if len(parts) == 1:
        w = parts[0]
        up = torch.cat(w.up.chunk(2, dim=0)[::-1], dim=0) if group.swap_halves else w.up
        return LoraWeights(w.down, up, w.alpha)
    missing = [m for m, p in zip(group.modules, parts) if p is None]
    if missing:
        raise ConfigError(
            f"{group.original!r} is one module in this format and needs LoRA weights on all of "
            f"{list(group.modules)}; missing {missing}. Target all of them, or save in 'diffusers' / 'peft' format."
        )
    ranks = {p.rank for p in parts}
    scales = {p.scale for p in parts}
    if len(ranks) != 1 or len(scales) != 1:
        raise ConfigError(
            f"the parts of {group.original!r} have ranks {sorted(ranks)} and scales {sorted(scales)}; fusing them "
            "exactly needs one rank and one alpha. Save in 'diffusers' / 'peft' format instead."
        )
    r, n = parts[0].rank, len(parts)
    down = torch.cat([p.down for p in parts], dim=0)
    up = torch.zeros((sum(p.up.shape[0] for p in parts), r * n, *parts[0].up.shape[2:]), dtype=parts[0].up.dtype, device=parts[0].up.device)
    row = 0
    for i, p in enumerate(parts):
        up[row : row + p.up.shape[0], i * r : (i + 1) * r] = p.up
        row += p.up.shape[0]
    alpha = None if parts[0].alpha is None else parts[0].alpha * n
    return LoraWeights(down, up, alpha)


def _originals(lora: Lora, table) -> dict[str, LoraWeights]:
    out: dict[str, LoraWeights] = {}
    done: set[str] = set()
    for m in lora:
        if m in done:
            continue
        group = group_of_module(table, m)
        if group is None:
            out[m] = lora[m]  # no original name: the module's own name
            done.add(m)
            continue
        out[group.original] = _fuse(group, lora)
        done.update(group.modules)
    return out


def from_lora(lora: Lora, format: str, architecture: Architecture | None = None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A state dict and safetensors metadata for `lora` in `format` (see the module docstring)."""
    if format not in FORMATS:
        raise ConfigError(f"unknown LoRA format {format!r}; choose one of {FORMATS}")
    table = architecture.lora_names if architecture else ()
    if format == "bfl" and not table:
        raise ConfigError(
            f"the 'bfl' format needs an architecture with original module names "
            f"({[a.name for a in ARCHITECTURES if a.lora_names]}); got "
            f"{architecture.name if architecture else 'none'}. Pass architecture= or save as 'diffusers'."
        )
    state: dict[str, torch.Tensor] = {}
    metadata: dict[str, str] = {}

    def t(x: torch.Tensor) -> torch.Tensor:
        return x.detach().to("cpu").contiguous()

    if format in ("diffusers", "peft"):
        prefix = "transformer." if format == "diffusers" else "base_model.model."
        for m, w in lora.items():
            state[f"{prefix}{m}.lora_A.weight"] = t(w.down)
            state[f"{prefix}{m}.lora_B.weight"] = t(w.up)
        ranks = {m: w.rank for m, w in lora.items()}
        alphas = {m: float(w.alpha if w.alpha is not None else w.rank) for m, w in lora.items()}
        r = max(set(ranks.values()), key=list(ranks.values()).count)
        alpha = max(set(alphas.values()), key=list(alphas.values()).count)
        config = {
            "r": r,
            "lora_alpha": alpha,
            "target_modules": sorted(lora),
            "rank_pattern": {m: v for m, v in ranks.items() if v != r},
            "alpha_pattern": {m: v for m, v in alphas.items() if v != alpha},
        }
        if format == "diffusers":  # diffusers reads the config of its `transformer` component by prefix
            config = {f"transformer.{k}": v for k, v in config.items()}
        metadata[METADATA_KEY] = json.dumps(config)
        return state, metadata
    names = _originals(lora, table)
    for name, w in names.items():
        alpha = torch.tensor(float(w.alpha if w.alpha is not None else w.rank))
        if format == "kohya":
            stem = "lora_unet_" + name.replace(".", "_")
            state[f"{stem}.lora_down.weight"] = t(w.down)
            state[f"{stem}.lora_up.weight"] = t(w.up)
            state[f"{stem}.alpha"] = alpha
        else:
            state[f"{name}.lora_A.weight"] = t(w.down)
            state[f"{name}.lora_B.weight"] = t(w.up)
            state[f"{name}.alpha"] = alpha
    return state, metadata


# ---------------------------------------------------------------------------------------------- public


def save_lora(
    model_or_state: nn.Module | Mapping[str, torch.Tensor],
    path: str | os.PathLike,
    format: str = "diffusers",
    metadata: Mapping[str, str] | None = None,
    *,
    adapter_name: str = "default",
    architecture: str | None = None,
) -> None:
    """Save a LoRA as safetensors in `format`: from a model carrying a PEFT adapter, or from a LoRA
    state dict in any supported format (converted). `metadata` (str -> str) is stored in the file."""
    safetensors = require("safetensors.torch", "train", "saving LoRA files")
    if format not in FORMATS:
        raise ConfigError(f"unknown LoRA format {format!r}; choose one of {FORMATS}")
    if isinstance(model_or_state, nn.Module):
        lora = lora_from_model(model_or_state, adapter_name)
        arch = _architecture(model_or_state, architecture, [])
    else:
        arch = _architecture(None, architecture, list(model_or_state))
        lora, _ = to_lora(model_or_state, None, None, arch)
    state, file_metadata = from_lora(lora, format, arch)
    extra = dict(metadata or {})
    bad = [k for k, v in extra.items() if not isinstance(k, str) or not isinstance(v, str)]
    if bad:
        raise ConfigError(f"safetensors metadata must map str to str; not so for {bad}. Convert the values with json.dumps.")
    file_metadata = {**extra, **file_metadata, "format": "pt", "hookwise_lora_format": format}
    if arch is not None:
        file_metadata["hookwise_architecture"] = arch.name
    safetensors.save_file(state, os.fspath(path), metadata=file_metadata)


def _read(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    safetensors = require("safetensors", "train", "reading LoRA files")
    with safetensors.safe_open(os.fspath(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})


def lora_state_dict(
    path: str | os.PathLike,
    target_format: str = "diffusers",
    *,
    model: nn.Module | None = None,
    architecture: str | None = None,
) -> dict[str, torch.Tensor]:
    """The LoRA in the safetensors file at `path`, whatever its format, as a state dict in `target_format`."""
    state, metadata = _read(path)
    architecture = architecture or metadata.get("hookwise_architecture")
    arch = _architecture(model, architecture, list(state))
    lora, _ = to_lora(state, metadata, model, arch)
    return from_lora(lora, target_format, arch)[0]


def read_lora(
    path: str | os.PathLike, *, model: nn.Module | None = None, architecture: str | None = None
) -> tuple[Lora, str]:
    """The LoRA in the file at `path` as {model module name: LoraWeights}, and the format it was in."""
    state, metadata = _read(path)
    return to_lora(state, metadata, model, architecture or metadata.get("hookwise_architecture"))


def load_lora(path: str | os.PathLike, model: nn.Module, *, adapter_name: str = "default") -> str:
    """Load the LoRA file at `path` (any supported format) into `model` as the PEFT adapter `adapter_name`.

    If the model already has that adapter on the same modules with the same ranks, the weights are
    copied into it in place (a hot swap: no module is replaced, so hooks, offload placement and
    compiled graphs stay valid). Returns the format the file was in.
    """
    lora, fmt = read_lora(path, model=model)
    existing = _adapter_layers(model, adapter_name)
    if existing:
        _hotswap(existing, lora, adapter_name)
        return fmt
    peft = require("peft", "train", "loading a LoRA into a model")
    from peft.utils import set_peft_model_state_dict

    ranks = {m: w.rank for m, w in lora.items()}
    alphas = {m: float(w.alpha if w.alpha is not None else w.rank) for m, w in lora.items()}
    config = peft.LoraConfig(
        r=next(iter(ranks.values())),
        lora_alpha=next(iter(alphas.values())),
        target_modules=sorted(lora),
        rank_pattern={m: r for m, r in ranks.items()},
        alpha_pattern={m: a for m, a in alphas.items()},
    )
    peft.inject_adapter_in_model(config, model, adapter_name=adapter_name)
    state = {}
    for m, w in lora.items():
        state[f"{m}.lora_A.weight"] = w.down
        state[f"{m}.lora_B.weight"] = w.up
    result = set_peft_model_state_dict(model, state, adapter_name=adapter_name)
    unexpected = [k for k in getattr(result, "unexpected_keys", []) if "lora_" in k]
    if unexpected:
        raise _unmatched_error(unexpected, fmt, type(model).__name__)
    return fmt


def hotswap_lora(model: nn.Module, path: str | os.PathLike, *, adapter_name: str = "default") -> str:
    """Copy the LoRA in `path` into the adapter `adapter_name` already on `model`, in place.

    The stack on the model (casting, offload, caches, compile) is not touched: LoRA weights are
    resident trainable parameters, so an in-place copy is all it takes. Returns the file's format.
    """
    existing = _adapter_layers(model, adapter_name)
    if not existing:
        raise NoTargetError(
            f"the model has no LoRA adapter {adapter_name!r} to swap into; load the first LoRA with load_lora()."
        )
    lora, fmt = read_lora(path, model=model)
    _hotswap(existing, lora, adapter_name)
    return fmt


def _adapter_layers(model: nn.Module, adapter_name: str) -> dict[str, nn.Module]:
    return {
        n.removeprefix("base_model.model."): m
        for n, m in model.named_modules()
        if isinstance(getattr(m, "lora_A", None), nn.ModuleDict) and adapter_name in m.lora_A
    }


def _hotswap(layers: dict[str, nn.Module], lora: Lora, adapter_name: str) -> None:
    if set(layers) != set(lora):
        extra, missing = sorted(set(lora) - set(layers)), sorted(set(layers) - set(lora))
        raise ConfigError(
            f"cannot swap in place: the file targets other modules than adapter {adapter_name!r} "
            f"(only in file: {extra[:_SHOWN]}, only in model: {missing[:_SHOWN]}). Load it as a new adapter."
        )
    for name, w in lora.items():
        layer = layers[name]
        a, b = layer.lora_A[adapter_name].weight, layer.lora_B[adapter_name].weight
        if a.shape != w.down.shape or b.shape != w.up.shape:
            raise ConfigError(
                f"cannot swap in place: {name!r} has rank {a.shape[0]} in the model and {w.rank} in the file. "
                "Load it as a new adapter."
            )
    with torch.no_grad():
        for name, w in lora.items():
            layer = layers[name]
            layer.lora_A[adapter_name].weight.copy_(w.down)
            layer.lora_B[adapter_name].weight.copy_(w.up)
            alpha = w.alpha if w.alpha is not None else w.rank
            layer.lora_alpha[adapter_name] = alpha
            layer.scaling[adapter_name] = alpha / w.rank
