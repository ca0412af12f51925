"""GGUF architectures Sparsa reads itself: where transformers' GGUF support has no mapping
(olmoe, deepseek2; llama.cpp's Mixtral, written as `llama` with experts), and the tensors of
qwen2moe / qwen3moe, whose transformers processor builds fused gate_up expert tensors out of
two GGUF tensors (streamed one at a time, each would arrive half zeros; the loader takes
experts one by one anyway) and expects the 1-D shared-expert gate of older converters. For
the files transformers does read, `fix_config` fills what its mapping leaves at defaults.

The config comes from the metadata keys llama.cpp's convert_hf_to_gguf.py writes; tensors
are renamed from llama.cpp's names onto the HF names the model's load rules take, with the
converter's changes undone: llama q/k rows un-permuted, 3-D expert tensors split per expert,
DeepSeek-V2's attn_k_b / attn_v_b joined back into kv_b_proj."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

# GGUF architectures this module reads the tensors of (llama: only with experts)
_OWN_TENSORS = {"qwen2moe", "qwen3moe", "olmoe", "deepseek2"}
SUPPORTED = ("llama", "qwen2", "qwen3", "qwen2moe", "qwen3moe", "olmoe", "deepseek2")

# llama.cpp tensor (name after "blk.N.") -> HF name after "model.layers.N."
_BLOCK = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "attn_q_a": "self_attn.q_a_proj", "attn_q_a_norm": "self_attn.q_a_layernorm",
    "attn_q_b": "self_attn.q_b_proj", "attn_kv_a_mqa": "self_attn.kv_a_proj_with_mqa",
    "attn_kv_a_norm": "self_attn.kv_a_layernorm", "attn_kv_b": "self_attn.kv_b_proj",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
    "ffn_gate_inp": "mlp.gate", "ffn_gate_inp_shexp": "mlp.shared_expert_gate",
    "ffn_gate_shexp": "mlp.shared_expert.gate_proj", "ffn_up_shexp": "mlp.shared_expert.up_proj",
    "ffn_down_shexp": "mlp.shared_expert.down_proj",
}
_GLOBAL = {"token_embd": "model.embed_tokens", "output_norm": "model.norm",
           "output": "lm_head"}
_EXPERTS = re.compile(r"^blk\.(\d+)\.ffn_(gate|up|down)_exps\.weight$")
# llama.cpp files from before 3-D expert tensors: one 2-D tensor per expert
_EXPERT_2D = re.compile(r"^blk\.(\d+)\.ffn_(gate|up|down)\.(\d+)\.weight$")
_BLOCK_NAME = re.compile(r"^blk\.(\d+)\.(\w+)\.(weight|bias)$")


def field(reader: Any, key: str, default: Any = None) -> Any:
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def llama_has_experts(reader: Any) -> bool:
    return (field(reader, "llama.expert_count") or 0) > 0


def _shape(reader: Any, name: str) -> tuple[int, ...] | None:
    for t in reader.tensors:
        if t.name == name:  # ggml lists dims innermost first
            return tuple(int(d) for d in reversed(t.shape))
    return None


def _common(reader: Any, arch: str) -> dict[str, Any]:
    """The settings every decoder shares, by llama.cpp's generic keys."""
    def key(name: str, default: Any = None) -> Any:
        return field(reader, f"{arch}.{name}", default)

    heads = key("attention.head_count")
    embd = _shape(reader, "token_embd.weight")
    vocab = key("vocab_size") or (len(reader.fields["tokenizer.ggml.tokens"].data)
                                  if "tokenizer.ggml.tokens" in reader.fields else None) \
        or (embd[0] if embd else None)
    d: dict[str, Any] = dict(
        vocab_size=vocab, hidden_size=key("embedding_length"),
        intermediate_size=key("feed_forward_length"), num_hidden_layers=key("block_count"),
        num_attention_heads=heads, num_key_value_heads=key("attention.head_count_kv", heads),
        max_position_embeddings=key("context_length", 4096),
        rms_norm_eps=key("attention.layer_norm_rms_epsilon", 1e-6),
        rope_theta=float(key("rope.freq_base", 10000.0)),
        tie_word_embeddings=_shape(reader, "output.weight") is None,
    )
    for ours, theirs in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                         ("pad_token_id", "padding_token_id")):
        if (v := field(reader, f"tokenizer.ggml.{theirs}")) is not None:
            d[ours] = v
    return d


