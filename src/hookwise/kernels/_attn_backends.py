"""The attention backends the `Attention` technique can route a `scaled_dot_product_attention` call to.

Each backend is a `Backend`: the call itself (it receives the call's arguments in SDPA's layout,
(batch, heads, sequence, head dim), and returns the output in that layout) and its constraints,
which `refuse(call)` checks against the real call's arguments: the device (and CUDA compute
capability), the dtype, the head dimension, masks (boolean, additive float), causal attention,
grouped-query attention (fewer key / value heads), dropout, sequence length, and whether it has a
backward on that device. A backend whose package is missing is reported by `unavailable()`; it is
probed with `importlib.util.find_spec` and imported at its first call only (never a hub download).

- `sdpa`: PyTorch's own choice among its kernels (the call as the model made it);
- `sdpa-math`, `sdpa-efficient`, `sdpa-flash`, `sdpa-cudnn`: one of PyTorch's kernels, pinned for that
  call with `torch.nn.attention.sdpa_kernel` (restored when the call returns);
- `flex`: `torch.nn.attention.flex_attention`, compiled on CUDA, eager elsewhere (masks and causal
  attention as score modifications);
- `flash-attn-2`, `flash-attn-3`, `sage`, `xformers`: the flash-attn 2 / 3, SageAttention and xFormers
  kernels, on CUDA, where their package is installed.

`register_backend` adds one (tests register a wrong one to prove that the numerics check catches it).
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import threading
from dataclasses import dataclass, field, replace
from typing import Any, Callable

import torch
import torch.nn.functional as F

from ..errors import ConfigError, MissingDependencyError

HALF = (torch.float16, torch.bfloat16)
FLOATS = (torch.float32, torch.float64, *HALF)


@dataclass(frozen=True)
class AttnCall:
    """One `scaled_dot_product_attention` call's arguments, in SDPA's (batch, heads, seq, head dim) layout."""

    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    attn_mask: torch.Tensor | None = None
    dropout_p: float = 0.0
    is_causal: bool = False
    scale: float | None = None
    enable_gqa: bool = False

    @classmethod
    def from_args(cls, args: tuple, kwargs: dict) -> AttnCall:
        """The call from the positional and keyword arguments `F.scaled_dot_product_attention` received."""
        names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal")
        bound = dict(zip(names, args))
        bound.update(kwargs)
        return cls(**bound)

    def sdpa_kwargs(self) -> dict[str, Any]:
        out = dict(query=self.query, key=self.key, value=self.value, attn_mask=self.attn_mask,
                   dropout_p=self.dropout_p, is_causal=self.is_causal, scale=self.scale)  # fmt: skip
        if self.enable_gqa:
            out["enable_gqa"] = True
        return out

    @property
    def head_dim(self) -> int:
        return int(self.query.shape[-1])

    @property
    def value_dim(self) -> int:
        return int(self.value.shape[-1])

    @property
    def q_heads(self) -> int:
        return int(self.query.shape[-3]) if self.query.dim() >= 3 else 1

    @property
    def kv_heads(self) -> int:
        return int(self.key.shape[-3]) if self.key.dim() >= 3 else 1

    @property
    def grouped(self) -> bool:
        """Fewer key / value heads than query heads (grouped-query attention)."""
        return self.kv_heads != self.q_heads

    @property
    def needs_grad(self) -> bool:
        """Training mode: grad is enabled and an input requires it, so the backend must have a backward."""
        tensors = [self.query, self.key, self.value]
        if isinstance(self.attn_mask, torch.Tensor):
            tensors.append(self.attn_mask)
        return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)

    @property
    def mask_kind(self) -> str | None:
        if self.attn_mask is None:
            return None
        return "bool" if self.attn_mask.dtype == torch.bool else "float"

    @property
    def device(self) -> torch.device:
        return self.query.device

    @property
    def dtype(self) -> torch.dtype:
        return self.query.dtype

    @property
    def symbolic(self) -> bool:
        """Meta or fake tensors (planning): nothing can be computed or measured."""
        return self.query.is_meta or type(self.query).__name__ == "FakeTensor"

    def key_of(self) -> tuple:
        """What a backend's choice depends on: shapes, dtype, device, mask, causal, dropout, GQA, training."""
        mask = None if self.attn_mask is None else (self.mask_kind, tuple(self.attn_mask.shape))
        return (tuple(self.query.shape), tuple(self.key.shape), tuple(self.value.shape), self.dtype,
                self.device.type, mask, bool(self.is_causal), self.dropout_p > 0, self.enable_gqa,
                self.needs_grad)  # fmt: skip

    def describe(self) -> str:
        """The call's shape in words, for summaries and warnings."""
        q, k = tuple(self.query.shape), tuple(self.key.shape)
        parts = [f"q{list(q)}", f"kv{list(k)}", str(self.dtype).removeprefix("torch."), self.device.type]
        if self.attn_mask is not None:
            parts.append(f"{self.mask_kind} mask")
        if self.is_causal:
            parts.append("causal")
        if self.dropout_p > 0:
            parts.append(f"dropout {self.dropout_p}")
        if self.needs_grad:
            parts.append("training")
        return " ".join(parts)


