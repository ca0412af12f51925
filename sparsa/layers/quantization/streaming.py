"""Quantized modules allocated empty in their final form, then filled block of rows by block
of rows as checkpoint tensors stream in: a model loads quantized without ever holding its
full-precision weights (see `sparsa.loader.quantized_load`).

Every scheme works per output row (int8: one scale per row; int4: groups along a row; bf16:
per element), so quantizing one shard of a fused weight, or a block of its rows, writes
exactly the bytes that `quantize_model` writes for the whole weight at once.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from sparsa.kernels.layout import (
    BF16_K_ALIGN,
    INT8_K_ALIGN,
    U8G_K_ALIGN,
    int4_padded_k,
    pad_to,
)
from sparsa.layers.linear import Linear
from sparsa.layers.moe import FusedExperts
from sparsa.layers.quantization.experts import QuantizedExperts
from sparsa.layers.quantization.modules import (
    Bf16Linear,
    Int4Linear,
    Int8GroupLinear,
    Int8Linear,
)
from sparsa.layers.quantization.rows import SUFFIXES, load_expert_rows, load_linear_shard
from sparsa.layers.quantization.schemes import QuantConfig

_LINEAR_CLASSES = {"int8": Int8Linear, "int4": Int4Linear, "bf16": Bf16Linear}


def _rows_buffers(method: str, n: int, k: int, group_size: int, device: torch.device,
                  lead: tuple[int, ...] = (), scale_dtype: torch.dtype = torch.bfloat16
                  ) -> tuple[torch.Tensor, ...]:
    """Uninitialised storage for n rows of k inputs in `method`'s layout (`lead`: experts);
    `group_size`: int4's, or for int8 0 (per row) or 32 (u8g)."""
    def empty(*shape: int, dtype: torch.dtype) -> torch.Tensor:
        return torch.empty(*lead, *shape, dtype=dtype, device=device)

    if method == "int8" and group_size:  # 8-bit groups (u8g)
        kp = pad_to(k, U8G_K_ALIGN)
        return (empty(n, kp, dtype=torch.uint8), empty(n, 2, kp // 32, dtype=scale_dtype))
    if method == "int8":
        return (empty(n, pad_to(k, INT8_K_ALIGN), dtype=torch.int8),
                empty(n, dtype=torch.float32))
    if method == "int4":
        kp = int4_padded_k(k, group_size)
        return (empty(n, kp // 2, dtype=torch.uint8),
                empty(n, 2, kp // group_size, dtype=scale_dtype))
    if method == "bf16":
        return (empty(n, pad_to(k, BF16_K_ALIGN), dtype=torch.bfloat16),)
    raise ValueError(f"nothing to quantize with method {method!r}")


def empty_quantized(mod: Linear | FusedExperts, config: QuantConfig, device: torch.device,
                    load_dtype: torch.dtype) -> nn.Module:
    """The quantized drop-in for `mod` (as `quantize_model` would make it), its weights
    allocated but not written. `load_dtype`: the dtype the full-precision model would hold
    the weights in; each streamed tensor is rounded to it before quantizing, as loading
    into that model and quantizing it does. `finish_streamed` ends the loading state."""
    if isinstance(mod, FusedExperts):
        if config.int8_group_size:  # routed experts have per-row int8 only
            config = replace(config, int8_group_size=0)
        H, inter = mod.hidden_size, mod.intermediate_size
        bufs = {}
        for name, (n, k) in {"w13": (2 * inter, H), "w2": (H, inter)}.items():
            parts = _rows_buffers(config.method, n, k,
                                  0 if config.method == "int8" else config.group_size,
                                  device, (mod.num_experts,), config.scale_dtype)
            bufs.update({f"{name}_{s}": t for s, t in zip(SUFFIXES[config.method], parts)})
        m = QuantizedExperts.from_buffers(config, H, inter, bufs)
        if config.method == "int4":  # as QuantizedExperts.__init__ leaves them
            for name in ("w13", "w2"):
                setattr(m, f"{name}_sm_f32", None)
    else:
        grouped = config.method == "int8" and config.int8_group_size
        cls = Int8GroupLinear if grouped else _LINEAR_CLASSES[config.method]
        m = cls.__new__(cls)
        nn.Module.__init__(m)
        N, K = mod.out_features, mod.in_features
        m.out_features, m.in_features = N, K
        m.output_sizes = list(mod.output_sizes)
        m.register_buffer("bias", None if mod.bias is None else
                          torch.empty(N, dtype=torch.float32, device=device))
        group = config.int8_group_size if config.method == "int8" else config.group_size
        parts = _rows_buffers(config.method, N, K, group, device,
                              scale_dtype=config.scale_dtype)
        if grouped:
            m.register_buffer("qweight", parts[0])
            m.register_buffer("scale_min", parts[1])
            m.w8a8 = False
        elif config.method == "int8":
            m.register_buffer("qweight", parts[0])
            m.register_buffer("scale", parts[1])
            m.w8a8 = config.int8_activations == "dynamic"
        elif config.method == "int4":
            m.group_size = config.group_size
            m.register_buffer("qweight", parts[0])
            m.register_buffer("scale_min", parts[1])
            m.register_buffer("scale_min_f32", None)
        else:
            m.register_buffer("weight_bf16", parts[0])
            m.bf16_gemm = config.bf16_prefill
    m._stream = (config, load_dtype)
    return m


def finish_streamed(model: nn.Module) -> None:
    """Drop the loading state `empty_quantized` left on the modules."""
    for mod in model.modules():
        mod.__dict__.pop("_stream", None)


__all__ = ["empty_quantized", "finish_streamed", "load_expert_rows", "load_linear_shard"]
