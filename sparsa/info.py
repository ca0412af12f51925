"""`sparsa info`: size a model without loading (or even allocating) its weights.

The model is built on PyTorch's ``meta`` device, so every parameter has its exact shape and
dtype but no storage: counting a 47B-parameter Mixtral takes well under a second and a few MB.

Definitions used throughout (and by ``format_info``):

* **total params**: every parameter of the model as Sparsa builds it, tied weights once. This
  equals the number of elements in the checkpoint (fused q/k/v or gate/up weights hold exactly
  the elements of their parts).
* **active params** (per decoded token): the weights a decode step has to read. That is every
  non-expert parameter (attention, norms, routers, shared experts, dense MLPs, the LM head),
  plus ``top_k / num_experts`` of each MoE layer's routed experts, but *not* the input
  embedding table: a step gathers one row of it, not the whole table. With tied embeddings the
  table is read in full as the LM head, so it counts once. (The usual "12.9B active" figure
  for Mixtral-8x7B also includes the embedding table; it is reported as
  ``active_params_incl_embedding``.)
* **decode bytes per token**: active params times the bytes per element of the compute dtype:
  the memory traffic that bounds batch-1 decode speed (the roofline is read bandwidth divided by
  this number).
* **KV bytes per token**: summed over attention layers, ``heads * (k_dim + v_dim) * itemsize``
  in the compute dtype (the paged cache is stored in the model's dtype).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sparsa.config import CacheConfig, ModelConfig, parse_size
from sparsa.loader.hf_config import config_value as _cfg

__all__ = ["count_parameters", "format_info", "model_info"]

log = logging.getLogger(__name__)


def _dtype_name(dt: torch.dtype | None) -> str | None:
    return None if dt is None else str(dt).removeprefix("torch.")


def _build_meta_model(hf_config: Any, dtype: torch.dtype) -> nn.Module:
    from sparsa.loader.meta import parameters_on_meta
    from sparsa.loader.weights import build_model

    try:
        return build_model(hf_config, dtype, torch.device("meta"))
    except NotImplementedError as e:  # "Cannot copy out of meta tensor" and friends
        log.debug("meta build failed (%s); retrying with parameters swapped to meta", e)
    with parameters_on_meta():
        return build_model(hf_config, dtype, torch.device("cpu"))


def count_parameters(model: nn.Module) -> dict[str, Any]:
    """Parameter counts of a built model (any device, meta included); see the module doc."""
    from sparsa.layers.moe import FusedExperts

    params = dict(model.named_parameters())  # tied weights appear once
    total = sum(p.numel() for p in params.values())
    weight_bytes = sum(p.numel() * p.element_size() for p in params.values())

    expert_ids: set[int] = set()
    routed = 0
    active_routed = 0.0
    moe_layers = 0
    for mod in model.modules():
        top_k = getattr(mod, "top_k", None)
        experts = getattr(mod, "experts", None)
        if not top_k or not isinstance(experts, FusedExperts):
            continue
        moe_layers += 1
        n = sum(p.numel() for p in experts.parameters())
        routed += n
        active_routed += n * top_k / experts.num_experts
        expert_ids.update(id(p) for p in experts.parameters())

    embed = getattr(getattr(model, "model", None), "embed_tokens", None)
    embed_w = getattr(embed, "weight", None)
    lm_head_w = getattr(getattr(model, "lm_head", None), "weight", None)
    tied = embed_w is not None and embed_w is lm_head_w
    embed_params = embed_w.numel() if embed_w is not None else 0
    dense = total - routed
    # The embedding table is gathered one row per token, not read: leave it out, unless it
    # is also the LM head.
    active = dense - (0 if tied else embed_params) + active_routed
    return {
        "total_params": total,
        "routed_expert_params": routed,
        "non_expert_params": dense,
        "embedding_params": embed_params,
        "lm_head_params": lm_head_w.numel() if lm_head_w is not None else 0,
        "tied_embeddings": tied,
        "active_params": round(active),
        "active_params_incl_embedding": round(active + (0 if tied else embed_params)),
        "num_moe_layers": moe_layers,
        "weight_bytes": weight_bytes,
        "buffer_bytes": sum(b.numel() * b.element_size() for b in model.buffers()),
    }


def _config_fields(hf_config: Any) -> dict[str, Any]:
    archs = list(getattr(hf_config, "architectures", None) or [])
    heads = _cfg(hf_config, "num_attention_heads")
    hidden = _cfg(hf_config, "hidden_size")
    head_dim = _cfg(hf_config, "head_dim")
    if head_dim is None and heads and hidden:
        head_dim = hidden // heads
    num_experts = _cfg(hf_config, "num_local_experts", "num_experts", "n_routed_experts")
    d: dict[str, Any] = {
        "architecture": archs[0] if archs else None,
        "model_type": getattr(hf_config, "model_type", None),
        "num_layers": _cfg(hf_config, "num_hidden_layers"),
        "hidden_size": hidden,
        "intermediate_size": _cfg(hf_config, "intermediate_size"),
        "num_attention_heads": heads,
        "num_kv_heads": _cfg(hf_config, "num_key_value_heads") or heads,
        "head_dim": head_dim,
        "vocab_size": _cfg(hf_config, "vocab_size"),
        "max_position_embeddings": _cfg(hf_config, "max_position_embeddings"),
        "tie_word_embeddings": bool(getattr(hf_config, "tie_word_embeddings", False)),
        "is_moe": bool(num_experts),
        "num_experts": num_experts,
        "experts_per_token": _cfg(hf_config, "num_experts_per_tok") if num_experts else None,
        "expert_intermediate_size": (
            _cfg(hf_config, "moe_intermediate_size", "intermediate_size") if num_experts
            else None
        ),
        "num_shared_experts": _cfg(hf_config, "n_shared_experts"),
        "shared_expert_intermediate_size": _cfg(hf_config, "shared_expert_intermediate_size"),
    }
    if getattr(hf_config, "kv_lora_rank", None) is not None:
        # multi-head latent attention (DeepSeek): per-head K and V dims differ
        d["head_dim"] = hf_config.qk_nope_head_dim + hf_config.qk_rope_head_dim
        d["v_head_dim"] = _cfg(hf_config, "v_head_dim")
        d["kv_lora_rank"] = hf_config.kv_lora_rank
        d["q_lora_rank"] = _cfg(hf_config, "q_lora_rank")
    return d


def _resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device != "cpu" and not device.startswith("cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda[:N]'; got {device!r}")
    return torch.device(device)


def _default_kv_budget(device: torch.device) -> int | None:
    if device.type == "cuda" and not torch.cuda.is_available():
        return None
    from sparsa.engine.model_runner import total_memory_bytes

    try:
        return int(total_memory_bytes(device) * CacheConfig().memory_fraction)
    except Exception:  # no driver, etc.: the plan just lacks the default budget
        return None


def _checkpoint_files_bytes(model_dir: Path | None) -> int | None:
    """The checkpoint files' size, after checking every header against its file (a truncated
    or malformed file is a CheckpointError here, not a size reported as if it were fine)."""
    if model_dir is None:
        return None
    files = list(model_dir.glob("*.safetensors"))
    if files:
        from sparsa.loader.safetensors_reader import SafetensorsCheckpoint

        SafetensorsCheckpoint(model_dir)
    return sum(f.stat().st_size for f in files) if files else None


def _bytes_per_param(qc: Any) -> float:
    """Bytes per weight of a quantized form: int4 carries a 16-bit scale and min per group,
    8-bit groups (GGUF's Q8_0 form) the same per 32."""
    if qc.method == "int8":
        return 1.0 + (4 / qc.int8_group_size if qc.int8_group_size else 0.0)
    return {"bf16": 2.0}.get(qc.method, 0.5 + 4 / qc.group_size)


def _quantizable_params(model: nn.Module) -> tuple[int, int]:
    """(total, active per token) parameters that weight-only quantization replaces: every
    Linear except MoE routers, and routed experts (active at their top_k share)."""
    from sparsa.layers.linear import Linear
    from sparsa.layers.moe import FusedExperts
    from sparsa.layers.quantization.model import is_router

    total = active = 0
    for name, mod in model.named_modules():
        parent_name = name.rpartition(".")[0]
        parent = model.get_submodule(parent_name) if parent_name else model
        if isinstance(mod, FusedExperts):
            n = sum(p.numel() for p in mod.parameters())
            total += n
            active += n * getattr(parent, "top_k", mod.num_experts) // mod.num_experts
        elif isinstance(mod, Linear) and not is_router(name, parent):  # routers stay fp
            n = sum(p.numel() for p in mod.parameters())
            total += n
            active += n
    return total, active


def _weight_form(compute_dt: torch.dtype, qc: Any, dev: torch.device) -> str:
    """How the weights are held and multiplied on `dev` (what `sparsa info` shows)."""
    if not qc.enabled:
        why = " (no bf16 GEMM on this CPU: fp16 checkpoints are upcast once at load)" \
            if dev.type == "cpu" and compute_dt == torch.float32 else ""
        return f"{_dtype_name(compute_dt)} weights, {_dtype_name(compute_dt)} matmuls{why}"
    scheme = {"int8": "int8 per output channel", "bf16": "bf16 weights (fp32 math)"}.get(
        qc.method, f"int4 asymmetric, groups of {qc.group_size}")
    if dev.type != "cpu":
        kernel = "dequantize + matmul (reference path)"
    else:
        try:
            from sparsa import kernels

            native = kernels.available()
        except Exception:
            native = False
        if native and qc.method == "int8":
            isa = kernels.int8_dot_isa()
            prefill = ("int8 x int8 GEMM (torch._int_mm) with activations quantized per row "
                       "for prefill" if qc.int8_activations == "dynamic"
                       else "dequantize + fp32 GEMM for prefill")
            kernel = f"sparsa C++ {isa} kernels for decode, {prefill}"
        elif native and qc.method == "int4":
            from sparsa.platform import cpu_has_bf16_dot

            gemm = "bf16 GEMM (this CPU has bf16 dot products)" if cpu_has_bf16_dot() \
                else "fp32 GEMM"
            kernel = (f"sparsa C++ {kernels.int8_dot_isa()} kernels for decode, "
                      f"dequantize + {gemm} for prefill")
        elif native:
            kernel = "sparsa C++ AVX2 kernels for decode, dequantize + fp32 GEMM for prefill"
        else:
            kernel = "torch packed-weight kernels / dequantize + fp32 GEMM"
        if qc.method == "bf16":
            kernel = ("sparsa C++ AVX2 bf16 GEMV for decode, fp32 GEMM over widened tiles "
                      "for prefill" if native else "fp32 GEMM over widened tiles")
    return (f"{scheme} for linear layers and experts (routers, embedding, norms in "
            f"{_dtype_name(compute_dt)}); {kernel}")


def model_info(
    model: str,
    dtype: str = "auto",
    device: str = "cpu",
    load_format: str = "auto",
    max_model_len: int | None = None,
    kv_cache_memory: str | int | None = None,
    block_size: int = 16,
    quantization: str | None = None,
    group_size: int = 64,
) -> dict[str, Any]:
    """Describe `model` (a path, llama2.c .bin or built-in name) without allocating weights.

    Returns a JSON-serializable dict: config-derived fields, exact parameter counts (see the
    module docstring for what "active" means), weight / KV-cache sizes, and a memory plan.
    Configuration errors (missing model, malformed config, bad arguments) raise ValueError or
    FileNotFoundError; a model whose architecture cannot be built still gets its config-derived
    fields, with the reason under ``build_error``.
    """
    from sparsa.loader.model_loader import (
        checkpoint_dtype,
        choose_dtype,
        load_quant_config,
        resolve_model,
    )

    mc = ModelConfig(model, dtype=dtype, load_format=load_format, max_model_len=max_model_len,
                     quantization=quantization, quantization_group_size=group_size)
    CacheConfig(block_size=block_size, kv_cache_memory=kv_cache_memory)  # validates them
    dev = _resolve_device(device)
    resolved = resolve_model(mc)
    hf = resolved.hf_config
    ckpt_dt = checkpoint_dtype(hf)
    compute_dt = choose_dtype(dtype, hf, dev)
    dummy = not resolved.has_weights or load_format == "dummy"
    source = resolved.gguf_file or resolved.model_dir

    info: dict[str, Any] = {
        "model": model,
        # a llama2.c .bin resolves to a converted cache directory: keep the user's name
        "name": Path(model).name if Path(model).expanduser().is_file() else resolved.name,
        "model_dir": str(source) if source is not None else None,
        "weights_source": "dummy (random)" if dummy else
        "GGUF file" if resolved.gguf_file else "checkpoint",
        "device": str(dev),
        "checkpoint_dtype": _dtype_name(ckpt_dt),
        "compute_dtype": _dtype_name(compute_dt),
        "dtype_requested": dtype,
        **_config_fields(hf),
        "checkpoint_files_bytes": resolved.gguf_file.stat().st_size if resolved.gguf_file
        else _checkpoint_files_bytes(resolved.model_dir),
        "build_error": None,
    }

    try:
        meta_model = _build_meta_model(hf, compute_dt)
    except Exception as e:
        info["build_error"] = f"{type(e).__name__}: {e}"
        return info

    counts = count_parameters(meta_model)
    info.update(counts)
    itemsize = compute_dt.itemsize
    info["checkpoint_weight_bytes"] = counts["total_params"] * ckpt_dt.itemsize
    info["decode_bytes_per_token"] = counts["active_params"] * itemsize
    qc = load_quant_config(mc, resolved, dev)
    info["quantization"] = qc.method if qc.method != "int4" else f"int4-g{qc.group_size}"
    info["weight_form"] = _weight_form(compute_dt, qc, dev)
    if qc.enabled:
        q_total, q_active = _quantizable_params(meta_model)
        # int4: + the 16-bit scale and min of each group
        bpp = _bytes_per_param(qc)
        saved_total = q_total * (itemsize - bpp)
        # an LM head in its own form (int8 under an int4 body): the difference, read per token
        head = getattr(getattr(meta_model, "lm_head", None), "weight", None)
        head_cfg = qc.for_module("lm_head")
        if head is not None and head_cfg.method != qc.method:
            more = head.numel() * (_bytes_per_param(head_cfg) - bpp)
            saved_total -= more
            q_active -= more / (itemsize - bpp)
        counts["weight_bytes"] = int(counts["weight_bytes"] - saved_total)
        info["weight_bytes"] = counts["weight_bytes"]
        info["decode_bytes_per_token"] = int(info["decode_bytes_per_token"]
                                             - q_active * (itemsize - bpp))

    attn = list(meta_model.attention_layers()) if hasattr(meta_model, "attention_layers") \
        else []
    kv_per_token = sum(h * (dk + dv) * itemsize for h, dk, dv in (a.kv_shape for a in attn))
    info["kv_layers"] = len(attn)
    info["kv_bytes_per_token"] = kv_per_token

    # Same rules as LLMEngine: the window is the requested length capped by the config's.
    max_pos = info["max_position_embeddings"] or 4096
    eff_len = min(max_model_len or max_pos, max_pos)
    weights = counts["weight_bytes"] + counts["buffer_bytes"]
    kv_full = kv_per_token * eff_len
    plan: dict[str, Any] = {
        "max_model_len": eff_len,
        "model_bytes": weights,  # weights + buffers (RoPE tables)
        "kv_bytes_max_model_len": kv_full,
        "batch1_total_bytes": weights + kv_full,
        "block_size": block_size,
    }
    if kv_cache_memory is not None:
        budget: int | None = parse_size(kv_cache_memory)
        plan["kv_budget_source"] = "kv_cache_memory"
    else:
        budget = _default_kv_budget(dev)
        plan["kv_budget_source"] = (
            f"default: {CacheConfig().memory_fraction:.0%} of available memory"
        )
    plan["kv_budget_bytes"] = budget
    if budget is not None and kv_per_token > 0:
        per_block = kv_per_token * block_size
        blocks = budget // per_block
        # LLMEngine never allocates more than 256 full contexts' worth of blocks.
        blocks = min(blocks, 256 * math.ceil(eff_len / block_size))
        tokens = blocks * block_size
        plan["kv_blocks"] = blocks
        plan["kv_tokens"] = tokens
        plan["kv_sequences_at_max_len"] = tokens // eff_len
        plan["kv_allocated_bytes"] = blocks * per_block
        plan["total_bytes"] = weights + blocks * per_block
        if tokens < eff_len:
            plan["note"] = (f"the KV budget holds only {tokens} tokens: the engine will cap "
                            f"the context window at that")
    info["memory_plan"] = plan
    return info


# ---- human-readable ---------------------------------------------------------------------------


def _bytes(n: float | None) -> str:
    if n is None:
        return "?"
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


def _count(n: float | None) -> str:
    if n is None:
        return "?"
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(int(n))


def format_info(d: dict[str, Any]) -> str:
    """Render `model_info`'s dict for people."""
    rows: list[tuple[str, str]] = []
    src = d.get("model_dir") or "built-in config"
    rows.append(("model", f"{d['name']}  ({src}; weights: {d['weights_source']})"))
    rows.append(("architecture", f"{d.get('architecture')} ({d.get('model_type')})"))
    rows.append((
        "shape",
        f"{d.get('num_layers')} layers, hidden {d.get('hidden_size')}, "
        f"{d.get('num_attention_heads')} heads / {d.get('num_kv_heads')} KV heads "
        f"(head_dim {d.get('head_dim')}"
        + (f", MLA: v_head_dim {d.get('v_head_dim')}, kv_lora_rank {d['kv_lora_rank']}"
           if d.get("kv_lora_rank") is not None else "")
        + f"), vocab {d.get('vocab_size')}, "
        f"max positions {d.get('max_position_embeddings')}",
    ))
    if d.get("is_moe"):
        moe = (f"{d.get('num_experts')} experts, top-{d.get('experts_per_token')}, "
               f"expert FFN {d.get('expert_intermediate_size')}")
        if d.get("num_moe_layers") is not None:
            moe += f", {d['num_moe_layers']} MoE layers"
        if d.get("num_shared_experts"):
            moe += f", {d['num_shared_experts']} shared experts"
        elif d.get("shared_expert_intermediate_size"):
            moe += f", shared expert FFN {d['shared_expert_intermediate_size']}"
        rows.append(("MoE", moe))
    else:
        rows.append(("MoE", f"no (dense, FFN {d.get('intermediate_size') or '?'})"))
    rows.append(("dtype", f"checkpoint {d.get('checkpoint_dtype')} -> compute "
                          f"{d.get('compute_dtype')} on {d.get('device')}"))
    if d.get("weight_form"):
        rows.append(("weight form", d["weight_form"]))
    if d.get("build_error"):
        rows.append(("parameters", f"unavailable: could not build the model ({d['build_error']})"))
        return _table(rows)

    total, active = d["total_params"], d["active_params"]
    share = f" ({100 * active / total:.1f}%)" if total else ""
    rows.append(("parameters", f"{_count(total)} total ({total:,})"))
    rows.append(("active/token", f"{_count(active)}{share}; "
                                 f"{_count(d['active_params_incl_embedding'])} incl. embedding"))
    if d.get("routed_expert_params"):
        rows.append(("experts", f"{_count(d['routed_expert_params'])} in routed experts, "
                                f"{_count(d['non_expert_params'])} elsewhere"))
    tied = " (tied to LM head)" if d.get("tied_embeddings") else ""
    rows.append(("embedding", f"{_count(d['embedding_params'])}{tied}"))
    wform = d["compute_dtype"] if d.get("quantization", "none") == "none" else \
        f"{d['quantization']} (+ {d['compute_dtype']} for the rest)"
    rows.append(("weights", f"{_bytes(d['weight_bytes'])} in {wform}"
                            + (f" ({_bytes(d['checkpoint_weight_bytes'])} in checkpoint "
                               f"{d['checkpoint_dtype']})"
                               if d["checkpoint_dtype"] != d["compute_dtype"] else "")
                            + (f"; {_bytes(d['checkpoint_files_bytes'])} of "
                               f"{'GGUF' if d['weights_source'] == 'GGUF file' else 'safetensors'}"
                               " on disk" if d.get("checkpoint_files_bytes") else "")))
    rows.append(("decode read", f"{_bytes(d['decode_bytes_per_token'])} of weights per token "
                                "(roofline: bandwidth / this)"))
    rows.append(("KV cache", f"{_bytes(d['kv_bytes_per_token'])} per token "
                             f"({d['kv_layers']} attention layers)"))
    p = d["memory_plan"]
    rows.append(("memory plan", f"max_model_len {p['max_model_len']}: weights+buffers "
                                f"{_bytes(p['model_bytes'])} + KV "
                                f"{_bytes(p['kv_bytes_max_model_len'])} = "
                                f"{_bytes(p['batch1_total_bytes'])} at batch 1"))
    if "kv_tokens" in p:
        rows.append(("", f"KV budget {_bytes(p['kv_budget_bytes'])} ({p['kv_budget_source']}): "
                         f"{p['kv_tokens']:,} tokens = {p['kv_sequences_at_max_len']} full "
                         f"sequences; total {_bytes(p['total_bytes'])}"))
    if p.get("note"):
        rows.append(("", p["note"]))
    return _table(rows)


def _table(rows: list[tuple[str, str]]) -> str:
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