@dataclass(frozen=True)
class Backend:
    """One attention backend: its call and the constraints it declares.

    - `devices`: device types it runs on; `capability`: the least CUDA compute capability.
    - `dtypes`: input dtypes; `head_dims`: exact head dimensions it supports (None: any up to
      `max_head_dim`, a multiple of `head_dim_multiple`).
    - `masks`: mask kinds it takes ("bool", "float"); `causal`, `gqa`, `dropout`: whether it takes
      `is_causal`, fewer key / value heads than query heads, and `dropout_p > 0`. `causal_square`:
      causal only when query and key lengths are equal (its diagonal is aligned bottom-right, SDPA's
      top-left). `max_seq`: the longest query / key sequence.
    - `backward`: device types on which it has a backward (training).
    - `package`: the module its call imports (None: PyTorch itself); `install`: how to get it.
    - `tolerance`: the largest error it is trusted with, relative to the largest output magnitude of
      the float32 math reference: (for float32 / float64 inputs, for float16 / bfloat16 inputs).
    """

    name: str
    call: Callable[[AttnCall], torch.Tensor]
    devices: tuple[str, ...] = ("cpu", "cuda")
    dtypes: tuple[torch.dtype, ...] = FLOATS
    head_dims: tuple[int, ...] | None = None
    max_head_dim: int | None = None
    head_dim_multiple: int = 1
    masks: tuple[str, ...] = ("bool", "float")
    causal: bool = True
    causal_square: bool = False
    gqa: bool = True
    dropout: bool = True
    max_seq: int | None = None
    backward: tuple[str, ...] = ("cpu", "cuda")
    capability: tuple[int, int] | None = None
    package: str | None = None
    install: str = ""
    tolerance: tuple[float, float] = (1e-4, 2e-2)
    description: str = ""
    extra_check: Callable[[AttnCall], str | None] | None = field(default=None, compare=False)

    def unavailable(self) -> str | None:
        """Why this backend cannot be used in this process (its package is missing), or None."""
        if self.package is not None and not _installed(self.package):
            return f"the {self.package!r} package is not installed ({self.install})"
        return None

    def require(self) -> None:
        """Raise `MissingDependencyError` naming how to install the package, when it is missing."""
        reason = self.unavailable()
        if reason is not None:
            raise MissingDependencyError(
                f"attention backend {self.name!r} needs the {self.package!r} package, which is not installed; "
                f"install it with `{self.install}`, or choose another backend (backend='auto' picks among those installed)"
            )

    def tolerance_for(self, dtype: torch.dtype) -> float:
        return self.tolerance[1] if dtype in HALF else self.tolerance[0]

    def refuse(self, call: AttnCall) -> str | None:
        """Why this backend cannot serve `call` (a constraint it declares, checked on the real arguments), or None."""
        return self.unavailable() or self.refuse_call(call)

    def refuse_call(self, call: AttnCall) -> str | None:
        """`refuse` without the package check (that one imports; inside a graph being traced it is known already)."""
        device = call.device.type
        if device not in self.devices and device != "meta":
            return f"runs on {'/'.join(self.devices)}, not {device}"
        if self.capability is not None and device == "cuda":
            have = torch.cuda.get_device_capability(call.device)
            if have < self.capability:
                return f"needs CUDA compute capability {self.capability[0]}.{self.capability[1]}, the device has {have[0]}.{have[1]}"
        if call.dtype not in self.dtypes:
            names = ", ".join(str(d).removeprefix("torch.") for d in self.dtypes)
            return f"takes {names} inputs, not {str(call.dtype).removeprefix('torch.')}"
        if call.key.dtype != call.dtype or call.value.dtype != call.dtype:
            return "query, key and value have different dtypes"
        dims = {call.head_dim, call.value_dim}
        for dim in sorted(dims):
            if self.head_dims is not None and dim not in self.head_dims:
                return f"head dim {dim} is not one of {list(self.head_dims)}"
            if self.max_head_dim is not None and dim > self.max_head_dim:
                return f"head dim {dim} is over its limit of {self.max_head_dim}"
            if dim % self.head_dim_multiple:
                return f"head dim {dim} is not a multiple of {self.head_dim_multiple}"
        if call.mask_kind is not None and call.mask_kind not in self.masks:
            return f"takes no {call.mask_kind} attention mask"
        if call.is_causal:
            if not self.causal:
                return "takes no causal attention"
            if self.causal_square and call.query.shape[-2] != call.key.shape[-2]:
                return "aligns causal attention bottom-right: query and key lengths differ"
        if call.grouped and not self.gqa:
            return f"takes no grouped-query attention ({call.q_heads} query heads, {call.kv_heads} key/value heads)"
        if call.dropout_p > 0 and not self.dropout:
            return "takes no dropout"
        longest = max(int(call.query.shape[-2]), int(call.key.shape[-2]))
        if self.max_seq is not None and longest > self.max_seq:
            return f"sequence length {longest} is over its limit of {self.max_seq}"
        if call.needs_grad and device not in self.backward:
            return f"has no backward on {device} (training)"
        if self.extra_check is not None:
            return self.extra_check(call)
        return None


