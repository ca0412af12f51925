"""Tiny random HF checkpoints built with transformers, and the parity checks against it."""

from __future__ import annotations

from pathlib import Path

import torch

TINY_COMMON = dict(
    hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, vocab_size=256, max_position_embeddings=512,
    bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False,
    rms_norm_eps=1e-6,
)

TINY_CONFIGS: dict[str, dict] = {
    "llama": dict(architectures=["LlamaForCausalLM"], model_type="llama", **TINY_COMMON),
    "llama-tied-rope-llama3": dict(
        architectures=["LlamaForCausalLM"], model_type="llama",
        **{**TINY_COMMON, "tie_word_embeddings": True, "num_key_value_heads": 1},
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
    ),
    "mistral-sliding": dict(
        architectures=["MistralForCausalLM"], model_type="mistral", sliding_window=8,
        **TINY_COMMON,
    ),
    "qwen2": dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", **TINY_COMMON),
    "qwen2-sliding": dict(
        architectures=["Qwen2ForCausalLM"], model_type="qwen2", use_sliding_window=True,
        sliding_window=8, max_window_layers=1, **TINY_COMMON,
    ),
    "qwen3": dict(architectures=["Qwen3ForCausalLM"], model_type="qwen3", head_dim=32,
                  **TINY_COMMON),
    "mixtral": dict(
        architectures=["MixtralForCausalLM"], model_type="mixtral", num_local_experts=4,
        num_experts_per_tok=2, **TINY_COMMON,
    ),
    "qwen2_moe": dict(
        architectures=["Qwen2MoeForCausalLM"], model_type="qwen2_moe", num_experts=4,
        num_experts_per_tok=2, moe_intermediate_size=48, shared_expert_intermediate_size=80,
        norm_topk_prob=False, decoder_sparse_step=1, mlp_only_layers=[1], **TINY_COMMON,
    ),
    "qwen3_moe": dict(
        architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe", num_experts=8,
        num_experts_per_tok=3, moe_intermediate_size=48, norm_topk_prob=True, head_dim=16,
        decoder_sparse_step=1, mlp_only_layers=[], **TINY_COMMON,
    ),
    "olmoe": dict(
        architectures=["OlmoeForCausalLM"], model_type="olmoe", num_experts=8,
        num_experts_per_tok=2, norm_topk_prob=False, clip_qkv=8.0, **TINY_COMMON,
    ),
    # MLA with low-rank q, a dense first layer, a shared expert, group-limited routing with
    # scaled weights and V2-Lite-style yarn (mscale == mscale_all_dim); every matrix row a
    # whole number of 32-blocks, so a Q8_0 GGUF of it quantizes them all
    "deepseek_v2": dict(
        architectures=["DeepseekV2ForCausalLM"], model_type="deepseek_v2",
        **{**TINY_COMMON, "num_key_value_heads": 4},  # MLA: every head its own K/V
        q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=32, qk_rope_head_dim=8,
        v_head_dim=16, n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
        n_shared_experts=1, first_k_dense_replace=1, topk_method="group_limited_greedy",
        n_group=2, topk_group=1, routed_scaling_factor=2.5,
        rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128,
                      "beta_fast": 32, "beta_slow": 1, "mscale": 0.707,
                      "mscale_all_dim": 0.707},
    ),
}


def build_tiny_checkpoint(name: str, out_dir: Path, seed: int = 0, config: dict | None = None,
                          std: float = 0.08):
    """Random-weight HF model saved with save_pretrained; returns (hf_model, path).

    A larger init std than transformers' default gives peaked next-token distributions,
    so greedy parity is not decided by float noise between near-tied logits.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    d = dict(config or TINY_CONFIGS[name])
    model_type = d.pop("model_type")
    hf_config = AutoConfig.for_model(model_type, **d)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "norm" in pname:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, std)
    model.eval()
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    return model, out_dir
