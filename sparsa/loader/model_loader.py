"""Resolve a model reference to an HF config, build our model and fill its weights."""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from sparsa.config import ModelConfig, parse_dtype
from sparsa.layers.quantization.schemes import QuantConfig
from sparsa.loader.safetensors_reader import CheckpointError, SafetensorsCheckpoint
from sparsa.models.builtin_configs import BUILTIN_CONFIGS, builtin_config
from sparsa.models.registry import resolve_architecture

log = logging.getLogger(__name__)

# Applied after the model's own rename rules. (pattern, replacement, action): action None
# renames and goes on; an int loads one shard of a fused Linear; a str loads one expert
# projection ('gate' | 'up' | 'down') into a FusedExperts module.
_DEFAULT_RULES: list[tuple[str, str, int | str | None]] = [
    (r"^(.*)\.experts\.(\d+)\.(?:w1|gate_proj)\.weight$", r"\1.experts", "gate"),
    (r"^(.*)\.experts\.(\d+)\.(?:w3|up_proj)\.weight$", r"\1.experts", "up"),
    (r"^(.*)\.experts\.(\d+)\.(?:w2|down_proj)\.weight$", r"\1.experts", "down"),
    (r"^(.*)\.q_proj\.(weight|bias)$", r"\1.qkv_proj.\2", 0),
    (r"^(.*)\.k_proj\.(weight|bias)$", r"\1.qkv_proj.\2", 1),
    (r"^(.*)\.v_proj\.(weight|bias)$", r"\1.qkv_proj.\2", 2),
    (r"^(.*)\.gate_proj\.(weight|bias)$", r"\1.gate_up_proj.\2", 0),
    (r"^(.*)\.up_proj\.(weight|bias)$", r"\1.gate_up_proj.\2", 1),
]
_IGNORED = re.compile(r"(rotary_emb\.inv_freq|\.rotary_emb\.|num_batches_tracked)")


@dataclass
class ResolvedModel:
    hf_config: object
    model_dir: Path | None  # None for built-in configs (dummy weights only)
    name: str


def _config_from_dict(d: dict):
    from transformers import AutoConfig

    d = dict(d)
    model_type = d.pop("model_type", None)
    if not model_type:
        raise ValueError("config has no 'model_type'")
    try:
        return AutoConfig.for_model(model_type, **d)
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"malformed model config: {e}") from None


def load_hf_config(model_dir: Path):
    path = model_dir / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{model_dir} has no config.json")
    try:
        d = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(d, dict):
        raise ValueError(f"{path} must hold a JSON object")
    for key in ("hidden_size", "num_hidden_layers", "vocab_size"):
        if key in d and (not isinstance(d[key], int) or d[key] <= 0):
            raise ValueError(f"{path}: {key} must be a positive integer, got {d[key]!r}")
    return _config_from_dict(d)


def resolve_model(mc: ModelConfig) -> ResolvedModel:
    p = Path(mc.model).expanduser()
    if p.is_file():
        from sparsa.loader.llama2c import is_llama2c_checkpoint, resolve_llama2c

        if not is_llama2c_checkpoint(p):
            raise ValueError(f"{p} is a file but not a llama2.c checkpoint; pass a model directory")
        p = Path(resolve_llama2c(p))
    if p.is_dir():
        config = load_hf_config(p)
        name = p.name
        model_dir = p
    elif mc.model in BUILTIN_CONFIGS:
        config = _config_from_dict(builtin_config(mc.model))
        name = mc.model
        model_dir = None
        if mc.load_format == "safetensors":
            raise ValueError(f"{mc.model!r} is a built-in config: it has no weights to load; "
                             "use load_format='dummy'")
    else:
        raise FileNotFoundError(
            f"model {mc.model!r} not found: not a local directory, a llama2.c .bin file, or a "
            f"built-in config ({', '.join(BUILTIN_CONFIGS)})"
        )
    for k, v in mc.hf_overrides.items():
        setattr(config, k, v)
    return ResolvedModel(config, model_dir, name)