# ---- the calls -----------------------------------------------------------------------------------------
def _installed(package: str) -> bool:
    try:
        return importlib.util.find_spec(package) is not None
    except (ImportError, ValueError):
        return False


def _sdpa_default(call: AttnCall) -> torch.Tensor:
    return F.scaled_dot_product_attention(**call.sdpa_kwargs())


def _sdpa_pinned(kernel: str) -> Callable[[AttnCall], torch.Tensor]:
    def run(call: AttnCall) -> torch.Tensor:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel([getattr(SDPBackend, kernel)]):
            return F.scaled_dot_product_attention(**call.sdpa_kwargs())

    return run


_flex_compiled: dict[str, Callable] = {}
_flex_lock = threading.Lock()


def _flex_fn(device: torch.device) -> Callable:
    """flex_attention, compiled once per process on CUDA (where its fused kernel exists), eager elsewhere."""
    from torch.nn.attention.flex_attention import flex_attention

    if device.type != "cuda" or torch.compiler.is_compiling():  # inside a graph: the graph's compile lowers it
        return flex_attention
    with _flex_lock:
        if "cuda" not in _flex_compiled:
            _flex_compiled["cuda"] = torch.compile(flex_attention, dynamic=False)
        return _flex_compiled["cuda"]


def _flex(call: AttnCall) -> torch.Tensor:
    mask = call.attn_mask
    score_mod = None
    if mask is not None:
        full = mask.expand(call.query.shape[0], call.q_heads, call.query.shape[-2], call.key.shape[-2])
        if mask.dtype == torch.bool:

            def score_mod(score, b, h, q, k):
                return torch.where(full[b, h, q, k], score, -float("inf"))

        else:

            def score_mod(score, b, h, q, k):
                return score + full[b, h, q, k]

    if call.is_causal:
        inner = score_mod

        def score_mod(score, b, h, q, k):
            score = inner(score, b, h, q, k) if inner is not None else score
            return torch.where(q >= k, score, -float("inf"))

    return _flex_fn(call.device)(
        call.query, call.key, call.value, score_mod=score_mod, scale=call.scale, enable_gqa=call.grouped
    )


def _bshd(t: torch.Tensor) -> torch.Tensor:
    """(batch, heads, seq, dim) -> (batch, seq, heads, dim): the layout flash-attn and xFormers take."""
    return t.transpose(1, 2)


def _flash_attn_2(call: AttnCall) -> torch.Tensor:
    from flash_attn import flash_attn_func

    out = flash_attn_func(_bshd(call.query), _bshd(call.key), _bshd(call.value), dropout_p=call.dropout_p,
                          softmax_scale=call.scale, causal=call.is_causal)  # fmt: skip
    return out.transpose(1, 2)


