"""Quantize a whole model in place: every `Linear` and `FusedExperts`, routers excepted."""

from __future__ import annotations

import gc

import torch
from torch import nn

from sparsa.layers.linear import Linear
from sparsa.layers.moe import FusedExperts
from sparsa.layers.quantization.experts import QuantizedExperts
from sparsa.layers.quantization.modules import (
    Bf16Linear,
    Int4Linear,
    Int8GroupLinear,
    Int8Linear,
)
from sparsa.layers.quantization.schemes import QuantConfig


def _tensor_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        if t is None:
            continue
        key = (t.device, t.untyped_storage().data_ptr()) if t.numel() else None
        if key is not None and key in seen:
            continue
        if key is not None:
            seen.add(key)
        total += t.numel() * t.element_size()
    return total


def module_bytes(module: nn.Module) -> int:
    """Bytes of the parameters and buffers of a module (shared storage counted once)."""
    return _tensor_bytes(list(module.parameters()) + list(module.buffers()))


def is_router(name: str, parent: nn.Module | None) -> bool:
    attr = name.rsplit(".", 1)[-1]
    if attr == "shared_expert_gate":
        return True
    return attr == "gate" and parent is not None and hasattr(parent, "experts")


def quantization_targets(model: nn.Module, config: QuantConfig
                         ) -> tuple[list[tuple[str, nn.Module]], list[str]]:
    """(name, module) of every `Linear` and `FusedExperts` that `config` quantizes, in
    module order, and the names of the Linears it skips (routers, LM head)."""
    targets: list[tuple[str, nn.Module]] = []
    skipped: list[str] = []
    for name, mod in model.named_modules():
        if not isinstance(mod, (Linear, FusedExperts)):
            continue
        parent_name = name.rpartition(".")[0]
        parent = model.get_submodule(parent_name) if parent_name else model
        skip = (config.skip_router and is_router(name, parent)) or \
            ((config.skip_lm_head or config.lm_head == "none") and name == "lm_head")
        if isinstance(mod, Linear) and skip:
            skipped.append(name)
            continue
        targets.append((name, mod))
    return targets, skipped


def quantize_linear(linear: Linear, config: QuantConfig) -> nn.Module:
    if config.method == "int8" and config.int8_group_size:
        return Int8GroupLinear.from_linear(linear, config.scale_dtype)
    if config.method == "int8":
        return Int8Linear.from_linear(linear, config.int8_activations == "dynamic")
    if config.method == "int4":
        return Int4Linear.from_linear(linear, config.group_size, config.clip_search)
    if config.method == "bf16":
        return Bf16Linear.from_linear(linear, config.bf16_prefill)
    raise ValueError(f"nothing to quantize with method {config.method!r}")


@torch.no_grad()
def quantize_model(model: nn.Module, config: QuantConfig) -> dict:
    """Swap every `Linear` and `FusedExperts` of `model` for its quantized version, in place,
    and drop the full-precision weights. Skips MoE routers (`skip_router`) and the LM head
    (`skip_lm_head`). A tied LM head is quantized into its own int8/int4 copy (the embedding
    table keeps the fp32 weights, so nothing is freed for it, but decode reads the small copy).

    Returns stats: method, group_size, num_linear, num_experts (quantized modules),
    skipped (names), bytes_before / bytes_after (of the weights that were quantized),
    model_bytes_before / model_bytes_after (all parameters and buffers)."""
    if not isinstance(config, QuantConfig):
        raise TypeError("config must be a QuantConfig")
    stats = {"method": config.method,
             "group_size": config.group_size if config.method == "int4" else None,
             "num_linear": 0, "num_experts": 0, "skipped": [], "bytes_before": 0,
             "bytes_after": 0, "model_bytes_before": module_bytes(model)}
    if not config.enabled:
        stats["model_bytes_after"] = stats["model_bytes_before"]
        return stats
    targets, stats["skipped"] = quantization_targets(model, config)
    targets.reverse()
    while targets:  # pop as we go, so each full-precision weight is freed once replaced
        name, mod = targets.pop()
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        if isinstance(mod, FusedExperts):
            new = QuantizedExperts(mod, config)
            stats["bytes_before"] += _tensor_bytes([mod.w13, mod.w2])
            stats["num_experts"] += 1
        else:
            new = quantize_linear(mod, config.for_module(name))
            stats["bytes_before"] += _tensor_bytes([mod.weight, mod.bias])
            stats["num_linear"] += 1
        stats["bytes_after"] += module_bytes(new)
        setattr(parent, attr, new)
        del mod, new
    gc.collect()
    stats["model_bytes_after"] = module_bytes(model)
    return stats