def checkpoint_dtype(hf_config) -> torch.dtype:
    dt = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None)
    if isinstance(dt, str):
        dt = parse_dtype(dt) if dt != "auto" else None
    return dt if isinstance(dt, torch.dtype) else torch.float32


def choose_dtype(requested: str, hf_config, device: torch.device) -> torch.dtype:
    dt = parse_dtype(requested)
    if dt is not None:
        if device.type == "cpu" and dt != torch.float32:
            log.warning("%s on CPU: GEMMs without bf16/fp16 hardware are very slow", dt)
        return dt
    dt = checkpoint_dtype(hf_config)
    if device.type == "cpu" and dt in (torch.bfloat16, torch.float16):
        # No half-precision GEMM on most CPUs: compute in fp32 (prefill would be ~600x slower).
        return torch.float32
    return dt


def build_model(hf_config, dtype: torch.dtype, device: torch.device) -> nn.Module:
    cls = resolve_architecture(hf_config)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = cls(hf_config)
    finally:
        torch.set_default_dtype(prev)
    return model.eval()


def _apply_rule(name: str, rules) -> tuple[str, int | str | None, int | None]:
    for pattern, repl, action in rules:
        m = re.search(pattern, name)
        if not m:
            continue
        if action is None:
            name = re.sub(pattern, repl, name)
            continue
        expert = int(m.group(2)) if isinstance(action, str) else None
        return m.expand(repl), action, expert
    return name, None, None


def load_weights(model: nn.Module, weights, extra_rules=None,
                 expert_sink: dict | None = None, expected: set[str] | None = None) -> None:
    """Copy checkpoint tensors into the model; every parameter must be covered (`expected`:
    the entries to cover, when the model's modules no longer say it: `_expected_entries`
    of the model before its layers were swapped for quantized ones).

    With `expert_sink` (a dict; `weights` must then be a SafetensorsCheckpoint) routed-expert
    tensors are not read: their names go to expert_sink[(module name, expert, which)] for
    an offloaded expert store to fetch later."""
    rules = list(getattr(model, "weight_rules", [])) + list(extra_rules or []) + _DEFAULT_RULES
    params = dict(model.named_parameters(remove_duplicate=False))
    modules = dict(model.named_modules())
    filled: set[str] = set()
    skip: set[str] = set()
    if expert_sink is not None:
        for ckpt_name in weights.names():
            if _IGNORED.search(ckpt_name):
                continue
            target, action, expert = _apply_rule(ckpt_name, rules)
            if isinstance(action, str):
                if target not in modules or not hasattr(modules[target], "load_expert"):
                    raise CheckpointError(
                        f"checkpoint tensor {ckpt_name!r} has no place in the model")
                expert_sink[(target, expert, action)] = ckpt_name
                filled.add(f"{target}.{action}.{expert}")
                skip.add(ckpt_name)
        weights = weights.tensors(skip)
    for ckpt_name, tensor in weights:
        if _IGNORED.search(ckpt_name):
            continue
        target, action, expert = _apply_rule(ckpt_name, rules)
        if isinstance(action, str):
            mod = modules.get(target)
            if mod is None or not hasattr(mod, "load_expert"):
                raise CheckpointError(f"checkpoint tensor {ckpt_name!r} has no place in the model")
            mod.load_expert(expert, action, tensor)
            filled.add(f"{target}.{action}.{expert}")
            continue
        mod_name, _, pname = target.rpartition(".")
        mod = modules.get(mod_name)
        if isinstance(action, int):
            if mod is None or not hasattr(mod, "load_shard"):
                raise CheckpointError(f"checkpoint tensor {ckpt_name!r} has no place in the model")
            mod.load_shard(pname, tensor, action)
            filled.add(f"{target}#{action}")
            continue
        if pname in ("weight", "bias") and hasattr(mod, "load_shard"):
            mod.load_shard(pname, tensor, None)
            filled.add(target)
            continue
        if target not in params:
            raise CheckpointError(
                f"checkpoint tensor {ckpt_name!r} has no place in the model "
                f"({type(model).__name__})"
            )
        param = params[target]
        if tuple(param.shape) != tuple(tensor.shape):
            raise CheckpointError(
                f"shape mismatch for {ckpt_name!r}: checkpoint {tuple(tensor.shape)}, "
                f"model {tuple(param.shape)}"
            )
        param.data.copy_(tensor)
        filled.add(target)
    _check_complete(filled, _expected_entries(model) if expected is None else expected)


