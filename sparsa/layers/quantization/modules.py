"""Quantized drop-ins for `Linear` (the experts' are in `experts`)."""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType

import torch
from torch import nn

from sparsa import kernels
from sparsa.layers.linear import Linear
from sparsa.layers.quantization.matmul import (
    bf16_matmul,
    int4_matmul,
    int8_matmul,
    native_max_rows,
    u8g_matmul,
)
from sparsa.layers.quantization.schemes import (
    dequantize_int4_packed,
    dequantize_int8,
    dequantize_u8g,
    quantize_int4_packed,
    quantize_int8_padded,
    quantize_u8g_padded,
    to_bf16_padded,
)


def _trusted_ext(x: torch.Tensor, max_rows: int):
    """The native kernel module when x is already in the kernels' form (2-D, contiguous,
    fp32, CPU, at most `max_rows` rows), else None. The modules call it unchecked: their
    weights' shapes are fixed when they are built, and at batch 1 the checked wrappers of
    `sparsa.kernels.ops` cost ~10 us per call, as much as a small GEMV."""
    if (x.dim() == 2 and x.dtype == torch.float32 and x.device.type == "cpu"
            and 1 <= x.shape[0] <= max_rows and x.is_contiguous()
            and not (x.requires_grad and torch.is_grad_enabled())):
        return kernels.load()
    return None


def _weight_nk(linear: Linear) -> torch.Tensor:
    """The Linear's weight as [out, in], whatever its storage layout."""
    w = linear.weight.data
    if w.is_meta:
        raise ValueError("cannot quantize a layer whose weights were never loaded (meta tensor)")
    return w.t() if linear.transposed else w


