"""Load a model straight into its quantized form (int8, int4, bf16), tensor by tensor.

The model is built with its parameters on the meta device; every Linear and FusedExperts
that the quantization config converts is swapped for its quantized module, allocated in its
final form (`sparsa.layers.quantization.streaming`), and the rest (embeddings, norms,
routers) gets real storage. Checkpoint tensors then stream in one at a time and are
quantized into place a block of rows at a time, so the peak is the final weights plus one
checkpoint tensor and a small working buffer, never a full-precision copy of the model.
The result is bit-identical to building the full-precision model and quantizing it
(`quantize_model`): tests/loader/test_quantized_load.py holds that.
"""

from __future__ import annotations

import gc
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from sparsa.layers.moe import FusedExperts
from sparsa.layers.quantization.embedding import share_tied_table
from sparsa.layers.quantization.model import (
    _tensor_bytes,
    module_bytes,
    quantization_targets,
    quantize_linear,
)
from sparsa.layers.quantization.schemes import QuantConfig
from sparsa.layers.quantization.streaming import empty_quantized, finish_streamed

# (elements per unit, function(unit index, the unit's values in the parameter's layout))
_Sink = tuple[int, Callable[[int, torch.Tensor], None]]


@dataclass
class StreamedModel:
    """A model being loaded quantized: `model` holds the empty quantized modules."""

    model: nn.Module
    config: QuantConfig
    # names of the weights (and expert projections) a checkpoint must fill; see load_weights
    expected: set[str]
    # quantized Linears whose weight is shared (a tied LM head): quantized after loading,
    # from the loaded shared tensor, as quantize_model does it
    deferred: list[str] = field(default_factory=list)
    # (name, shape, dtype, where the values go) of every parameter of the full-precision
    # model, in its named_parameters() order: the order dummy weights are drawn in
    plan: list[tuple[str, tuple[int, ...], torch.dtype, _Sink | nn.Parameter]] = \
        field(default_factory=list)
    targets: list[str] = field(default_factory=list)
    stats: dict = field(default_factory=dict)


def _param_bytes(params) -> int:
    return sum(p.numel() * p.element_size() for p in params)


def _owners(model: nn.Module) -> dict[int, int]:
    """How many modules own each parameter (more than one: tied)."""
    count: dict[int, int] = {}
    for mod in model.modules():
        for p in mod._parameters.values():
            if p is not None:
                count[id(p)] = count.get(id(p), 0) + 1
    return count


def _is_shared(mod: nn.Module, owners: dict[int, int]) -> bool:
    return any(owners[id(p)] > 1 for p in mod._parameters.values() if p is not None)


def materialize_parameters(model: nn.Module, device: torch.device) -> None:
    """Give every meta parameter real (uninitialised) storage; tied ones stay tied."""
    done: dict[int, nn.Parameter] = {}
    for mod in model.modules():
        for name, p in list(mod._parameters.items()):
            if p is None or not p.is_meta:
                continue
            if id(p) not in done:
                done[id(p)] = nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device=device),
                                           requires_grad=False)
            mod._parameters[name] = done[id(p)]


def _sinks(mod: nn.Module, new: nn.Module) -> dict[str, _Sink]:
    """Where dummy values of `mod`'s parameters go in its quantized replacement `new`."""
    if isinstance(mod, FusedExperts):
        H, inter = mod.hidden_size, mod.intermediate_size

        def w13(e: int, u: torch.Tensor) -> None:
            u = u.view(H, 2 * inter)  # [in, out]: the gate's outputs, then the up's
            new.load_expert(e, "gate", u[:, :inter].t())
            new.load_expert(e, "up", u[:, inter:].t())

        def w2(e: int, u: torch.Tensor) -> None:
            new.load_expert(e, "down", u.view(inter, H).t())

        return {"w13": (H * 2 * inter, w13), "w2": (inter * H, w2)}

    def weight(_: int, u: torch.Tensor) -> None:
        w = u.view(mod.weight.shape)
        new.load_shard("weight", w.t() if mod.transposed else w, None)

    def bias(_: int, u: torch.Tensor) -> None:
        new.load_shard("bias", u, None)

    return {"weight": (mod.weight.numel(), weight), "bias": (mod.out_features, bias)}


