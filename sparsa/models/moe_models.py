"""MoE families built from the shared decoder: Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE."""

from __future__ import annotations

from sparsa.models.decoder import (
    MLP,
    Attention,
    DecoderForCausalLM,
    DecoderLayer,
    SparseMoeBlock,
    cfg,
)


class MixtralForCausalLM(DecoderForCausalLM):
    weight_rules = [(r"\.block_sparse_moe\.", ".mlp.", None)]

    def __init__(self, config):
        def layer(c, i):
            moe = SparseMoeBlock(
                c.hidden_size, c.num_local_experts, c.num_experts_per_tok,
                c.intermediate_size, renormalize=True,
            )
            return DecoderLayer(c, Attention(c, i), moe)

        super().__init__(config, layer)


def _is_sparse_layer(config, i: int) -> bool:
    mlp_only = cfg(config, "mlp_only_layers", []) or []
    step = cfg(config, "decoder_sparse_step", 1)
    return i not in mlp_only and config.num_experts > 0 and (i + 1) % step == 0


class Qwen2MoeForCausalLM(DecoderForCausalLM):
    def __init__(self, config):
        def layer(c, i):
            attn = Attention(c, i, qkv_bias=bool(cfg(c, "qkv_bias", True)))
            if _is_sparse_layer(c, i):
                mlp = SparseMoeBlock(
                    c.hidden_size, c.num_experts, c.num_experts_per_tok,
                    c.moe_intermediate_size, renormalize=bool(cfg(c, "norm_topk_prob", False)),
                    shared_intermediate_size=c.shared_expert_intermediate_size,
                    shared_gate=True,
                )
            else:
                mlp = MLP(c.hidden_size, c.intermediate_size)
            return DecoderLayer(c, attn, mlp)

        super().__init__(config, layer)


class Qwen3MoeForCausalLM(DecoderForCausalLM):
    def __init__(self, config):
        def layer(c, i):
            bias = bool(cfg(c, "attention_bias", False))
            attn = Attention(c, i, qkv_bias=bias, o_bias=bias, qk_norm="head")
            if _is_sparse_layer(c, i):
                mlp = SparseMoeBlock(
                    c.hidden_size, c.num_experts, c.num_experts_per_tok,
                    c.moe_intermediate_size, renormalize=bool(cfg(c, "norm_topk_prob", True)),
                )
            else:
                mlp = MLP(c.hidden_size, c.intermediate_size)
            return DecoderLayer(c, attn, mlp)

        super().__init__(config, layer)


class OlmoeForCausalLM(DecoderForCausalLM):
    def __init__(self, config):
        def layer(c, i):
            bias = bool(cfg(c, "attention_bias", False))
            attn = Attention(c, i, qkv_bias=bias, o_bias=bias, qk_norm="full")
            moe = SparseMoeBlock(
                c.hidden_size, c.num_experts, c.num_experts_per_tok, c.intermediate_size,
                renormalize=bool(cfg(c, "norm_topk_prob", False)),
            )
            return DecoderLayer(c, attn, moe)

        super().__init__(config, layer)