def _expected_entries(model: nn.Module) -> set[str]:
    from sparsa.layers.linear import Linear
    from sparsa.layers.moe import FusedExperts

    expected: set[str] = set()
    covered: set[str] = set()
    for mname, mod in model.named_modules():
        if isinstance(mod, FusedExperts):
            for e in range(mod.num_experts):
                for which in ("gate", "up", "down"):
                    expected.add(f"{mname}.{which}.{e}")
            covered |= {f"{mname}.w13", f"{mname}.w2"}
        elif isinstance(mod, Linear) and len(mod.output_sizes) > 1:
            for pname in ("weight", "bias"):
                if getattr(mod, pname) is not None:
                    for s in range(len(mod.output_sizes)):
                        expected.add(f"{mname}.{pname}#{s}")
                    covered.add(f"{mname}.{pname}")
    for pname, _ in model.named_parameters():  # tied weights appear once
        if pname not in covered:
            expected.add(pname)
    return expected


def _check_complete(filled: set[str], expected: set[str]) -> None:
    missing = sorted(expected - filled)
    if missing:
        shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8
                                          else "")
        raise CheckpointError(f"checkpoint is missing tensors: {shown}")


@torch.no_grad()
def init_dummy_weights(model: nn.Module, seed: int = 0, std: float = 0.02) -> None:
    """Random weights from a seed; norms stay 1 so activations keep a sane scale."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.fill_(1.0)
            continue
        # fill in chunks so a multi-GB tensor never needs an fp32 temporary of its own size
        flat = p.data.view(-1)
        step = 1 << 24
        for s in range(0, flat.numel(), step):
            chunk = torch.randn(min(step, flat.numel() - s), generator=gen) * std
            flat[s : s + chunk.numel()].copy_(chunk)


def _available_bytes(device: torch.device) -> int:
    from sparsa.engine.model_runner import total_memory_bytes

    return total_memory_bytes(device)


def _check_fit(mc: ModelConfig, resolved: ResolvedModel, dtype: torch.dtype,
               device: torch.device, qc: QuantConfig) -> ModelConfig:
    """Refuse (or, for an MoE checkpoint on disk, offload the experts of) a model whose
    weights exceed the device's available memory, before allocating them: loading it would
    end in the kernel's OOM killer (or a CUDA OOM) half-way. The weights are sized in the
    form they run in, which is the form they are loaded into (a quantized model streams
    into its quantized form, `quantized_load`): quantized layers at their quantized size,
    the rest in the compute dtype, from the model built with its parameters on the meta
    device (the shapes the checkpoint's headers must match); unquantized, from the
    checkpoint's headers alone."""
    from sparsa.info import _cfg
    from sparsa.loader.quantized_load import final_form_bytes

    on_disk = resolved.model_dir is not None and mc.load_format != "dummy"
    if on_disk and not qc.enabled:
        # the headers alone: a meta model would first import torch's meta kernels (~80 MB)
        need = SafetensorsCheckpoint(resolved.model_dir).bytes_as(dtype)
        routed = bool(_cfg(resolved.hf_config, "num_local_experts", "num_experts",
                           "n_routed_experts"))
    else:
        need, routed = final_form_bytes(resolved.hf_config, dtype, qc)
    avail = _available_bytes(device)
    if need <= avail:
        return mc
    gib = 2 ** 30
    form = f"in {dtype}" if not qc.enabled else f"in {qc.method} form (the rest in {dtype})"
    what = (f"{resolved.name}: its weights take {need / gib:.2f} GiB {form} and "
            f"{device} has {avail / gib:.2f} GiB available")
    can_offload = routed and on_disk
    if mc.when_too_large == "offload" and can_offload:
        # on a GPU the experts that do not fit its memory wait in host memory, not on disk
        host = mc.offload.host_memory or ("auto" if device.type == "cuda" else None)
        msg = (f"{what}: keeping the routed experts on disk with expert_memory='auto'"
               + (" and a host tier (host_memory='auto')" if host == "auto" else "")
               + " (pass expert_memory=... to choose the budget, or when_too_large='error')")
        log.warning("%s", msg)
        print(f"sparsa: OFFLOADING: {msg}", flush=True)  # a change of speed users must see
        return dataclasses.replace(mc, offload=dataclasses.replace(
            mc.offload, expert_memory="auto", host_memory=host))
    hint = ("pass expert_memory=... to keep the routed experts on disk" if can_offload
            else "use a smaller model, a narrower dtype or weight form (quantization=...), "
                 "or a device with more memory")
    raise MemoryError(f"{what}: {hint} (when_too_large='ignore' loads it anyway)")


@torch.no_grad()
def load_model(mc: ModelConfig, device: torch.device, streamed: bool = True
               ) -> tuple[nn.Module, ResolvedModel, torch.dtype]:
    """Build the model `mc` names on `device` and fill its weights. A quantized weight form
    (int8, int4, bf16) is loaded tensor by tensor straight into that form (`quantized_load`);
    `streamed=False` builds the full-precision model and quantizes it after instead (the
    reference the streamed load is tested bit-identical against; it needs the memory of
    the full-precision model)."""
    resolved = resolve_model(mc)
    dtype = choose_dtype(mc.dtype, resolved.hf_config, device)
    if not mc.offload.enabled and mc.when_too_large != "ignore":
        mc = _check_fit(mc, resolved, dtype, device,
                        mc.quant_config(checkpoint_dtype(resolved.hf_config), device))
    if mc.offload.enabled:
        if resolved.model_dir is None or mc.load_format == "dummy":
            raise ValueError("expert offloading reads experts from a safetensors checkpoint; "
                             "write the dummy model to disk first (sparsa write-dummy)")
        from sparsa.loader.meta import parameters_on_meta
        from sparsa.offload.loading import load_offloaded

        with parameters_on_meta():  # experts are never materialized; the rest is, there
            model = build_model(resolved.hf_config, dtype, device)
        # The weight form applies to what stays resident (the automatic one too: a bf16
        # checkpoint's non-expert weights stay bf16, as in the all-resident model); int8,
        # int4 and bf16 also apply to the offloaded experts, through the quantized store.
        # bf16 too when asked for on a wider checkpoint (its experts are written to the store
        # in bf16); a bf16 checkpoint's experts are read as they are, bf16 already.
        ckpt_dtype = checkpoint_dtype(resolved.hf_config)
        qc = mc.quant_config(ckpt_dtype, device)
        to_store = qc.method in ("int8", "int4") or \
            (mc.quantization == "bf16" and ckpt_dtype != torch.bfloat16)
        model.offload = load_offloaded(model, resolved.model_dir, mc.offload, dtype, device,
                                       quant=qc if to_store else None)
        if qc.enabled:
            from sparsa.layers.quantization import quantize_model

            model.quant_stats = quantize_model(model, qc)
        model.offload.reserve_buffers()
        return model, resolved, dtype
    dummy = mc.load_format == "dummy" or resolved.model_dir is None
    qc = mc.quant_config(checkpoint_dtype(resolved.hf_config), device)
    if qc.enabled and streamed:
        from sparsa.loader.quantized_load import build_streamed, finish, init_dummy_streamed

        sm = build_streamed(resolved.hf_config, dtype, device, qc)
        if dummy:
            init_dummy_streamed(sm, mc.seed)
        else:
            load_weights(sm.model, SafetensorsCheckpoint(resolved.model_dir),
                         expected=sm.expected)
        sm.model.quant_stats = finish(sm)
        return sm.model, resolved, dtype
    model = build_model(resolved.hf_config, dtype, device)
    if dummy:
        init_dummy_weights(model, mc.seed)
    else:
        load_weights(model, SafetensorsCheckpoint(resolved.model_dir))
    if qc.enabled:
        from sparsa.layers.quantization import quantize_model

        model.quant_stats = quantize_model(model, qc)
    return model, resolved, dtype