def _first(v: Any) -> Any:
    """A per-layer array key (llama.cpp allows one for some sizes) as one value."""
    return max(v) if isinstance(v, list) else v


def _mixtral(reader: Any) -> dict[str, Any]:
    d = _common(reader, "llama")
    if (ff := field(reader, "llama.expert_feed_forward_length")) is not None:
        d["intermediate_size"] = _first(ff)
    head_dim = field(reader, "llama.attention.key_length") or \
        field(reader, "llama.rope.dimension_count")
    if head_dim and head_dim != d["hidden_size"] // d["num_attention_heads"]:
        d["head_dim"] = head_dim
    d.update(num_local_experts=field(reader, "llama.expert_count"),
             num_experts_per_tok=field(reader, "llama.expert_used_count"))
    return d


def _olmoe(reader: Any) -> dict[str, Any]:
    d = _common(reader, "olmoe")
    if (ff := field(reader, "olmoe.expert_feed_forward_length")) is not None:
        d["intermediate_size"] = _first(ff)
    d.update(num_experts=field(reader, "olmoe.expert_count"),
             num_experts_per_tok=field(reader, "olmoe.expert_used_count"),
             norm_topk_prob=bool(field(reader, "olmoe.expert_weights_norm", False)),
             clip_qkv=field(reader, "olmoe.attention.clamp_kqv"),
             attention_bias=_shape(reader, "blk.0.attn_q.bias") is not None)
    return d


def _deepseek2(reader: Any) -> dict[str, Any]:
    def key(name: str, default: Any = None) -> Any:
        return field(reader, f"deepseek2.{name}", default)

    # DeepSeek-V3 and its kin are written as deepseek2 too: sigmoid routing with a
    # correction bias, which the V2 model here does not have
    if key("expert_gating_func", 1) != 1 or any(t.name.endswith(".exp_probs_b.bias")
                                                 for t in reader.tensors):
        raise ValueError("GGUF architecture 'deepseek2' with sigmoid expert routing "
                         "(the DeepSeek-V3 family) is not supported; DeepSeek-V2's is")
    d = _common(reader, "deepseek2")
    rope_dim = key("rope.dimension_count")
    # newer converters write the absorbed-MLA lengths in key/value_length and the
    # per-head ones in *_mla; older ones only the per-head ones
    k_len = key("attention.key_length_mla") or key("attention.key_length")
    v_len = key("attention.value_length_mla") or key("attention.value_length")
    n_group = key("expert_group_count") or 1
    d.update(
        num_key_value_heads=d["num_attention_heads"],  # MLA: every head has its own K/V
        q_lora_rank=key("attention.q_lora_rank"), kv_lora_rank=key("attention.kv_lora_rank"),
        qk_rope_head_dim=rope_dim, qk_nope_head_dim=k_len - rope_dim, v_head_dim=v_len,
        head_dim=rope_dim, n_routed_experts=key("expert_count"),
        num_experts_per_tok=key("expert_used_count"),
        moe_intermediate_size=_first(key("expert_feed_forward_length")),
        n_shared_experts=key("expert_shared_count", 0),
        first_k_dense_replace=key("leading_dense_block_count", 0),
        routed_scaling_factor=float(key("expert_weights_scale", 1.0) or 1.0),
        norm_topk_prob=bool(key("expert_weights_norm", False)),
        topk_method="group_limited_greedy" if n_group > 1 else "greedy",
        n_group=n_group if n_group > 1 else None,
        topk_group=key("expert_group_used_count") if n_group > 1 else None,
    )
    if str(key("rope.scaling.type", "none")) == "yarn":
        rope = {"rope_type": "yarn", "rope_theta": d.pop("rope_theta"),
                "factor": float(key("rope.scaling.factor")),
                "original_max_position_embeddings": key("rope.scaling.original_context_length"),
                "beta_fast": float(key("rope.scaling.yarn_beta_fast", 32.0)),
                "beta_slow": float(key("rope.scaling.yarn_beta_slow", 1.0))}
        if (log_mul := key("rope.scaling.yarn_log_multiplier")) is not None:
            # the converter stores 0.1 * mscale_all_dim; llama.cpp's MLA takes mscale to
            # equal it (as every DeepSeek-V2 config has), so q/k need no extra rope factor
            rope["mscale"] = rope["mscale_all_dim"] = round(float(log_mul) / 0.1, 6)
        d["rope_parameters"] = rope
    return d


