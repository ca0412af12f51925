"""Quantized modules allocated empty in their final form, then filled block of rows by block
of rows as checkpoint tensors stream in: a model loads quantized without ever holding its
full-precision weights (see `sparsa.loader.quantized_load`).

Every scheme works per output row (int8: one scale per row; int4: groups along a row; bf16:
per element), so quantizing one shard of a fused weight, or a block of its rows, writes
exactly the bytes that `quantize_model` writes for the whole weight at once.
"""

from __future__ import annotations

import torch
from torch import nn

from sparsa.kernels.layout import BF16_K_ALIGN, INT8_K_ALIGN, int4_padded_k, pad_to
from sparsa.layers.linear import Linear
from sparsa.layers.moe import FusedExperts
from sparsa.layers.quantization.experts import QuantizedExperts
from sparsa.layers.quantization.modules import (
    Bf16Linear,
    Int4Linear,
    Int8Linear,
)
from sparsa.layers.quantization.schemes import (
    QuantConfig,
    quantize_int4_packed,
    quantize_int8_padded,
    to_bf16_padded,
)

# Weights widened to the compute dtype and quantized at a time: bounds the working memory
# of one tensor (an LM head is vocab x hidden) to ~16 MiB of fp32 plus its temporaries.
_ROW_BLOCK_ELEMS = 1 << 20
_LINEAR_CLASSES = {"int8": Int8Linear, "int4": Int4Linear, "bf16": Bf16Linear}
_SUFFIXES = {"int8": ("q", "s"), "int4": ("q", "sm"), "bf16": ("w",)}


def _rows_buffers(method: str, n: int, k: int, group_size: int, device: torch.device,
                  lead: tuple[int, ...] = ()) -> tuple[torch.Tensor, ...]:
    """Uninitialised storage for n rows of k inputs in `method`'s layout (`lead`: experts)."""
    def empty(*shape: int, dtype: torch.dtype) -> torch.Tensor:
        return torch.empty(*lead, *shape, dtype=dtype, device=device)

    if method == "int8":
        return (empty(n, pad_to(k, INT8_K_ALIGN), dtype=torch.int8),
                empty(n, dtype=torch.float32))
    if method == "int4":
        kp = int4_padded_k(k, group_size)
        return (empty(n, kp // 2, dtype=torch.uint8),
                empty(n, 2, kp // group_size, dtype=torch.bfloat16))
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
        H, inter = mod.hidden_size, mod.intermediate_size
        bufs = {}
        for name, (n, k) in {"w13": (2 * inter, H), "w2": (H, inter)}.items():
            parts = _rows_buffers(config.method, n, k, config.group_size, device,
                                  (mod.num_experts,))
            bufs.update({f"{name}_{s}": t for s, t in zip(_SUFFIXES[config.method], parts)})
        m = QuantizedExperts.from_buffers(config, H, inter, bufs)
        if config.method == "int4":  # as QuantizedExperts.__init__ leaves them
            for name in ("w13", "w2"):
                setattr(m, f"{name}_sm_f32", None)
    else:
        cls = _LINEAR_CLASSES[config.method]
        m = cls.__new__(cls)
        nn.Module.__init__(m)
        N, K = mod.out_features, mod.in_features
        m.out_features, m.in_features = N, K
        m.output_sizes = list(mod.output_sizes)
        m.register_buffer("bias", None if mod.bias is None else
                          torch.empty(N, dtype=torch.float32, device=device))
        parts = _rows_buffers(config.method, N, K, config.group_size, device)
        if config.method == "int8":
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


def _stream_state(m: nn.Module) -> tuple[QuantConfig, torch.dtype]:
    state = getattr(m, "_stream", None)
    if state is None:
        raise ValueError(f"{type(m).__name__} was not allocated for streamed loading "
                         "(empty_quantized); it cannot take checkpoint tensors")
    return state


def _write_rows(m: nn.Module, dest: tuple[torch.Tensor, ...], r0: int,
                w: torch.Tensor) -> None:
    """Quantize w [n, K] (any float dtype, any device) into rows r0.. of `dest`."""
    config, dtype = _stream_state(m)
    n, K = w.shape
    step = max(1, _ROW_BLOCK_ELEMS // max(K, 1))
    device = dest[0].device
    for i in range(0, n, step):
        block = w[i : i + step].to(device=device, dtype=dtype)
        if config.method == "int8":
            parts: tuple[torch.Tensor, ...] = quantize_int8_padded(block)
        elif config.method == "int4":
            parts = quantize_int4_packed(block, config.group_size, config.clip_search)
        else:
            parts = (to_bf16_padded(block),)
        rows = slice(r0 + i, r0 + i + block.shape[0])
        for d, p in zip(dest, parts):
            d[rows] = p


def load_linear_shard(m: nn.Module, name: str, loaded: torch.Tensor,
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
    if m.method == "int8":
        dest: tuple[torch.Tensor, ...] = (m.qweight, m.scale)
    elif m.method == "int4":
        dest = (m.qweight, m.scale_min)
    else:
        dest = (m.weight_bf16,)
    _write_rows(m, dest, start, loaded)


def load_expert_rows(m: QuantizedExperts, expert: int, which: str,
                     loaded: torch.Tensor) -> None:
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
    dest = tuple(getattr(m, f"{name}_{s}")[expert] for s in _SUFFIXES[m.method])
    _write_rows(m, dest, r0, loaded)
