"""Write a saved HF checkpoint as a GGUF file the way llama.cpp's convert_hf_to_gguf.py does,
for the architectures Sparsa loads: its metadata keys, tensor names (from the `gguf`
package's tensor map), merged 3-D expert tensors, llama's q/k permutation, DeepSeek-V2's
kv_b_proj split into attn_k_b / attn_v_b, and its choice of which tensors stay F32.

This mirrors the converter (conversion/base.py, llama.py, qwen.py, olmo.py, deepseek.py at
llama.cpp b8xxx) so tests need neither llama.cpp nor its sources."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

ARCHS = {  # HF class -> GGUF architecture llama.cpp writes it as
    "LlamaForCausalLM": "llama", "MixtralForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3", "Qwen2MoeForCausalLM": "qwen2moe",
    "Qwen3MoeForCausalLM": "qwen3moe", "OlmoeForCausalLM": "olmoe",
    "DeepseekV2ForCausalLM": "deepseek2",
}
_EXPERT = re.compile(r"^(model\.layers\.(\d+)\.(?:block_sparse_moe|mlp)\.experts)\.(\d+)\."
                     r"(w1|w2|w3|gate_proj|up_proj|down_proj)\.weight$")


def read_checkpoint(ckpt: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    out: dict[str, np.ndarray] = {}
    for f in sorted(Path(ckpt).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's rotary layout for llama-arch q/k rows (LlamaModel.permute)."""
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def _hf_tensors(cfg: dict, arch: str, tensors: dict[str, np.ndarray], kv_b: str):
    """(HF-style name, array) after the converter's modify_tensors: experts stacked per
    layer, q/k permuted for llama, kv_b_proj split for deepseek2."""
    experts: dict[tuple[str, str], dict[int, np.ndarray]] = {}
    for name, t in tensors.items():
        if cfg.get("tie_word_embeddings") and name == "lm_head.weight":
            continue
        if m := _EXPERT.match(name):
            experts.setdefault((m[1], m[4]), {})[int(m[3])] = t
            continue
        if arch == "llama" and re.search(r"\.(q|k)_proj\.(weight|bias)$", name):
            heads = cfg["num_attention_heads"] if ".q_proj." in name else \
                cfg["num_key_value_heads"]
            t = permute(t, heads)
        if arch == "deepseek2" and name.endswith("kv_b_proj.weight") and kv_b == "split":
            heads, nope, v = cfg["num_key_value_heads"], cfg["qk_nope_head_dim"], \
                cfg["v_head_dim"]
            kvb = t.reshape(heads, nope + v, t.shape[-1])
            yield name.replace("kv_b_proj", "k_b_proj"), kvb[:, :nope].transpose(0, 2, 1)
            yield name.replace("kv_b_proj", "v_b_proj"), kvb[:, nope:]
            continue
        yield name, t
    for (prefix, which), per in sorted(experts.items()):
        yield f"{prefix}.{which}.weight", np.stack([per[e] for e in sorted(per)])