def _flash_attn_3(call: AttnCall) -> torch.Tensor:
    from flash_attn_interface import flash_attn_func

    out = flash_attn_func(_bshd(call.query), _bshd(call.key), _bshd(call.value), softmax_scale=call.scale,
                          causal=call.is_causal)  # fmt: skip
    if isinstance(out, tuple):  # some releases return (out, logsumexp)
        out = out[0]
    return out.transpose(1, 2)


def _sage(call: AttnCall) -> torch.Tensor:
    from sageattention import sageattn

    return sageattn(call.query, call.key, call.value, tensor_layout="HND", is_causal=call.is_causal,
                    sm_scale=call.scale)  # fmt: skip


def _xformers(call: AttnCall) -> torch.Tensor:
    from xformers import ops

    bias = ops.LowerTriangularMask() if call.is_causal else None
    out = ops.memory_efficient_attention(_bshd(call.query), _bshd(call.key), _bshd(call.value), attn_bias=bias,
                                         p=call.dropout_p, scale=call.scale)  # fmt: skip
    return out.transpose(1, 2)


# ---- the registry ---------------------------------------------------------------------------------------
_REGISTRY: dict[str, Backend] = {}


def register_backend(backend: Backend) -> Backend:
    """Add (or replace) an attention backend under `backend.name`."""
    if not isinstance(backend, Backend):
        raise ConfigError(f"register_backend takes a hookwise attention Backend, got {type(backend).__name__}")
    if backend.name in ("auto", "") or not callable(backend.call):
        raise ConfigError(f"attention backend name {backend.name!r} is reserved or its call is not callable")
    _REGISTRY[backend.name] = backend
    return backend


def unregister_backend(name: str) -> None:
    """Remove a backend (for tests and plugins)."""
    _REGISTRY.pop(name, None)


def backend_named(name: str) -> Backend:
    backend = _REGISTRY.get(name)
    if backend is None:
        raise ConfigError(f"no attention backend named {name!r}; known: {', '.join(_REGISTRY)} (or 'auto')")
    return backend


def backend_names() -> tuple[str, ...]:
    """Every registered backend, in the order 'auto' tries them (its timing decides among those that pass)."""
    return tuple(_REGISTRY)


def available_backends() -> dict[str, str | None]:
    """{name: None if its package is present, else why not} for every registered backend."""
    return {name: b.unavailable() for name, b in _REGISTRY.items()}


_GPU_HALF = ("cuda",)
for _backend in (
    Backend("sdpa", _sdpa_default, description="PyTorch's own choice among its SDPA kernels (the model's call)"),
    Backend("sdpa-math", _sdpa_pinned("MATH"), description="PyTorch's math SDPA (the reference)"),
    Backend("sdpa-flash", _sdpa_pinned("FLASH_ATTENTION"), dropout=False,
            description="PyTorch's flash SDPA kernel (CPU and CUDA; on CUDA fp16 / bf16, no mask)",
            extra_check=lambda c: _flash_cuda_check(c)),
    Backend("sdpa-efficient", _sdpa_pinned("EFFICIENT_ATTENTION"), devices=_GPU_HALF,
            description="PyTorch's memory-efficient SDPA kernel"),
    Backend("sdpa-cudnn", _sdpa_pinned("CUDNN_ATTENTION"), devices=_GPU_HALF, dtypes=HALF, max_head_dim=128,
            head_dim_multiple=8, capability=(8, 0), description="PyTorch's cuDNN SDPA kernel"),
    Backend("flex", _flex, dropout=False, backward=("cuda",),
            description="torch.nn.attention.flex_attention (compiled on CUDA, eager elsewhere; no backward on CPU)"),
    Backend("flash-attn-2", _flash_attn_2, devices=_GPU_HALF, dtypes=HALF, max_head_dim=256, head_dim_multiple=8,
            masks=(), causal_square=True, capability=(8, 0), package="flash_attn", install="pip install 'hookwise[flash-attn]'",
            description="Dao-AILab flash-attn 2"),
    Backend("flash-attn-3", _flash_attn_3, devices=_GPU_HALF, dtypes=HALF, max_head_dim=256, head_dim_multiple=8,
            masks=(), causal_square=True, dropout=False, capability=(9, 0), package="flash_attn_interface",
            install="build flash-attn's hopper/ package (FlashAttention-3)", description="flash-attn 3 (Hopper)"),
    Backend("sage", _sage, devices=_GPU_HALF, dtypes=HALF, head_dims=(64, 96, 128), masks=(), causal_square=True,
            gqa=False, dropout=False, backward=(), capability=(8, 0), package="sageattention",
            install="pip install 'hookwise[sage]'", tolerance=(6e-2, 6e-2),
            description="SageAttention (int8 QK; inference only: no backward)"),
    Backend("xformers", _xformers, devices=_GPU_HALF, dtypes=(torch.float32, *HALF), max_head_dim=256, masks=(),
            gqa=False, package="xformers", install="pip install 'hookwise[xformers]'",
            description="xFormers memory_efficient_attention"),
):  # fmt: skip
    register_backend(_backend)