def build_streamed(hf_config, dtype: torch.dtype, device: torch.device,
                   config: QuantConfig) -> StreamedModel:
    """The model with empty quantized modules and uninitialised other parameters."""
    from sparsa.loader.meta import parameters_on_meta
    from sparsa.loader.weights import build_model, expected_entries

    with parameters_on_meta():
        model = build_model(hf_config, dtype, device)
    params = dict(model.named_parameters())  # tied weights once, in the order dummies use
    sm = StreamedModel(model, config, expected_entries(model))
    sm.stats = {"method": config.method,
                "group_size": config.group_size if config.method == "int4" else None,
                "num_linear": 0, "num_experts": 0, "bytes_before": 0, "bytes_after": 0,
                "model_bytes_before": _param_bytes(params.values())
                + _tensor_bytes(model.buffers())}
    targets, sm.stats["skipped"] = quantization_targets(model, config)
    owners = _owners(model)
    sinks: dict[str, _Sink] = {}
    sm.targets = [name for name, _ in targets]
    for name, mod in targets:
        sm.stats["bytes_before"] += _param_bytes(p for p in mod._parameters.values()
                                                 if p is not None)
        sm.stats["num_experts" if isinstance(mod, FusedExperts) else "num_linear"] += 1
        if _is_shared(mod, owners):
            sm.deferred.append(name)
            continue
        new = empty_quantized(mod, config.for_module(name), device, dtype)
        prefix = f"{name}." if name else ""
        sinks.update({prefix + k: v for k, v in _sinks(mod, new).items()})
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, attr, new)
    materialize_parameters(model, device)
    real = dict(model.named_parameters())
    sm.plan = [(n, tuple(p.shape), p.dtype, sinks[n] if n in sinks else real[n])
               for n, p in params.items()]
    return sm


def finish(sm: StreamedModel) -> dict:
    """Quantize the deferred (tied) Linears, end the loading state; returns the stats
    `quantize_model` would have returned."""
    model = sm.model
    for name in sm.deferred:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, quantize_linear(getattr(parent, attr),
                                              sm.config.for_module(name)))
    finish_streamed(model)
    share_tied_table(model)
    sm.stats["bytes_after"] = sum(module_bytes(model.get_submodule(n)) for n in sm.targets)
    gc.collect()
    sm.stats["model_bytes_after"] = module_bytes(model)
    return sm.stats


@torch.no_grad()
def init_dummy_streamed(sm: StreamedModel, seed: int = 0, std: float = 0.02) -> None:
    """The values `model_loader.init_dummy_weights` draws for the full-precision model
    (same generator, same order, same chunks), each quantized as it is drawn: parameters
    of quantized modules are drawn into a buffer of one unit (an expert, or a whole Linear
    weight) in the full-precision dtype and handed over as each unit fills."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    step = 1 << 24
    for name, shape, dtype, sink in sm.plan:
        numel = math.prod(shape)
        if isinstance(sink, nn.Parameter):
            if name.endswith("norm.weight"):
                sink.data.fill_(1.0)
                continue
            flat = sink.data.view(-1)
            for s in range(0, numel, step):
                chunk = torch.randn(min(step, numel - s), generator=gen) * std
                flat[s : s + chunk.numel()].copy_(chunk)
            continue
        unit, put = sink
        if name.endswith("norm.weight"):  # never a quantized layer's, but keep the rule
            for i in range(numel // unit):
                put(i, torch.ones(unit, dtype=dtype))
            continue
        buf = torch.empty(unit, dtype=dtype)
        filled = 0
        index = 0
        for s in range(0, numel, step):
            chunk = torch.randn(min(step, numel - s), generator=gen) * std
            pos = 0
            while pos < chunk.numel():
                n = min(unit - filled, chunk.numel() - pos)
                buf[filled : filled + n].copy_(chunk[pos : pos + n])
                filled += n
                pos += n
                if filled == unit:
                    put(index, buf)
                    index += 1
                    filled = 0


def final_form_bytes(hf_config, dtype: torch.dtype, config: QuantConfig) -> tuple[int, bool]:
    """(bytes of the parameters and buffers of the model as it will run: quantized modules
    at their quantized size, the rest in `dtype`; whether it has routed experts), from a
    model built with its parameters on the meta device (its shapes are those the
    checkpoint's headers hold, or loading it fails)."""
    from sparsa.loader.meta import parameters_on_meta
    from sparsa.loader.weights import build_model

    # only the parameters on meta: the meta device's buffers would fail YaRN's tables
    with parameters_on_meta():
        model = build_model(hf_config, dtype, torch.device("cpu"))
    routed = any(isinstance(m, FusedExperts) for m in model.modules())
    params = {id(p): p for p in model.parameters()}
    total = _param_bytes(model.buffers())
    if config.enabled:
        owners = _owners(model)
        meta = torch.device("meta")
        for name, mod in quantization_targets(model, config)[0]:
            total += _param_bytes(empty_quantized(mod, config.for_module(name), meta,
                                                  dtype).buffers())
            if not _is_shared(mod, owners):  # a tied LM head's table stays, as it is
                for p in mod._parameters.values():
                    if p is not None:
                        params.pop(id(p), None)
    return total + _param_bytes(params.values()), routed