_OWN_CONFIGS = {"olmoe": ("olmoe", "OlmoeForCausalLM", _olmoe),
                "deepseek2": ("deepseek_v2", "DeepseekV2ForCausalLM", _deepseek2)}


def own_config(gguf: Path, reader: Any, arch: str) -> Any | None:
    """The transformers config of a file transformers cannot read the config of (olmoe,
    deepseek2, llama with experts = Mixtral); None for the other architectures."""
    from transformers import AutoConfig

    if arch == "llama" and llama_has_experts(reader):
        model_type, cls, build = "mixtral", "MixtralForCausalLM", _mixtral
    elif arch in _OWN_CONFIGS:
        model_type, cls, build = _OWN_CONFIGS[arch]
    else:
        return None
    try:
        built = build(reader)
    except ValueError as e:
        raise ValueError(f"{gguf}: {e}") from None
    # q_lora_rank None means full q_proj, not "unset": DeepseekV2Config's default is 1536
    d = {k: v for k, v in built.items() if v is not None or k == "q_lora_rank"}
    if "rope_parameters" not in d:
        d["rope_parameters"] = {"rope_type": "default", "rope_theta": d.pop("rope_theta")}
    return AutoConfig.for_model(model_type, architectures=[cls], **d)


def fix_config(reader: Any, arch: str, config: Any) -> None:
    """Fill what transformers' GGUF config mapping leaves at its class defaults: fine for
    the released models those defaults were taken from, wrong for any other size."""
    def key(name: str) -> Any:
        return field(reader, f"{arch}.{name}")

    if arch in ("qwen2moe", "qwen3moe"):
        if (ff := key("expert_feed_forward_length")) is not None:
            config.moe_intermediate_size = _first(ff)
        if arch == "qwen2moe" and (ff := key("expert_shared_feed_forward_length")) is not None:
            config.shared_expert_intermediate_size = _first(ff)
    if arch in ("qwen3", "qwen3moe") and (head_dim := key("attention.key_length")):
        config.head_dim = head_dim
    if key("vocab_size") is None and "tokenizer.ggml.tokens" not in reader.fields and \
            (embd := _shape(reader, "token_embd.weight")) is not None:
        config.vocab_size = embd[0]  # no vocabulary to count: the embedding's rows


def check_supported(gguf: Path, arch: str, config: Any) -> None:
    """A family transformers reads but Sparsa has no model for fails here, naming the
    GGUF architecture, rather than later with only the HF class name."""
    from sparsa.models.registry import supported_architectures

    archs = list(getattr(config, "architectures", None) or [])
    if not set(archs) & set(supported_architectures()):
        raise ValueError(f"{gguf}: GGUF architecture {arch!r} ({', '.join(archs) or '?'}) "
                         f"is not supported; supported: {', '.join(SUPPORTED)}")


def _hf_name(name: str, config: Any) -> str | None:
    if (base := name.rsplit(".", 1)[0]) in _GLOBAL:
        return f"{_GLOBAL[base]}.{name.rsplit('.', 1)[1]}"
    m = _BLOCK_NAME.match(name)
    if m is None or m[2] not in _BLOCK:
        return None
    hf = _BLOCK[m[2]]
    if config.model_type == "deepseek_v2":  # DeepSeek names its shared experts in plural
        hf = hf.replace("shared_expert.", "shared_experts.")
    return f"model.layers.{m[1]}.{hf}.{m[3]}"


def _unpermute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's rotary row order of llama-arch q/k (LlamaModel.permute)."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]) \
        .transpose(1, 2).reshape(w.shape)


def reads_tensors(reader: Any, arch: str) -> bool:
    return arch in _OWN_TENSORS or (arch == "llama" and llama_has_experts(reader))