def _undo(cfg: dict, arch: str, held: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The converter's tensors back in the checkpoint's names and layouts."""
    out: dict[str, np.ndarray] = {}
    for name, t in held.items():
        if m := re.match(r"^(.*\.experts)\.(\w+)\.weight$", name):
            for e in range(t.shape[0]):
                out[f"{m[1]}.{e}.{m[2]}.weight"] = t[e]
        elif arch == "llama" and re.search(r"\.(q|k)_proj\.(weight|bias)$", name):
            heads = cfg["num_attention_heads"] if ".q_proj." in name else \
                cfg["num_key_value_heads"]
            out[name] = (t.reshape(heads, t.shape[0] // heads // 2, 2, *t.shape[1:])
                         .swapaxes(1, 2).reshape(t.shape))
        elif name.endswith("k_b_proj.weight"):
            k, v = t.transpose(0, 2, 1), held[name.replace("k_b_proj", "v_b_proj")]
            out[name.replace("k_b_proj", "kv_b_proj")] = \
                np.concatenate([k, v], axis=1).reshape(-1, k.shape[-1])
        elif not name.endswith("v_b_proj.weight"):
            out[name] = t
    return out


def _rope(cfg: dict) -> dict:
    params = dict(cfg.get("rope_parameters") or {})
    params.update({k: v for k, v in (cfg.get("rope_scaling") or {}).items()
                   if k not in params})
    if "type" in params:
        params.setdefault("rope_type", params.pop("type"))
    params.setdefault("rope_theta", cfg.get("rope_theta", 10000.0))
    return params


def _metadata(w, cfg: dict, arch: str, file_type: int) -> None:
    import gguf

    n_head = cfg["num_attention_heads"]
    n_kv = 1 if arch == "deepseek2" else cfg.get("num_key_value_heads", n_head)  # MLA as MQA
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    rope = _rope(cfg)
    if rope["rope_type"] == "yarn":
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(rope["factor"])
        w.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
        for key, add in (("beta_fast", w.add_rope_scaling_yarn_beta_fast),
                         ("beta_slow", w.add_rope_scaling_yarn_beta_slow)):
            if rope.get(key) is not None:
                add(rope[key])
    w.add_rope_freq_base(float(rope["rope_theta"]))
    w.add_layer_norm_rms_eps(1e-5 if arch == "olmoe" else cfg["rms_norm_eps"])
    n_experts = cfg.get("num_local_experts") or cfg.get("num_experts") or \
        cfg.get("n_routed_experts")
    if n_experts is not None:
        w.add_expert_count(n_experts)
    if cfg.get("num_experts_per_tok") is not None:
        w.add_expert_used_count(cfg["num_experts_per_tok"])
    if cfg.get("n_group") is not None:
        w.add_expert_group_count(cfg["n_group"])
    if cfg.get("topk_group") is not None:
        w.add_expert_group_used_count(cfg["topk_group"])
    if cfg.get("head_dim") is not None and arch != "deepseek2":
        w.add_key_length(cfg["head_dim"])
        w.add_value_length(cfg["head_dim"])
    w.add_file_type(file_type)
    if arch == "llama":
        w.add_vocab_size(cfg["vocab_size"])
        w.add_rope_dimension_count(cfg.get("head_dim") or cfg["hidden_size"] // n_head)
    if arch in ("qwen2moe", "qwen3moe"):
        if cfg.get("moe_intermediate_size") is not None:
            w.add_expert_feed_forward_length(cfg["moe_intermediate_size"])
        if cfg.get("shared_expert_intermediate_size") is not None:
            w.add_expert_shared_feed_forward_length(cfg["shared_expert_intermediate_size"])
    if arch == "deepseek2":
        rank, rope_dim = cfg["kv_lora_rank"], cfg["qk_rope_head_dim"]
        w.add_leading_dense_block_count(cfg.get("first_k_dense_replace") or 0)
        w.add_vocab_size(cfg["vocab_size"])
        if cfg.get("q_lora_rank") is not None:
            w.add_q_lora_rank(cfg["q_lora_rank"])
        w.add_kv_lora_rank(rank)
        w.add_key_length(rank + rope_dim)
        w.add_value_length(rank)
        w.add_key_length_mla(cfg["qk_nope_head_dim"] + rope_dim)
        w.add_value_length_mla(cfg["v_head_dim"])
        w.add_expert_feed_forward_length(cfg["moe_intermediate_size"])
        w.add_expert_shared_count(cfg.get("n_shared_experts") or 0)
        if cfg.get("routed_scaling_factor") is not None:
            w.add_expert_weights_scale(cfg["routed_scaling_factor"])
        if cfg.get("norm_topk_prob"):
            w.add_expert_weights_norm(True)
        w.add_rope_dimension_count(rope_dim)
        if rope.get("mscale_all_dim") is not None:
            w.add_rope_scaling_yarn_log_mul(0.1 * rope["mscale_all_dim"])
    for key, add in (("bos_token_id", w.add_bos_token_id), ("eos_token_id", w.add_eos_token_id)):
        if isinstance(cfg.get(key), int):
            add(cfg[key])


def _keeps_f32(gguf_name: str, data: np.ndarray) -> bool:
    """The converter's rule: 1-D tensors, norms, routers and anything not a .weight stay F32."""
    return (data.ndim <= 1 or gguf_name.endswith("_norm.weight")
            or re.search(r"\.ffn_gate_inp(_shexp)?\.weight$", gguf_name) is not None
            or not gguf_name.endswith(".weight"))


def _add(w, name: str, data: np.ndarray, qtype: str) -> np.ndarray:
    """Add one tensor as the converter would store it; returns the values the file holds."""
    import gguf

    data = np.ascontiguousarray(data, dtype=np.float32)
    if qtype == "F32" or _keeps_f32(name, data):
        w.add_tensor(name, data)
        return data
    kind = getattr(gguf.GGMLQuantizationType, qtype)
    try:
        q = gguf.quants.quantize(data, kind)
    except gguf.QuantError:  # rows not a whole number of blocks: the converter's fallback
        w.add_tensor(name, data.astype(np.float16))
        return data.astype(np.float16).astype(np.float32)
    w.add_tensor(name, q, raw_dtype=kind)
    return gguf.quants.dequantize(q, kind).reshape(data.shape)


def write_gguf(ckpt: Path, path: Path, qtype: str = "F32", *, kv_b: str = "split",
               experts_2d: bool = False, flat_shexp_gate: bool = False,
               stored: dict[str, np.ndarray] | None = None) -> Path:
    """`ckpt` (a saved HF checkpoint) as a llama.cpp GGUF at `path` with its matrices in
    `qtype` (F32, F16, Q8_0, ...; a matrix whose rows don't fit the blocks falls back to
    F16, as the converter does). Older converters' forms: `kv_b="fused"` writes
    DeepSeek-V2's attn_kv_b (before MLA absorption), `experts_2d` one 2-D tensor per expert
    (blk.N.ffn_gate.E) instead of 3-D ones, `flat_shexp_gate` a 1-D Qwen2-MoE shared-expert
    gate. `stored`, when given, is filled with the checkpoint's tensors as the file holds
    them (dequantized), under their checkpoint names."""
    import gguf

    cfg = json.loads((Path(ckpt) / "config.json").read_text())
    arch = ARCHS[cfg["architectures"][0]]
    file_type = {"F32": gguf.LlamaFileType.ALL_F32, "F16": gguf.LlamaFileType.MOSTLY_F16,
                 "Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}.get(qtype, gguf.LlamaFileType.GUESSED)
    arch_enum = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    names = gguf.get_tensor_name_map(arch_enum, cfg["num_hidden_layers"])
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(Path(ckpt).name)
    _metadata(w, cfg, arch, int(file_type))
    held: dict[str, np.ndarray] = {}
    for hf_name, data in _hf_tensors(cfg, arch, read_checkpoint(ckpt), kv_b):
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        assert name is not None, f"{arch}: no GGUF name for {hf_name}"
        if experts_2d and (m := re.match(r"^(blk\.\d+\.ffn_\w+)_exps\.weight$", name)):
            held[hf_name] = np.stack([_add(w, f"{m[1]}.{e}.weight", x, qtype)
                                      for e, x in enumerate(data)])
            continue
        shape = data.shape
        if flat_shexp_gate and name.endswith("ffn_gate_inp_shexp.weight"):
            data = data.reshape(-1)
        held[hf_name] = _add(w, name, data, qtype).reshape(shape)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    if stored is not None:
        stored.update(_undo(cfg, arch, held))
    return path
