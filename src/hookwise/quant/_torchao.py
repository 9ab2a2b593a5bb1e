"""torchao schemes: int8 weight-only, int8 dynamic, int4 weight-only (grouped), fp8 weight-only / dynamic.

torchao quantizes a weight into a tensor subclass (`Int8Tensor`, `Float8Tensor`, `Int4TilePackedTo4dTensor`)
whose `__tensor_flatten__` gives its plain tensors (`qdata`, `scale`, ...) and a context. hookwise
stores those tensors on the module and rebuilds the subclass with `__tensor_unflatten__` at forward,
so torchao's own dispatch (weight-only dequant + matmul, dynamic activation quantization, `_scaled_mm`)
computes.

On the CPU in torchao 0.18: int8 weight-only, int8 dynamic and fp8 weight-only run; int4 weight-only
has no CPU kernel here (its plain layout needs the `mslk` package, its int32 layout supports no CPU,
its tile-packed layout is tinygemm on CUDA), so it is CUDA-only; fp8 dynamic needs fp8 matmul (SM 8.9+).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from ._formats import Format, backend_module, needs_cuda

INT4_DEFAULT_GROUP = 128


@dataclass(frozen=True)
class _Rebuild:
    """What `__tensor_unflatten__` needs besides the plain tensors."""

    cls: type
    names: tuple[str, ...]
    meta: Any
    shape: torch.Size
    stride: tuple[int, ...]
    dtype: torch.dtype


@dataclass(frozen=True)
class TorchaoFormat(Format):
    """A torchao scheme; see the module docstring."""

    def _config(self) -> Any:
        q = backend_module("torchao.quantization")
        if self.scheme == "int8-weight":
            return q.Int8WeightOnlyConfig(set_inductor_config=False)
        if self.scheme == "int8-dynamic":
            return q.Int8DynamicActivationInt8WeightConfig(set_inductor_config=False)
        if self.scheme == "fp8-weight":
            return q.Float8WeightOnlyConfig(set_inductor_config=False)
        if self.scheme == "fp8-dynamic":
            from torchao.quantization.granularity import PerRow

            return q.Float8DynamicActivationFloat8WeightConfig(granularity=PerRow(), set_inductor_config=False)
        if self.scheme == "int4-weight":
            return q.Int4WeightOnlyConfig(
                group_size=self.group_size or INT4_DEFAULT_GROUP, int4_packing_format="tile_packed_to_4d",
                set_inductor_config=False,
            )  # fmt: skip
        raise ConfigError(f"scheme {self.scheme!r} is not a torchao scheme")  # pragma: no cover

    def check(self, device: torch.device) -> None:
        backend_module("torchao")
        if self.scheme == "int4-weight":
            needs_cuda(self.scheme, device, "torchao 0.18 has no int4 weight-only kernel for the CPU (tinygemm is CUDA)")
        if self.scheme == "fp8-dynamic":
            needs_cuda(self.scheme, device, "fp8 matmul needs a GPU of compute capability 8.9 or newer")
            if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
                raise ConfigError(
                    f"scheme 'fp8-dynamic' needs fp8 matmul (compute capability 8.9+, e.g. L4, RTX 4090, H100); "
                    f"{torch.cuda.get_device_name(device)} has {torch.cuda.get_device_capability(device)}; use "
                    f"'fp8-weight' (fp8 storage, matmul in the compute dtype) or 'int8-dynamic'"
                )

    def fits(self, shape: tuple[int, ...], dtype: torch.dtype) -> str | None:
        if self.scheme == "int4-weight":
            group = self.group_size or INT4_DEFAULT_GROUP
            if shape[1] % group:
                return f"input width {shape[1]} is not a multiple of group_size={group}"
            if dtype != torch.bfloat16:
                return f"int4-weight (tinygemm) computes in bfloat16, the weight is {dtype}"
        if self.scheme == "fp8-dynamic" and (shape[0] % 16 or shape[1] % 16):
            return f"fp8 matmul needs both weight dimensions to be multiples of 16, got {tuple(shape)}"
        return None

    def quantize(self, weight: torch.Tensor) -> tuple[dict[str, torch.Tensor], _Rebuild]:
        q = backend_module("torchao.quantization")
        holder = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
        holder.weight = nn.Parameter(weight.detach(), requires_grad=False)
        q.quantize_(holder, self._config())
        sub = holder.weight
        names, meta = sub.__tensor_flatten__()
        tensors = {name: getattr(sub, name) for name in names}
        return tensors, _Rebuild(type(sub), tuple(names), meta, sub.shape, tuple(sub.stride()), weight.dtype)

    @staticmethod
    def rebuild(tensors: dict[str, torch.Tensor], ctx: _Rebuild) -> torch.Tensor:
        inner = {name: tensors[name] for name in ctx.names}
        return ctx.cls.__tensor_unflatten__(inner, ctx.meta, ctx.shape, ctx.stride)

    def linear(self, x: torch.Tensor, tensors: dict[str, torch.Tensor], ctx: _Rebuild, bias: torch.Tensor | None) -> torch.Tensor:
        return torch.nn.functional.linear(x, self.rebuild(tensors, ctx), bias)

    def dequantize(self, tensors: dict[str, torch.Tensor], ctx: _Rebuild, dtype: torch.dtype) -> torch.Tensor:
        return self.rebuild(tensors, ctx).dequantize().to(dtype)
