"""`sparsa.info.model_info`: exact parameter counts from shapes, without allocating weights."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import psutil
import pytest

from sparsa import kernels
from sparsa.info import format_info, model_info
from sparsa.models.builtin_configs import builtin_config
from sparsa.tokenizer import shared_dir

TINYMOE = shared_dir() / "models" / "tinymoe-stories"
STORIES = shared_dir() / "models" / "stories260K" / "stories260K.bin"


def mixtral_counts(c: dict) -> tuple[int, int]:
    """(total, active) of a Mixtral config, from its shapes alone. Active = what one decode
    step reads: everything but the embedding table and the unchosen experts."""
    H, V, L = c["hidden_size"], c["vocab_size"], c["num_hidden_layers"]
    E, k, inter = c["num_local_experts"], c["num_experts_per_tok"], c["intermediate_size"]
    heads, kv_heads = c["num_attention_heads"], c["num_key_value_heads"]
    hd = c.get("head_dim") or H // heads
    attn = H * heads * hd + 2 * H * kv_heads * hd + heads * hd * H  # q, k, v, o
    expert = 3 * H * inter  # w1 (gate), w3 (up), w2 (down)
    layer_dense = attn + H * E + 2 * H  # attention + router + two RMSNorms
    embed = lm_head = V * H
    total = embed + lm_head + H + L * (layer_dense + E * expert)
    active = lm_head + H + L * (layer_dense + k * expert)
    return total, active


def test_mixtral_mini_counts_match_the_shapes():
    c = builtin_config("mixtral-mini")
    total, active = mixtral_counts(c)
    d = model_info("mixtral-mini")
    assert d["build_error"] is None
    assert d["total_params"] == total
    assert d["active_params"] == active
    assert d["active_params_incl_embedding"] == active + c["vocab_size"] * c["hidden_size"]
    assert total == pytest.approx(640e6, rel=0.02)
    assert active == pytest.approx(192e6, rel=0.02)
    assert d["architecture"] == "MixtralForCausalLM"
    assert (d["num_experts"], d["experts_per_token"], d["num_moe_layers"]) == (8, 2, 8)
    assert d["num_layers"] == 8 and d["is_moe"]
    # fp32 on CPU: 4 bytes per parameter, and decode reads exactly the active weights
    assert d["compute_dtype"] == "float32"
    assert d["weight_bytes"] == 4 * total
    assert d["decode_bytes_per_token"] == 4 * active
    # KV: per layer 4 KV heads x (64 + 64) dims x 4 bytes
    assert d["kv_bytes_per_token"] == 8 * 4 * 128 * 4
    assert d["kv_layers"] == 8


def test_memory_plan_for_a_kv_budget():
    d = model_info("mixtral-mini", max_model_len=1024, kv_cache_memory="64MiB")
    p = d["memory_plan"]
    per_token = d["kv_bytes_per_token"]
    assert p["max_model_len"] == 1024
    assert p["kv_bytes_max_model_len"] == 1024 * per_token
    assert p["batch1_total_bytes"] == p["model_bytes"] + 1024 * per_token
    assert p["model_bytes"] >= d["weight_bytes"]
    assert p["kv_budget_bytes"] == 64 << 20
    assert p["kv_tokens"] == (64 << 20) // per_token  # a whole number of 16-token blocks here
    assert p["kv_sequences_at_max_len"] == p["kv_tokens"] // 1024
    # max_model_len is capped by the config's max_position_embeddings, as in LLMEngine
    assert model_info("mixtral-mini", max_model_len=10**6)["memory_plan"]["max_model_len"] == 4096


def test_json_serializable_and_formatted():
    d = model_info("qwen3moe-mini", kv_cache_memory="1GiB")
    json.dumps(d)
    text = format_info(d)
    for word in ("Qwen3MoeForCausalLM", "64 experts", "top-8", "active/token", "KV cache",
                 "memory plan"):
        assert word in text


def test_mixtral_8x7b_without_allocating():
    proc = psutil.Process()
    before = proc.memory_info().rss
    d = model_info("mixtral-8x7b")
    grown = proc.memory_info().rss - before
    # published: 46.7B total, 12.9B active (the usual figure includes the embedding table)
    assert d["total_params"] == pytest.approx(46.7e9, rel=0.005)
    assert d["active_params_incl_embedding"] == pytest.approx(12.9e9, rel=0.01)
    assert d["total_params"] == mixtral_counts(builtin_config("mixtral-8x7b"))[0]
    assert d["weight_bytes"] > 150 << 30  # 187 GB in fp32 ...
    assert grown < 300 << 20, f"RSS grew by {grown / 2**20:.0f} MiB"  # ... none of it allocated


def test_deepseek_v2_lite_counts_or_a_clear_build_error():
    d = model_info("deepseek-v2-lite")
    # config-derived fields are there either way
    assert d["architecture"] == "DeepseekV2ForCausalLM"
    assert (d["num_experts"], d["experts_per_token"], d["num_shared_experts"]) == (64, 6, 2)
    assert d["head_dim"] == 192 and d["v_head_dim"] == 128
    if d["build_error"] is not None:
        assert "unavailable" in format_info(d)
        return
    # published: 15.7B total, 2.4B active
    assert d["total_params"] == pytest.approx(15.7e9, rel=0.01)
    assert d["active_params"] == pytest.approx(2.4e9, rel=0.05)
    assert d["num_moe_layers"] == 26  # first_k_dense_replace = 1
    assert d["kv_bytes_per_token"] == 27 * 16 * (192 + 128) * 4


def _write_config(path: Path, config: dict) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    return path


def test_unbuildable_architecture_keeps_config_fields(tmp_path):
    cfg = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "n_embd": 64,
           "n_layer": 2, "n_head": 2, "vocab_size": 100}
    d = model_info(str(_write_config(tmp_path / "gpt2", cfg)))
    assert "unsupported architecture" in d["build_error"]
    assert d["architecture"] == "GPT2LMHeadModel" and d["vocab_size"] == 100
    assert "total_params" not in d
    text = format_info(d)
    assert "could not build" in text and "GPT2LMHeadModel" in text


def _small_llama(**extra) -> dict:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
            "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "vocab_size": 256, "max_position_embeddings": 128,
            **extra}


def test_bf16_checkpoint_computes_in_fp32_on_cpu(tmp_path):
    path = _write_config(tmp_path / "bf16", _small_llama(dtype="bfloat16"))
    d = model_info(str(path), quantization="none")  # upcast once at load
    assert (d["checkpoint_dtype"], d["compute_dtype"]) == ("bfloat16", "float32")
    n = d["total_params"]
    assert d["weight_bytes"] == 4 * n and d["checkpoint_weight_bytes"] == 2 * n
    auto = model_info(str(path))  # default: linear weights stay bf16, math in fp32
    if kernels.available():
        assert auto["quantization"] == "bf16" and "bf16 weights" in auto["weight_form"]
        assert 2 * n < auto["weight_bytes"] < 3 * n  # embeddings and norms stay fp32
        assert auto["decode_bytes_per_token"] < d["decode_bytes_per_token"] * 0.6
    else:
        assert auto["weight_bytes"] == 4 * n
    # an explicit dtype is honoured (only shapes are built: no bf16 matmul runs)
    d16 = model_info(str(path), dtype="bfloat16")
    assert d16["compute_dtype"] == "bfloat16" and d16["weight_bytes"] == 2 * n
    assert d16["kv_bytes_per_token"] * 2 == d["kv_bytes_per_token"]


def test_dense_tied_embeddings_are_read_as_the_lm_head(tmp_path):
    path = _write_config(tmp_path / "tied", _small_llama(tie_word_embeddings=True))
    d = model_info(str(path))
    assert d["tied_embeddings"] and not d["is_moe"] and d["num_moe_layers"] == 0
    # dense + tied: every parameter is read per token, the table once (as the LM head)
    assert d["active_params"] == d["total_params"] == d["active_params_incl_embedding"]
    H, V, inter = 64, 256, 128
    layer = H * H + 2 * H * 32 + H * H + 3 * H * inter + 2 * H
    assert d["total_params"] == V * H + 2 * layer + H


def test_bad_input_raises():
    with pytest.raises(FileNotFoundError, match="not found"):
        model_info("/no/such/model")
    with pytest.raises(ValueError, match="dtype"):
        model_info("mixtral-mini", dtype="int3")
    with pytest.raises(ValueError, match="size"):
        model_info("mixtral-mini", kv_cache_memory="lots")
    with pytest.raises(ValueError, match="built-in"):
        model_info("mixtral-mini", load_format="safetensors")


def _safetensors_numel(path: Path) -> tuple[int, int]:
    """(elements, bytes) of all tensors, read from the header alone."""
    with path.open("rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    numel = sum(math.prod(t["shape"]) for t in header.values())
    nbytes = sum(t["data_offsets"][1] - t["data_offsets"][0] for t in header.values())
    return numel, nbytes


def test_tinymoe_counts_equal_the_checkpoint():
    if not (TINYMOE / "config.json").exists():
        pytest.skip(f"{TINYMOE} not found (set SPARSA_SHARED to the shared/ directory)")
    numel, nbytes = _safetensors_numel(TINYMOE / "model.safetensors")
    d = model_info(str(TINYMOE))
    assert d["total_params"] == numel
    assert d["weight_bytes"] == nbytes  # fp32 checkpoint, fp32 compute
    config = json.loads((TINYMOE / "config.json").read_text())
    assert (d["total_params"], d["active_params"]) == mixtral_counts(config)
    assert d["active_params"] == pytest.approx(1.1e6, rel=0.1)  # README: 3.5M params, 1.1M active


def test_llama2c_file_is_accepted():
    if not STORIES.exists():
        pytest.skip(f"{STORIES} not found (set SPARSA_SHARED to the shared/ directory)")
    d = model_info(str(STORIES))
    assert d["name"] == "stories260K.bin"
    assert d["total_params"] == pytest.approx(260e3, rel=0.01)
    assert d["tied_embeddings"]


def test_quantized_sizes_and_weight_form():
    full = model_info("mixtral-mini")
    q8 = model_info("mixtral-mini", quantization="int8")
    q4 = model_info("mixtral-mini", quantization="int4", group_size=32)
    assert full["quantization"] == "none" and "float32 matmuls" in full["weight_form"]
    assert q8["quantization"] == "int8" and "int8 per output channel" in q8["weight_form"]
    assert q4["quantization"] == "int4-g32"
    # int8: ~1 byte per quantized parameter instead of 4; int4 g32: 0.5 + 4/32 bytes
    assert full["decode_bytes_per_token"] / q8["decode_bytes_per_token"] == \
        pytest.approx(4, rel=0.05)
    assert q4["decode_bytes_per_token"] < 0.7 * q8["decode_bytes_per_token"]
    assert "int8" in format_info(q8)
    with pytest.raises(ValueError):
        model_info("mixtral-mini", quantization="int4", group_size=48)
