"""Writing checkpoint rows into quantized modules allocated by `streaming.empty_quantized`:
each tensor is quantized a block of rows at a time, so loading never holds a whole
full-precision weight. The modules' `load_shard` / `load_expert` call these."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from sparsa.layers.quantization.blocks import GROUP, Int4Rows, Int8Rows, QuantizedRows
from sparsa.layers.quantization.schemes import (
    QuantConfig,
    quantize_int4_packed,
    quantize_int8_padded,
    quantize_u8g_padded,
    to_bf16_padded,
)

if TYPE_CHECKING:
    from sparsa.layers.quantization.experts import QuantizedExperts

# Weights widened to the compute dtype and quantized at a time: bounds the working memory
# of one tensor (an LM head is vocab x hidden) to ~16 MiB of fp32 plus its temporaries.
_ROW_BLOCK_ELEMS = 1 << 20
SUFFIXES = {"int8": ("q", "s"), "int4": ("q", "sm"), "bf16": ("w",)}


def _stream_state(m: nn.Module) -> tuple[QuantConfig, torch.dtype]:
    state = getattr(m, "_stream", None)
    if state is None:
        raise ValueError(f"{type(m).__name__} was not allocated for streamed loading "
                         "(empty_quantized); it cannot take checkpoint tensors")
    return state


def _write_rows(m: nn.Module, dest: tuple[torch.Tensor, ...], r0: int,
                w: torch.Tensor | QuantizedRows) -> None:
    """Quantize w [n, K] (any float dtype, any device) into rows r0.. of `dest`. 4-bit
    rows already in groups of 32 (GGUF Q4_0/Q4_1) are copied as they are into an int4
    group-32 form with fp16 scales; into any other form they are decoded and quantized."""
    config, dtype = _stream_state(m)
    n, K = w.shape
    u8g = config.method == "int8" and dest[0].dtype == torch.uint8
    if isinstance(w, (Int4Rows, Int8Rows)):
        exact = dest[-1].dtype == torch.float16 and (
            (isinstance(w, Int4Rows) and config.method == "int4"
             and config.group_size == GROUP) or (isinstance(w, Int8Rows) and u8g))
        if exact:
            q, sm = w.packed(dest[0].shape[-1] * (2 if config.method == "int4" else 1))
            dest[0][r0 : r0 + n] = q.to(dest[0].device)
            dest[1][r0 : r0 + n] = sm.to(dest[1].device)
            return
        w = w.dequantize(dtype)
    step = max(1, _ROW_BLOCK_ELEMS // max(K, 1))
    device = dest[0].device
    for i in range(0, n, step):
        block = w[i : i + step].to(device=device, dtype=dtype)
        if u8g:
            parts: tuple[torch.Tensor, ...] = quantize_u8g_padded(block, dest[1].dtype)
        elif config.method == "int8":
            parts = quantize_int8_padded(block)
        elif config.method == "int4":
            parts = quantize_int4_packed(block, config.group_size, config.clip_search,
                                         config.scale_dtype)
        else:
            parts = (to_bf16_padded(block),)
        rows = slice(r0 + i, r0 + i + block.shape[0])
        for d, p in zip(dest, parts):
            d[rows] = p


def load_linear_shard(m: nn.Module, name: str, loaded: torch.Tensor | QuantizedRows,
                      shard: int | None) -> None:
    """A checkpoint tensor ([out, in] weight or [out] bias of one shard, or of the whole
    fused layer when `shard` is None) into a quantized Linear from `empty_quantized`."""
    _, dtype = _stream_state(m)
    start, stop = 0, m.out_features
    if shard is not None:
        start = sum(m.output_sizes[:shard])
        stop = start + m.output_sizes[shard]
    if name == "bias":
        if m.bias is None:
            raise ValueError("checkpoint has a bias for a linear layer built without one")
        if tuple(loaded.shape) != (stop - start,):
            raise ValueError(f"shape mismatch for bias (shard {shard}): checkpoint "
                             f"{tuple(loaded.shape)}, model {(stop - start,)}")
        m.bias[start:stop].copy_(loaded.to(dtype))  # the fp model held it in `dtype`
        return
    if name != "weight":
        raise ValueError(f"a linear layer has no {name!r}")
    if tuple(loaded.shape) != (stop - start, m.in_features):
        raise ValueError(f"shape mismatch for weight (shard {shard}): checkpoint "
                         f"{tuple(loaded.shape)}, model {(stop - start, m.in_features)}")
    if m.method == "int8" and m.qweight.dtype == torch.uint8:  # 8-bit groups
        dest: tuple[torch.Tensor, ...] = (m.qweight, m.scale_min)
    elif m.method == "int8":
        dest = (m.qweight, m.scale)
    elif m.method == "int4":
        dest = (m.qweight, m.scale_min)
    else:
        dest = (m.weight_bf16,)
    _write_rows(m, dest, start, loaded)


def load_expert_rows(m: QuantizedExperts, expert: int, which: str,
                     loaded: torch.Tensor | QuantizedRows) -> None:
    """One expert's checkpoint projection ('gate' | 'up' | 'down', [out, in]) into a
    QuantizedExperts from `empty_quantized`: gate and up are the rows of w13."""
    if not 0 <= expert < m.num_experts:
        raise ValueError(f"expert index {expert} out of range (model has {m.num_experts})")
    inter, H = m.intermediate_size, m.hidden_size
    layout = {"gate": ("w13", 0, (inter, H)), "up": ("w13", inter, (inter, H)),
              "down": ("w2", 0, (H, inter))}
    if which not in layout:
        raise ValueError(f"unknown expert projection {which!r}")
    name, r0, shape = layout[which]
    if tuple(loaded.shape) != shape:
        raise ValueError(f"expert {expert} {which}: checkpoint shape {tuple(loaded.shape)}, "
                         f"model {shape}")
    dest = tuple(getattr(m, f"{name}_{s}")[expert] for s in SUFFIXES[m.method])
    _write_rows(m, dest, r0, loaded)
