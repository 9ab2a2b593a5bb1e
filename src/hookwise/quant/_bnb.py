"""bitsandbytes schemes: nf4 and fp4 (4-bit blockwise, QLoRA's format) and int8 (LLM.int8 with outliers).

4-bit: `quantize_4bit` gives the packed bytes (two weights a byte) and a `QuantState` whose tensors
are the block maxima (`absmax`, fp32, one per `group_size` weights) and the 16-value code table
(`quant_map`); both are stored on the module and the `QuantState` is rebuilt at forward for
`matmul_4bit`. Double quantization of the maxima is not used (it would add a nested state).

int8: `int8_vectorwise_quant` gives the int8 rows and one fp32 scale per output row (`scb`); the
forward is bitsandbytes' `matmul` with a fresh `MatmulLtState` (outlier threshold 6.0, as its
`Linear8bitLt` default), which computes activation columns above the threshold in float.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ._formats import Format, backend_module

BNB_DEFAULT_GROUP = 64
INT8_THRESHOLD = 6.0


@dataclass(frozen=True)
class _Shape:
    shape: torch.Size
    dtype: torch.dtype


@dataclass(frozen=True)
class BnbFormat(Format):
    """A bitsandbytes scheme; see the module docstring."""

    def check(self, device: torch.device) -> None:
        backend_module("bitsandbytes")

    def quantize(self, weight: torch.Tensor) -> tuple[dict[str, torch.Tensor], _Shape]:
        F = backend_module("bitsandbytes.functional")
        w = weight.detach()
        if self.scheme == "int8":
            cb, scb, _ = F.int8_vectorwise_quant(w.to(torch.float16))
            return {"qdata": cb, "scb": scb}, _Shape(w.shape, w.dtype)
        packed, state = F.quantize_4bit(
            w, blocksize=self.group_size or BNB_DEFAULT_GROUP, quant_type=self.scheme, compress_statistics=False
        )
        return {"qdata": packed, "absmax": state.absmax, "quant_map": state.code}, _Shape(w.shape, w.dtype)

    def _state4(self, tensors: dict[str, torch.Tensor], ctx: _Shape) -> Any:
        F = backend_module("bitsandbytes.functional")
        return F.QuantState(
            absmax=tensors["absmax"], shape=ctx.shape, code=tensors["quant_map"],
            blocksize=self.group_size or BNB_DEFAULT_GROUP, quant_type=self.scheme, dtype=ctx.dtype,
        )  # fmt: skip

    def linear(self, x: torch.Tensor, tensors: dict[str, torch.Tensor], ctx: _Shape, bias: torch.Tensor | None) -> torch.Tensor:
        bnb = backend_module("bitsandbytes")
        if self.scheme == "int8":
            state = bnb.MatmulLtState()
            state.CB, state.SCB, state.threshold, state.has_fp16_weights = (
                tensors["qdata"], tensors["scb"], INT8_THRESHOLD, False
            )
            # LLM.int8 quantizes activations from fp16 (it would cast, with a warning per call); the
            # bias is added afterwards in the input's dtype.
            out = bnb.matmul(x.to(torch.float16), tensors["qdata"], state=state, threshold=INT8_THRESHOLD).to(x.dtype)
            return out if bias is None else out + bias.to(x.dtype)
        return bnb.matmul_4bit(x, tensors["qdata"].t(), quant_state=self._state4(tensors, ctx), bias=bias)

    def dequantize(self, tensors: dict[str, torch.Tensor], ctx: _Shape, dtype: torch.dtype) -> torch.Tensor:
        F = backend_module("bitsandbytes.functional")
        if self.scheme == "int8":
            return F.int8_vectorwise_dequant(tensors["qdata"], tensors["scb"]).to(dtype)
        return F.dequantize_4bit(tensors["qdata"], self._state4(tensors, ctx)).to(dtype)
