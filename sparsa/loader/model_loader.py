"""Resolve a model reference to an HF config, build our model and fill its weights."""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from sparsa.config import ModelConfig, parse_dtype
from sparsa.layers.quantization.schemes import QuantConfig
from sparsa.loader.hub import looks_like_hub_id, resolve_hub_id
from sparsa.loader.safetensors_reader import SafetensorsCheckpoint
from sparsa.loader.weights import (
    build_model,
    init_dummy_weights,
    load_weights,
)
from sparsa.models.builtin_configs import BUILTIN_CONFIGS, builtin_config

log = logging.getLogger(__name__)

@dataclass
class ResolvedModel:
    hf_config: object
    model_dir: Path | None  # None for built-in configs (dummy weights only) and GGUF files
    name: str
    gguf_file: Path | None = None  # the weights and tokenizer are in this GGUF file

    @property
    def tokenizer_source(self) -> Path | None:
        return self.gguf_file or self.model_dir

    @property
    def has_weights(self) -> bool:
        return self.model_dir is not None or self.gguf_file is not None


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
        bins = sorted(model_dir.glob("*.bin"))
        hint = f"; it holds {bins[0].name}: for a llama2.c checkpoint pass that file " \
            f"({model_dir / bins[0].name})" if bins else ""
        raise FileNotFoundError(f"{model_dir} has no config.json{hint}")
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
    from sparsa.loader.gguf_file import find_gguf, gguf_config

    gguf = find_gguf(p)
    if gguf is not None:
        config = gguf_config(gguf)
        for k, v in mc.hf_overrides.items():
            setattr(config, k, v)
        return ResolvedModel(config, None, gguf.stem, gguf_file=gguf)
    if p.is_file():
        from sparsa.loader.llama2c import is_llama2c_checkpoint, resolve_llama2c

        if not is_llama2c_checkpoint(p):
            raise ValueError(f"{p} is a file but not a llama2.c checkpoint; pass a model directory")
        p = Path(resolve_llama2c(p))
    if p.is_dir():
        config = load_hf_config(p)
        name = p.name
        model_dir = p
    elif mc.model not in BUILTIN_CONFIGS and looks_like_hub_id(mc.model):
        model_dir = resolve_hub_id(mc.model, mc.revision)
        config = load_hf_config(model_dir)
        name = mc.model.rsplit("/", 1)[-1]
    elif mc.model in BUILTIN_CONFIGS:
        config = _config_from_dict(builtin_config(mc.model))
        name = mc.model
        model_dir = None
        if mc.load_format == "safetensors":
            raise ValueError(f"{mc.model!r} is a built-in config: it has no weights to load; "
                             "use load_format='dummy'")
    else:
        raise FileNotFoundError(
            f"model {mc.model!r} not found: not a local directory, a llama2.c .bin file, a "
            f"Hugging Face model id, or a built-in config ({', '.join(BUILTIN_CONFIGS)})"
        )
    for k, v in mc.hf_overrides.items():
        setattr(config, k, v)
    return ResolvedModel(config, model_dir, name)


def checkpoint_dtype(hf_config) -> torch.dtype:
    # transformers 5's `torch_dtype` is a property that warns it is deprecated: read the
    # attribute only where an older transformers stored it
    dt = getattr(hf_config, "dtype", None) or \
        getattr(hf_config, "__dict__", {}).get("torch_dtype")
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
    from sparsa.loader.hf_config import config_value as _cfg
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
    _log_plan(mc, resolved, dtype, device)
    if not mc.offload.enabled and mc.when_too_large != "ignore":
        mc = _check_fit(mc, resolved, dtype, device, load_quant_config(mc, resolved, device))
    if mc.offload.enabled:
        if resolved.gguf_file is not None:
            raise ValueError("expert offloading reads experts from a safetensors checkpoint, "
                             "not a GGUF file")
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
        qc = load_quant_config(mc, resolved, device)
        to_store = qc.method in ("int8", "int4") or \
            (mc.quantization == "bf16" and ckpt_dtype != torch.bfloat16)
        model.offload = load_offloaded(model, resolved.model_dir, mc.offload, dtype, device,
                                       quant=qc if to_store else None)
        if qc.enabled:
            from sparsa.layers.quantization import quantize_model

            model.quant_stats = quantize_model(model, qc)
            _log_quantized(model.quant_stats)
        model.offload.reserve_buffers()
        return model, resolved, dtype
    dummy = mc.load_format == "dummy" or not resolved.has_weights
    if dummy:
        log.warning("%s runs with RANDOM weights (%s): its output is noise; pass a checkpoint "
                    "folder, a GGUF file or a hub id for a trained model", resolved.name,
                    "load_format='dummy'" if mc.load_format == "dummy"
                    else "a built-in config has no weights")
    qc = load_quant_config(mc, resolved, device)
    if qc.enabled and streamed:
        from sparsa.loader.quantized_load import build_streamed, finish, init_dummy_streamed

        sm = build_streamed(resolved.hf_config, dtype, device, qc)
        if dummy:
            init_dummy_streamed(sm, mc.seed)
        else:
            load_weights(sm.model, _checkpoint(resolved, dtype, qc), expected=sm.expected)
        sm.model.quant_stats = finish(sm)
        _log_quantized(sm.model.quant_stats)
        return sm.model, resolved, dtype
    model = build_model(resolved.hf_config, dtype, device)
    if dummy:
        init_dummy_weights(model, mc.seed)
    else:
        load_weights(model, _checkpoint(resolved, dtype))
    if qc.enabled:
        from sparsa.layers.quantization import quantize_model

        model.quant_stats = quantize_model(model, qc)
        _log_quantized(model.quant_stats)
    return model, resolved, dtype


