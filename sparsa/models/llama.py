"""Dense families: Llama (and Mistral configs), Qwen2, Qwen3."""

from __future__ import annotations

from sparsa.models.decoder import (
    MLP,
    Attention,
    DecoderForCausalLM,
    DecoderLayer,
    cfg,
)


def _dense_layer(config, i: int, qkv_bias: bool, o_bias: bool, qk_norm: str | None):
    attn = Attention(config, i, qkv_bias=qkv_bias, o_bias=o_bias, qk_norm=qk_norm)
    mlp = MLP(config.hidden_size, config.intermediate_size, bias=cfg(config, "mlp_bias", False))
    return DecoderLayer(config, attn, mlp)


class LlamaForCausalLM(DecoderForCausalLM):
    def __init__(self, config):
        bias = bool(cfg(config, "attention_bias", False))
        super().__init__(config, lambda c, i: _dense_layer(c, i, bias, bias, None))


class Qwen2ForCausalLM(DecoderForCausalLM):
    def __init__(self, config):
        super().__init__(config, lambda c, i: _dense_layer(c, i, True, False, None))


class Qwen3ForCausalLM(DecoderForCausalLM):
    def __init__(self, config):
        bias = bool(cfg(config, "attention_bias", False))
        super().__init__(config, lambda c, i: _dense_layer(c, i, bias, bias, "head"))
