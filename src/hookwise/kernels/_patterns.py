"""The DiT patterns the Kernels technique fuses: where they are in a model, and what each computes.

A *site* is a module whose whole forward is one pattern, so a hook can compute it instead:

- `norm`: LayerNorm / RMSNorm modules (torch's, diffusers' `RMSNorm`, `FP32LayerNorm`, and any class
  whose forward's code normalizes the last dimension the same way), affine or not.
- `modulate`: adaptive norms that project a conditioning vector and modulate the norm with it
  (diffusers' `AdaLayerNormZero`, `AdaLayerNormZeroSingle`, `AdaLayerNormContinuous`, and HunyuanVideo
  I2V's token-replace pair, which modulates the first frame's tokens apart): the projection
  still runs through the module's own `linear` (so casting, offloading and LoRA on it apply), the norm
  and `* (1 + scale) + shift` become one fused op.
- `geglu`: GELU (tanh or erf) and GEGLU activations (diffusers' `GELU` / `GEGLU` with their `proj`,
  torch's `nn.GELU`).
- `swiglu`: SwiGLU activations (diffusers' `SwiGLU` with its `proj`: `a * silu(g)` of the projection's
  two halves).
- `gate` (`x + gate * y`) and `rope` (interleaved-pair rotary embedding) have fused ops too, but in
  FLUX, Wan, HunyuanVideo and LTX-Video they are written inline in a block's forward and in the
  attention processor (as is part of their modulation): `_inline.py` reaches those through the blocks
  and processors of the known architectures. An architecture entry lists under `inline` the ops it computes where no route
  reaches (said in the summary, not replaced).

Known architectures state their sites by class (`ARCH_SITES`, in the architecture registry's style);
any other model is matched structurally (class and forward code). Either way the numerics check at
apply (in `fused.py`) compares the replacement with the module's own forward before it is trusted.

The eager expressions here are the reference of every backend: the "compile" backend compiles them,
the Triton kernels are tested against them.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

OPS = ("norm", "modulate", "gate", "rope", "geglu", "swiglu")


# ---- the eager expressions (every backend's reference) ---------------------------------------------
def norm_modulate(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    scale: torch.Tensor | None,
    shift: torch.Tensor | None,
    eps: float,
    rms: bool,
) -> torch.Tensor:
    """`norm(x) [* weight + bias] [* (1 + scale) + shift]` in fp32, stored in x's dtype."""
    h = x.float()
    if rms:
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    else:
        h = F.layer_norm(h, h.shape[-1:], eps=eps)
    if weight is not None:
        h = h * weight.float()
    if bias is not None:
        h = h + bias.float()
    if scale is not None:
        h = h * (1 + scale.float()) + shift.float()
    return h.to(x.dtype)