def _log_plan(mc: ModelConfig, resolved: ResolvedModel, dtype: torch.dtype,
              device: torch.device) -> None:
    """The -v lines of what loading decided: source, device and threads, compute dtype,
    weight form (a GGUF file's tensor types with it)."""
    if not log.isEnabledFor(logging.INFO):
        return  # the weight form of a GGUF file reads its header: only when it is shown
    source = (f"GGUF file {resolved.gguf_file}" if resolved.gguf_file is not None
              else "random weights" if mc.load_format == "dummy" or not resolved.has_weights
              else f"safetensors in {resolved.model_dir}")
    n = torch.get_num_threads()
    threads = f" with {n} thread{'s' * (n != 1)}" if device.type == "cpu" else ""
    log.info("loading %s (%s) on %s%s", resolved.name, source, device, threads)
    ckpt = checkpoint_dtype(resolved.hf_config)
    why = ("asked for" if parse_dtype(mc.dtype) is not None
           else "the checkpoint's" if dtype == ckpt
           else f"the checkpoint's {ckpt} has no fast GEMM on this CPU")
    log.info("compute dtype %s (%s)", str(dtype).removeprefix("torch."), why)
    qc = load_quant_config(mc, resolved, device)
    log.info("weight form: %s", describe_form(qc))
    if resolved.gguf_file is not None:
        from sparsa.loader.gguf_file import blocks_kept, gguf_weight_types

        types = gguf_weight_types(resolved.gguf_file)
        kept = sorted(blocks_kept(qc) & set(types))
        log.info("GGUF matmul weights: %s; %s", ", ".join(
            f"{t} {k / 1e6:.1f}M" for t, k in sorted(types.items(), key=lambda kv: -kv[1])),
            f"{', '.join(kept)} blocks kept as they are" if kept else "all decoded")


def describe_form(qc: QuantConfig) -> str:
    """A weight form in words: `int4 (groups of 32, float16 scales), LM head int8, ...`."""
    if not qc.enabled:
        return "full precision (no quantization)"
    detail = {"int4": f"groups of {qc.group_size}, {str(qc.scale_dtype)[6:]} scales",
              "int8": (f"groups of {qc.int8_group_size}" if qc.int8_group_size
                       else "a scale per row") + f", activations {qc.int8_activations}",
              "bf16": "bf16 prefill GEMM" if qc.bf16_prefill else "fp32 math"}[qc.method]
    head = "full precision" if qc.skip_lm_head or qc.lm_head == "none" else \
        ("int8" if qc.lm_head == "int8" else qc.method)
    router = "full precision" if qc.skip_router else qc.method
    return f"{qc.method} ({detail}), LM head {head}, routers {router}"


def _log_quantized(stats: dict) -> None:
    mib = 2 ** 20
    skipped = stats.get("skipped") or []
    routers = sum(name != "lm_head" for name in skipped)
    kept = ([f"{routers} routers"] if routers else []) + \
        (["the LM head"] if "lm_head" in skipped else [])
    log.info("quantized %d linear layers and %d expert blocks to %s: %.1f MiB -> %.1f MiB, "
             "model %.1f MiB%s", stats.get("num_linear", 0), stats.get("num_experts", 0),
             stats.get("method"), stats.get("bytes_before", 0) / mib,
             stats.get("bytes_after", 0) / mib, stats.get("model_bytes_after", 0) / mib,
             f" ({' and '.join(kept)} left in full precision)" if kept else "")


def load_quant_config(mc: ModelConfig, resolved: ResolvedModel,
                      device: torch.device) -> QuantConfig:
    """The weight form `mc` loads `resolved` in: the setting's, or for a GGUF file with
    none asked for, the file's own (`gguf_quant_config`)."""
    qc = mc.quant_config(checkpoint_dtype(resolved.hf_config), device)
    if resolved.gguf_file is not None:
        from sparsa.loader.gguf_file import gguf_quant_config

        qc = gguf_quant_config(resolved.gguf_file, qc, mc.quantization)
    return qc


def _checkpoint(resolved: ResolvedModel, dtype: torch.dtype, qc: QuantConfig | None = None):
    """The checkpoint's tensors: a safetensors folder, or a GGUF file (dequantized, or its
    blocks as they are where the form `qc` takes them: `blocks_kept`), with a progress bar
    on a terminal."""
    from tqdm import tqdm

    if resolved.gguf_file is not None:
        from sparsa.loader.gguf_file import blocks_kept, gguf_tensors

        keep = blocks_kept(qc) if qc is not None else frozenset()
        tensors = gguf_tensors(resolved.gguf_file, resolved.hf_config, dtype, keep)
        return tqdm(tensors, desc="Loading GGUF tensors", unit=" tensors", disable=None,
                    leave=False)
    ckpt = SafetensorsCheckpoint(resolved.model_dir)
    return tqdm(ckpt, total=len(ckpt.names()), desc="Loading weights", unit=" tensors",
                disable=None, leave=False)
