"""Shared decoder-only transformer pieces that the model families compose.

A family (Llama, Qwen2, Mixtral, ...) is a `DecoderSpec`-driven `DecoderForCausalLM`: which
attention options it uses (q/k norms, biases, sliding windows) and which feed-forward block
each layer gets. Weight names follow the HF checkpoints so loading needs only a few rules.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from sparsa import kernels
from sparsa.layers.attention import AttentionMetadata
from sparsa.layers.linear import Linear
from sparsa.layers.norm import RMSNorm
from sparsa.models.blocks import (  # the blocks, re-exported for the model families
    MLP,
    ROUTE_NATIVE_MAX_ROWS,
    Attention,
    SparseMoeBlock,
    cfg,
    check_activation,
    head_dim_of,
    sliding_window_for_layer,
)


class DecoderLayer(nn.Module):
    def __init__(self, config, self_attn: nn.Module, mlp: nn.Module):
        super().__init__()
        eps = cfg(config, "rms_norm_eps", 1e-6)
        self.input_layernorm = RMSNorm(config.hidden_size, eps)
        self.self_attn = self_attn
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps)
        self.mlp = mlp

    def forward(self, x: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata):
        x = x + self.self_attn(self.input_layernorm(x), positions, meta)
        return x + self.mlp(self.post_attention_layernorm(x))


LayerFactory = Callable[[object, int], DecoderLayer]


class DecoderModel(nn.Module):
    def __init__(self, config, make_layer: LayerFactory):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.embed_tokens.weight.requires_grad_(False)
        self.layers = nn.ModuleList(make_layer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, cfg(config, "rms_norm_eps", 1e-6))
        # NativeDecodePlan for decode steps (built on the first one: quantization and the KV
        # pools are in place by then); False when the model is not one it covers, or off.
        self.native_decode = True
        self._plan = None
        # sparsa.spec.early_exit.EarlyExit when early exit is on: called after each layer of
        # an all-decode step, it returns the final hidden state where the step stops early
        self.early_exit = None

    def forward(self, input_ids, positions, meta):
        x = self.embed_tokens(input_ids)
        if self.native_decode and meta.num_decodes and not meta.prefills:
            plan = self._native_plan()
            ext = kernels.load() if plan else None
            if ext is not None and plan.covers(x, meta):
                return plan.run(ext, x, positions, meta, self.early_exit)
        exit_test = self.early_exit
        if exit_test is not None and (meta.prefills or meta.num_decodes != x.shape[0]):
            exit_test = None  # prompt rows run every layer
        for i, layer in enumerate(self.layers):
            x = layer(x, positions, meta)
            if exit_test is not None and (out := exit_test(i, x, positions, meta)) is not None:
                return out
        return self.norm(x)

    def _native_plan(self):
        if self._plan is None:
            from sparsa.models.native_decode import NativeDecodePlan

            self._plan = NativeDecodePlan.build(self) or False
        return self._plan


class DecoderForCausalLM(nn.Module):
    """Base of every model: `forward` returns final hidden states for all tokens;
    `compute_logits` runs the LM head only on the rows that need a next token."""

    # (regex on the checkpoint name, replacement, shard) applied in order; see loader.
    weight_rules: list[tuple[str, str, int | str | None]] = []

    def __init__(self, config, make_layer: LayerFactory):
        super().__init__()
        check_activation(config)
        self.config = config
        self.model = DecoderModel(config, make_layer)
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        self.lm_head = Linear(config.hidden_size, config.vocab_size,
                              transposed=not self.tie_word_embeddings)
        if self.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids, positions, meta: AttentionMetadata) -> torch.Tensor:
        return self.model(input_ids, positions, meta)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        ee = self.model.early_exit
        if ee is not None and (kept := ee.logits_for(hidden)) is not None:
            return kept  # an early exit's state: its exit test computed these already
        return self.lm_head(hidden).float()

    def attention_layers(self) -> list[nn.Module]:
        return [layer.self_attn for layer in self.model.layers]


__all__ = ["MLP", "ROUTE_NATIVE_MAX_ROWS", "Attention", "DecoderForCausalLM", "DecoderLayer",
           "DecoderModel", "SparseMoeBlock", "cfg", "check_activation", "head_dim_of",
           "sliding_window_for_layer"]