class _QuantizedLinearBase(nn.Module):
    method = "none"

    def _init_common(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        self.out_features, self.in_features = weight.shape
        self.output_sizes = [self.out_features]
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())

    @classmethod
    def _from(cls, m: _QuantizedLinearBase, linear: Linear) -> _QuantizedLinearBase:
        m.output_sizes = list(linear.output_sizes)
        return m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ext = _trusted_ext(x, self.native_rows())
        if ext is not None:
            y = self.native_gemm(ext, x)
            return y if self.bias is None else y + self.bias
        lead = x.shape[:-1]
        y = self.matmul(x.reshape(-1, x.shape[-1]))
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*lead, y.shape[-1])

    def load_shard(self, name: str, loaded: torch.Tensor, shard: int | None) -> None:
        """Quantize a checkpoint tensor into place (streamed loading: `streaming`)."""
        from sparsa.layers.quantization.rows import load_linear_shard

        load_linear_shard(self, name, loaded, shard)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def native_rows(self) -> int:
        """Most rows the native kernel takes (forward calls it unchecked up to that)."""
        raise NotImplementedError

    def native_gemm(self, ext, x: torch.Tensor) -> torch.Tensor:
        """x (2-D contiguous fp32 CPU, at most native_rows() rows) @ W^T by the native
        kernel module `ext`, without the bias and without checks."""
        return self.native_call()(ext, x)

    def native_call(self) -> Callable[[ModuleType, torch.Tensor], torch.Tensor]:
        """`native_gemm` with the weight tensors bound now: the native decode plan calls it
        each step without nn.Module attribute lookups (~1 us each, 4 per layer)."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}")


class Int8Linear(_QuantizedLinearBase):
    """Drop-in for `Linear` with an int8 weight (symmetric, per output channel)."""

    method = "int8"

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None,
                 w8a8: bool = True):
        """weight [out, in] (any float dtype), bias [out] or None; w8a8: batched rows run
        as an int8 x int8 GEMM (activations quantized per row)."""
        super().__init__()
        self._init_common(weight, bias)
        q, scale = quantize_int8_padded(weight)
        self.register_buffer("qweight", q)
        self.register_buffer("scale", scale)
        self.w8a8 = w8a8

    @classmethod
    def from_linear(cls, linear: Linear, w8a8: bool = True) -> Int8Linear:
        return cls._from(cls(_weight_nk(linear), linear.bias, w8a8), linear)

    def native_rows(self) -> int:
        return native_max_rows("int8", self.w8a8)

    def native_call(self) -> Callable[[ModuleType, torch.Tensor], torch.Tensor]:
        q, s = self.qweight, self.scale
        return lambda ext, x: ext.int8_gemm(x, q, s, False)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        return int8_matmul(x, self.qweight, self.scale, self.w8a8)

    def dequantize(self) -> torch.Tensor:
        """The effective weight, [out, in] fp32."""
        return dequantize_int8(self.qweight[:, : self.in_features], self.scale)


class Bf16Linear(_QuantizedLinearBase):
    """Drop-in for `Linear` with the weight held in bf16 and multiplied in fp32."""

    method = "bf16"

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None,
                 bf16_gemm: bool = False):
        super().__init__()
        self._init_common(weight, bias)
        self.register_buffer("weight_bf16", to_bf16_padded(weight))
        self.bf16_gemm = bf16_gemm

    @classmethod
    def from_linear(cls, linear: Linear, bf16_gemm: bool = False) -> Bf16Linear:
        return cls._from(cls(_weight_nk(linear), linear.bias, bf16_gemm), linear)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        return bf16_matmul(x, self.weight_bf16, self.bf16_gemm)

    def native_rows(self) -> int:
        return native_max_rows("bf16")

    def native_call(self) -> Callable[[ModuleType, torch.Tensor], torch.Tensor]:
        w = self.weight_bf16
        return lambda ext, x: ext.bf16_gemm(x, w)

    def dequantize(self) -> torch.Tensor:
        return self.weight_bf16[:, : self.in_features].float()


class Int4Linear(_QuantizedLinearBase):
    """Drop-in for `Linear` with a group-wise asymmetric int4 weight."""

    method = "int4"

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None,
                 group_size: int = 64, clip_search: bool = True):
        super().__init__()
        self._init_common(weight, bias)
        self.group_size = group_size
        q, sm = quantize_int4_packed(weight, group_size, clip_search)
        self.register_buffer("qweight", q)
        self.register_buffer("scale_min", sm)
        self.register_buffer("scale_min_f32", None)

    @classmethod
    def from_linear(cls, linear: Linear, group_size: int = 64,
                    clip_search: bool = True) -> Int4Linear:
        return cls._from(cls(_weight_nk(linear), linear.bias, group_size, clip_search), linear)

    def _apply(self, fn, recurse=True):
        # Off the CPU the reference path runs: keep an fp32 copy of the (small) scale table.
        out = super()._apply(fn, recurse)
        self.scale_min_f32 = None if self.scale_min.device.type == "cpu" \
            else self.scale_min.float()
        return out

    def native_rows(self) -> int:
        return native_max_rows("int4")

    def native_call(self) -> Callable[[ModuleType, torch.Tensor], torch.Tensor]:
        q, sm, g = self.qweight, self.scale_min, self.group_size
        return lambda ext, x: ext.int4_gemm(x, q, sm, g)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        y = int4_matmul(x, self.qweight, self.scale_min, self.group_size, self.scale_min_f32)
        return y

    def dequantize(self) -> torch.Tensor:
        return dequantize_int4_packed(self.qweight, self.scale_min, self.out_features,
                                      self.in_features)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", group_size={self.group_size}"


class Int8GroupLinear(Int8Linear):
    """Drop-in for `Linear` with 8-bit codes in groups of 32, each with its own scale (and
    min): GGUF's Q8_0 kept as the file holds it (fp16 scales), or a weight quantized that
    way (symmetric per group). Layout: `sparsa.kernels.layout` (u8g)."""

    group_size = 32

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None,
                 scale_dtype: torch.dtype = torch.float16):
        nn.Module.__init__(self)
        self._init_common(weight, bias)
        q, sm = quantize_u8g_padded(weight, scale_dtype)
        self.register_buffer("qweight", q)
        self.register_buffer("scale_min", sm)
        self.w8a8 = False

    @classmethod
    def from_linear(cls, linear: Linear, scale_dtype: torch.dtype = torch.float16
                    ) -> Int8GroupLinear:
        return cls._from(cls(_weight_nk(linear), linear.bias, scale_dtype), linear)

    def native_rows(self) -> int:
        return native_max_rows("int8")

    def native_call(self) -> Callable[[ModuleType, torch.Tensor], torch.Tensor]:
        q, sm = self.qweight, self.scale_min
        return lambda ext, x: ext.u8g_gemm(x, q, sm)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        return u8g_matmul(x, self.qweight, self.scale_min)

    def dequantize(self) -> torch.Tensor:
        return dequantize_u8g(self.qweight, self.scale_min)[:, : self.in_features]

    def decode_rows(self, rows: torch.Tensor, dtype: torch.dtype = torch.float32
                    ) -> torch.Tensor:
        """Weight rows `rows` (int64 [n]) decoded, [n, in_features] in `dtype`."""
        w = dequantize_u8g(self.qweight[rows], self.scale_min[rows])
        return w[:, : self.in_features].to(dtype)

    def extra_repr(self) -> str:
        return super().extra_repr() + ", group_size=32"