def _flash_cuda_check(call: AttnCall) -> str | None:
    """PyTorch's flash kernel on CUDA: fp16 / bf16, no mask, head dim a multiple of 8 up to 256."""
    if call.device.type != "cuda":
        return None
    if call.dtype not in HALF:
        return "on CUDA takes float16 / bfloat16 inputs only"
    if call.attn_mask is not None:
        return "on CUDA takes no attention mask"
    if call.head_dim % 8 or call.head_dim > 256:
        return f"on CUDA takes head dims that are multiples of 8 up to 256, not {call.head_dim}"
    return None


# ---- the numerics check ------------------------------------------------------------------------------------
PROBE_HEADS = 2
PROBE_ROWS = 32


def probe_slice(call: AttnCall, heads: int = PROBE_HEADS, rows: int = PROBE_ROWS) -> tuple[tuple[slice, ...], str]:
    """The index of the output slice the numerics check compares, and that slice in words.

    Batch item 0, the first `heads` query heads (with the key / value heads they read) and the first
    `rows` query rows, against every key: the first rows keep SDPA's top-left causal alignment.
    """
    n_heads = min(heads, call.q_heads)
    n_rows = min(rows, int(call.query.shape[-2]))
    index = (slice(0, 1), slice(0, n_heads), slice(0, n_rows))
    return index, f"batch 0, query heads 0-{n_heads - 1}, query rows 0-{n_rows - 1}, all {int(call.key.shape[-2])} keys"


def reference(call: AttnCall, index: tuple[slice, ...]) -> torch.Tensor:
    """The float32 math SDPA of the probe slice of `call` (no grad, no dropout)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    b, h, r = index
    with torch.no_grad():
        q = call.query.detach()[b, h, r].float()
        k, v = call.key.detach(), call.value.detach()
        if call.grouped:
            group = call.q_heads // call.kv_heads
            k, v = k.repeat_interleave(group, -3), v.repeat_interleave(group, -3)
        k, v = k[b, h].float(), v[b, h].float()
        mask = call.attn_mask
        if mask is not None:
            while mask.dim() < 4:
                mask = mask.unsqueeze(0)
            mask = mask.detach().expand(call.query.shape[0], call.q_heads, call.query.shape[-2], call.key.shape[-2])
            mask = mask[b, h, r]
            mask = mask if mask.dtype == torch.bool else mask.float()
        with sdpa_kernel([SDPBackend.MATH]):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=call.is_causal, scale=call.scale)


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max |out - ref| / max |ref| over the entries where the reference is finite (fully masked rows are not)."""
    out = out.detach().float()
    finite = torch.isfinite(ref)
    if not bool(finite.any()):
        return 0.0
    diff = (out - ref).abs()[finite]
    if not bool(torch.isfinite(diff).all()):
        return math.inf
    scale = ref.abs()[finite].max().clamp_min(1e-12)
    return float(diff.max() / scale)


def fake_available(backend: Backend, *, devices: tuple[str, ...] = ("cpu",)) -> Backend:
    """`backend` as if its package and device were present here, computing with the math SDPA.

    For testing a GPU backend's constraint logic on the CPU; the values are the reference's.
    """
    return replace(backend, name=f"{backend.name}-fake", package=None, devices=devices, capability=None,
                   call=_sdpa_pinned("MATH"))  # fmt: skip