def _kept_blocks(gguf: Path, t: Any, arch: str, config: Any, to_rows: Callable
                 ) -> Iterator[tuple[str, Any]]:
    """A tensor whose blocks load as they are: (HF name, `to_rows(raw 2-D blocks, type)`),
    a 3-D expert tensor per expert; the fixes on rows (llama's q/k order) apply to the
    blocks' rows."""
    raw, kind = t.data, t.tensor_type.name
    if m := _EXPERTS.match(t.name):
        for e in range(raw.shape[0]):
            yield f"model.layers.{m[1]}.mlp.experts.{e}.{m[2]}_proj.weight", to_rows(raw[e], kind)
        return
    if m := _EXPERT_2D.match(t.name):
        yield f"model.layers.{m[1]}.mlp.experts.{m[3]}.{m[2]}_proj.weight", to_rows(raw, kind)
        return
    name = _hf_name(t.name, config)
    if name is None:
        raise ValueError(f"{gguf}: tensor {t.name} has no place in a {config.architectures[0]}")
    if arch == "llama" and re.search(r"\.attn_[qk]\.", t.name):
        raw = _unpermute(torch.from_numpy(np.ascontiguousarray(raw)),
                         config.num_attention_heads if ".attn_q." in t.name
                         else config.num_key_value_heads).numpy()
    yield name, to_rows(raw, kind)


def own_tensors(gguf: Path, reader: Any, arch: str, config: Any, dtype: torch.dtype,
                keep: frozenset[str] = frozenset(), to_rows: Callable | None = None
                ) -> Iterator[tuple[str, Any]]:
    """(HF name, dequantized tensor in `dtype`) of a file `reads_tensors` takes, one GGUF
    tensor at a time (a 3-D expert tensor yields its experts as views of it). Tensors of
    the block types in `keep` come as `to_rows(raw blocks, type)` instead (see
    `gguf_file.gguf_tensors`), except the ones this module reshapes (DeepSeek's k_b / v_b,
    a shared expert's gate)."""
    from gguf import dequantize

    kv_b: dict[str, dict[str, torch.Tensor]] = {}  # a layer's attn_k_b / attn_v_b, until both
    for t in reader.tensors:
        if t.name == "rope_freqs.weight" or t.name.endswith(".attn_rot_embd.weight"):
            continue  # computed from the config
        if to_rows is not None and t.tensor_type.name in keep and len(t.shape) >= 2 and \
                not re.search(r"attn_[kv]_b\.|ffn_gate_inp_shexp\.", t.name):
            yield from _kept_blocks(gguf, t, arch, config, to_rows)
            continue
        try:
            a = dequantize(t.data, t.tensor_type)  # F32/F16 may be the file's read-only map
            w = torch.from_numpy(a if a.flags.writeable else np.copy(a)).to(dtype)
        except NotImplementedError:
            raise ValueError(f"{gguf}: tensor {t.name} has weight type {t.tensor_type.name}, "
                             "which cannot be read") from None
        if m := _EXPERTS.match(t.name):
            for e in range(w.shape[0]):
                yield f"model.layers.{m[1]}.mlp.experts.{e}.{m[2]}_proj.weight", w[e]
            continue
        if m := _EXPERT_2D.match(t.name):
            yield f"model.layers.{m[1]}.mlp.experts.{m[3]}.{m[2]}_proj.weight", w
            continue
        if m := re.match(r"^blk\.(\d+)\.attn_(k|v)_b\.weight$", t.name):
            # the converter splits kv_b_proj per head into k_b [H, rank, nope] (transposed
            # for MLA absorption) and v_b [H, v, rank]; kv_b_proj is [H * (nope + v), rank]
            pair = kv_b.setdefault(m[1], {})
            pair[m[2]] = w
            if len(pair) == 2:
                del kv_b[m[1]]
                k, v = pair["k"].transpose(1, 2), pair["v"]
                yield f"model.layers.{m[1]}.self_attn.kv_b_proj.weight", \
                    torch.cat([k, v], dim=1).reshape(-1, v.shape[-1])
            continue
        name = _hf_name(t.name, config)
        if name is None:
            raise ValueError(f"{gguf}: tensor {t.name} has no place in a "
                             f"{config.architectures[0]}")
        if arch == "llama" and re.search(r"\.attn_[qk]\.", t.name):
            w = _unpermute(w, config.num_attention_heads if ".attn_q." in t.name
                           else config.num_key_value_heads)
        if t.name.endswith("ffn_gate_inp_shexp.weight"):
            w = w.reshape(1, -1)  # HF's shared_expert_gate is a Linear to one output
        yield name, w
    if kv_b:
        raise ValueError(f"{gguf}: attn_k_b / attn_v_b of layers {sorted(kv_b)} lack their "
                         "other half")