def gated_residual(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """`x + gate * y` in fp32, stored in x's dtype."""
    return (x.float() + gate.float() * y.float()).to(x.dtype)


def rope_interleaved(
    x: torch.Tensor, cos_a: torch.Tensor, sin_a: torch.Tensor, cos_b: torch.Tensor, sin_b: torch.Tensor, seq_dim: int
) -> torch.Tensor:
    """Rotate the interleaved pairs of x's last dimension by (seq, head_dim / 2) tables on `seq_dim`."""
    shape = [1] * x.dim()
    seq_dim = seq_dim % x.dim()
    shape[seq_dim] = x.shape[seq_dim]
    shape[-1] = x.shape[-1] // 2
    ca, sa, cb, sb = (t.float().view(shape) for t in (cos_a, sin_a, cos_b, sin_b))
    x0, x1 = x.float().unflatten(-1, (-1, 2)).unbind(-1)
    return torch.stack([x0 * ca - x1 * sa, x1 * cb + x0 * sb], dim=-1).flatten(-2).to(x.dtype)


def rope_half(
    x: torch.Tensor, cos_a: torch.Tensor, sin_a: torch.Tensor, cos_b: torch.Tensor, sin_b: torch.Tensor, seq_dim: int
) -> torch.Tensor:
    """Rotate the two halves of x's last dimension (the rotate-half layout) by (seq, head_dim / 2) tables:
    `out[i] = x[i] cos_a - x[i + h] sin_a`, `out[i + h] = x[i + h] cos_b + x[i] sin_b`."""
    shape = [1] * x.dim()
    seq_dim = seq_dim % x.dim()
    shape[seq_dim] = x.shape[seq_dim]
    shape[-1] = x.shape[-1] // 2
    ca, sa, cb, sb = (t.float().view(shape) for t in (cos_a, sin_a, cos_b, sin_b))
    x0, x1 = x.float().chunk(2, dim=-1)
    return torch.cat([x0 * ca - x1 * sa, x1 * cb + x0 * sb], dim=-1).to(x.dtype)


def gelu(x: torch.Tensor, approximate: str = "tanh") -> torch.Tensor:
    """GELU in fp32, stored in x's dtype."""
    return F.gelu(x.float(), approximate=approximate).to(x.dtype)


def geglu(h: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """`a * gelu(g)` for `a, g = h.chunk(2, -1)`, in fp32, stored in h's dtype."""
    a, g = h.float().chunk(2, dim=-1)
    return (a * F.gelu(g, approximate=approximate)).to(h.dtype)


def swiglu(h: torch.Tensor) -> torch.Tensor:
    """`a * silu(g)` for `a, g = h.chunk(2, -1)`, in fp32, stored in h's dtype."""
    a, g = h.float().chunk(2, dim=-1)
    return (a * F.silu(g)).to(h.dtype)


EXPRESSIONS: dict[str, Callable[..., torch.Tensor]] = {
    "norm_modulate": norm_modulate,
    "gated_residual": gated_residual,
    "rope_interleaved": rope_interleaved,
    "rope_half": rope_half,
    "gelu": gelu,
    "geglu": geglu,
    "swiglu": swiglu,
}


# ---- sites --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Kind:
    """One kind of site: its op, how to build test inputs of the module's real width, and its forward.

    `forward(module, ops, *args, **kwargs)` computes the module's output with `ops` (a mapping of the
    names in `EXPRESSIONS` to one backend's functions); `example(module, dtype, device)` gives
    (args, kwargs) of the module's real feature widths for the numerics check.
    """

    name: str
    op: str
    forward: Callable[..., Any]
    example: Callable[[nn.Module, torch.dtype, torch.device], tuple[tuple, dict]]


def _eps(module: nn.Module, x: torch.Tensor) -> float:
    eps = getattr(module, "eps", None)
    return float(torch.finfo(x.dtype).eps if eps is None else eps)


def _width(module: nn.Module) -> int:
    for name in ("normalized_shape", "dim"):
        shape = getattr(module, name, None)
        if shape is not None and not isinstance(shape, int) and len(shape) == 1:
            return int(shape[0])
    weight = getattr(module, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.dim() == 1:
        return int(weight.shape[0])
    raise ValueError(f"cannot tell the normalized width of {type(module).__name__}")


def _tokens(width: int, dtype: torch.dtype, device: torch.device, gen: torch.Generator) -> torch.Tensor:
    return torch.randn(2, 8, width, generator=gen).to(device=device, dtype=dtype)


def _gen() -> torch.Generator:
    return torch.Generator().manual_seed(0)


def _norm(rms: bool) -> Callable[..., Any]:
    def forward(module: nn.Module, ops: Any, x: torch.Tensor) -> torch.Tensor:
        return ops["norm_modulate"](x, module.weight, getattr(module, "bias", None), None, None, _eps(module, x), rms)

    return forward


def _norm_example(module: nn.Module, dtype: torch.dtype, device: torch.device) -> tuple[tuple, dict]:
    return (_tokens(_width(module), dtype, device, _gen()),), {}


def _inner_norm(module: nn.Module, x: torch.Tensor, ops: Any, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    norm = module.norm
    rms = "rms" in type(norm).__name__.lower()
    return ops["norm_modulate"](
        x, getattr(norm, "weight", None), getattr(norm, "bias", None), scale, shift, _eps(norm, x), rms
    )


def _adaln_zero(module: nn.Module, ops: Any, x: torch.Tensor, timestep=None, class_labels=None, hidden_dtype=None, emb=None):
    emb = module.linear(module.silu(emb))
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = emb.chunk(6, dim=1)
    x = _inner_norm(module, x, ops, scale_msa[:, None], shift_msa[:, None])
    return x, gate_msa, shift_mlp, scale_mlp, gate_mlp


def _adaln_single(module: nn.Module, ops: Any, x: torch.Tensor, emb=None):
    emb = module.linear(module.silu(emb))
    shift_msa, scale_msa, gate_msa = emb.chunk(3, dim=1)
    return _inner_norm(module, x, ops, scale_msa[:, None], shift_msa[:, None]), gate_msa


def _adaln_continuous(module: nn.Module, ops: Any, x: torch.Tensor, conditioning_embedding: torch.Tensor):
    emb = module.linear(module.silu(conditioning_embedding).to(x.dtype))
    scale, shift = torch.chunk(emb, 2, dim=1)
    return _inner_norm(module, x, ops, scale[:, None, :], shift[:, None, :])


def _token_replace(module: nn.Module, ops: Any, x: torch.Tensor, emb: torch.Tensor, token_replace_emb: torch.Tensor,
                   first_frame_num_tokens: int) -> tuple[torch.Tensor, ...]:  # fmt: skip
    """HunyuanVideo I2V's adaptive norms: the first frame's tokens modulated by the token-replace
    embedding, the others by the timestep's (each range one fused norm + modulation)."""
    chunks = 6 if type(module).__name__ == "HunyuanVideoTokenReplaceAdaLayerNormZero" else 3
    mods = module.linear(module.silu(emb)).chunk(chunks, dim=1)
    tr_mods = module.linear(module.silu(token_replace_emb)).chunk(chunks, dim=1)
    n = first_frame_num_tokens
    zero = _inner_norm(module, x[:, :n], ops, tr_mods[1][:, None], tr_mods[0][:, None])
    orig = _inner_norm(module, x[:, n:], ops, mods[1][:, None], mods[0][:, None])
    out = torch.cat([zero, orig], dim=1)
    if chunks == 3:
        return out, mods[2], tr_mods[2]
    return out, *mods[2:], *tr_mods[2:]


def _token_replace_example(module: nn.Module, dtype: torch.dtype, device: torch.device) -> tuple[tuple, dict]:
    gen = _gen()
    x = _tokens(module.linear.in_features, dtype, device, gen)
    emb, tr_emb = ((torch.randn(2, module.linear.in_features, generator=gen) * 0.5).to(device=device, dtype=dtype) for _ in range(2))
    return (x, emb, tr_emb, 3), {}


def _adaln_example(module: nn.Module, dtype: torch.dtype, device: torch.device) -> tuple[tuple, dict]:
    gen = _gen()
    x = _tokens(_width(module.norm) if _has_width(module.norm) else module.linear.out_features // _chunks(module), dtype, device, gen)
    # Conditioning of about the size a timestep embedding has, so the modulation stays O(1).
    emb = (torch.randn(2, module.linear.in_features, generator=gen) * 0.5).to(device=device, dtype=dtype)
    if type(module).__name__ == "AdaLayerNormContinuous":
        return (x, emb), {}
    return (x,), {"emb": emb}


def _has_width(module: nn.Module) -> bool:
    try:
        _width(module)
    except ValueError:
        return False
    return True


def _chunks(module: nn.Module) -> int:
    return {"AdaLayerNormZero": 6, "AdaLayerNormZeroSingle": 3, "AdaLayerNormContinuous": 2}[type(module).__name__]


def _gelu_proj(module: nn.Module, ops: Any, hidden_states: torch.Tensor) -> torch.Tensor:
    return ops["gelu"](module.proj(hidden_states), module.approximate)


def _geglu_proj(module: nn.Module, ops: Any, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    return ops["geglu"](module.proj(hidden_states), "none")


def _swiglu_proj(module: nn.Module, ops: Any, hidden_states: torch.Tensor) -> torch.Tensor:
    return ops["swiglu"](module.proj(hidden_states))


def _gelu_act(module: nn.Module, ops: Any, x: torch.Tensor) -> torch.Tensor:
    return ops["gelu"](x, module.approximate)


def _proj_example(module: nn.Module, dtype: torch.dtype, device: torch.device) -> tuple[tuple, dict]:
    return (_tokens(module.proj.in_features, dtype, device, _gen()),), {}


def _act_example(module: nn.Module, dtype: torch.dtype, device: torch.device) -> tuple[tuple, dict]:
    return (_tokens(16, dtype, device, _gen()) * 3,), {}


KINDS: dict[str, Kind] = {
    k.name: k
    for k in (
        Kind("layer_norm", "norm", _norm(False), _norm_example),
        Kind("rms_norm", "norm", _norm(True), _norm_example),
        Kind("adaln_zero", "modulate", _adaln_zero, _adaln_example),
        Kind("adaln_single", "modulate", _adaln_single, _adaln_example),
        Kind("adaln_continuous", "modulate", _adaln_continuous, _adaln_example),
        Kind("adaln_token_replace", "modulate", _token_replace, _token_replace_example),
        Kind("gelu_proj", "geglu", _gelu_proj, _proj_example),
        Kind("geglu_proj", "geglu", _geglu_proj, _proj_example),
        Kind("gelu", "geglu", _gelu_act, _act_example),
        Kind("swiglu_proj", "swiglu", _swiglu_proj, _proj_example),
    )
}


@dataclass(frozen=True)
class ArchSites:
    """A known architecture's sites: diffusers class name -> kind, and the ops it writes inline."""

    arch: str
    classes: dict[str, str]
    inline: dict[str, str]


_DIFFUSERS_NORMS = {"RMSNorm": "rms_norm", "FP32LayerNorm": "layer_norm", "LayerNorm": "layer_norm"}
ARCH_SITES: tuple[ArchSites, ...] = (
    ArchSites(
        "flux",
        {
            **_DIFFUSERS_NORMS,
            "AdaLayerNormZero": "adaln_zero",
            "AdaLayerNormZeroSingle": "adaln_single",
            "AdaLayerNormContinuous": "adaln_continuous",
            "GELU": "gelu_proj",
        },
        {},
    ),
    ArchSites(
        "wan",
        {**_DIFFUSERS_NORMS, "GELU": "gelu_proj"},
        {},
    ),
)


def arch_sites(arch: str | None) -> ArchSites | None:
    """The site table of a known architecture, or None."""
    return next((a for a in ARCH_SITES if a.arch == arch), None)


def _source(cls: type) -> str:
    try:
        return inspect.getsource(cls.forward)
    except (OSError, TypeError):
        return ""


def structural_kind(module: nn.Module) -> str | None:
    """The kind of `module` from its class and its forward's code, or None."""
    cls = type(module)
    if isinstance(module, nn.LayerNorm) and len(module.normalized_shape) == 1:
        return "layer_norm"
    if isinstance(module, getattr(nn, "RMSNorm", ())) and len(module.normalized_shape) == 1:
        return "rms_norm"
    if isinstance(module, nn.GELU):
        return "gelu"
    name = cls.__name__
    from_diffusers = cls.__module__.startswith("diffusers.")
    if from_diffusers and name in ("AdaLayerNormZero", "AdaLayerNormZeroSingle", "AdaLayerNormContinuous"):
        if getattr(module, "emb", None) is not None:  # the label-embedding variant computes emb itself
            return None
        if not (isinstance(getattr(module, "linear", None), nn.Linear) and isinstance(getattr(module, "norm", None), nn.Module)):
            return None
        if structural_kind(module.norm) not in ("layer_norm", "rms_norm"):
            return None
        return {"AdaLayerNormZero": "adaln_zero", "AdaLayerNormZeroSingle": "adaln_single"}.get(name, "adaln_continuous")
    if from_diffusers and name in ("HunyuanVideoTokenReplaceAdaLayerNormZero", "HunyuanVideoTokenReplaceAdaLayerNormZeroSingle"):
        if isinstance(getattr(module, "linear", None), nn.Linear) and structural_kind(getattr(module, "norm", None) or nn.Identity()) == "layer_norm":
            return "adaln_token_replace"
        return None
    if from_diffusers and name == "GELU" and isinstance(getattr(module, "proj", None), nn.Linear):
        return "gelu_proj"
    if from_diffusers and name == "GEGLU" and isinstance(getattr(module, "proj", None), nn.Linear):
        return "geglu_proj"
    if (from_diffusers and name == "SwiGLU" and isinstance(getattr(module, "proj", None), nn.Linear)
            and type(getattr(module, "activation", None)) is nn.SiLU):  # fmt: skip
        return "swiglu_proj"
    if list(module.children()) or not hasattr(module, "eps"):
        return None
    # A norm class of its own: the code normalizes the last dimension (RMS: mean of squares, rsqrt).
    code = _source(cls).replace(" ", "")
    if "pow(2).mean(-1" in code and "rsqrt" in code and _has_width(module):
        return "rms_norm"
    if "layer_norm(" in code and _has_width(module):
        return "layer_norm"
    return None


def find_sites(model: nn.Module, arch: str | None, ops: tuple[str, ...]) -> list[tuple[str, nn.Module, str]]:
    """(path, module, kind) of every site of `ops` in `model`, outermost first; a site inside another
    site (the norm of an adaptive norm) is left to the outer one."""
    table = arch_sites(arch)
    found: list[tuple[str, nn.Module, str]] = []
    taken: list[str] = []
    seen: set[int] = set()
    for path, module in model.named_modules():
        if id(module) in seen or any(path.startswith(t + ".") for t in taken):
            continue
        kind = structural_kind(module)
        if table is not None and kind is None and type(module).__module__.startswith("diffusers."):
            kind = table.classes.get(type(module).__name__)
            if kind is not None and kind.startswith("adaln"):
                kind = None  # adaptive norms only through the structural checks above
        if kind is None or KINDS[kind].op not in ops:
            continue
        seen.add(id(module))
        taken.append(path)
        found.append((path, module, kind))
    return found
