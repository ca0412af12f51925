"""Early exit, CALM-style (Schuster et al., "Confident Adaptive Language Modeling", 2022):
a decode step may stop after a chosen layer when the LM head, applied to that layer's
(final-normed) hidden state, is confident enough on every row of the batch. Lossy by
design: `sparsa bench early-exit` measures the speed and the quality cost.

The layers a step skips still need K/V for the token, or later tokens would attend to
holes: as CALM does, each skipped layer's K/V are projected from the exit state (its
input norm, the K/V part of its qkv projection, its k norm, rotary at the token's position)
and written to its paged cache. Prefill steps (and steps mixing prefill rows) always run
every layer.

`attach(model, config)` installs an `EarlyExit` as `model.model.early_exit`; the decoder's
layer loop, module by module or in the native decode plan, calls it after every layer of
an all-decode step (`__call__`): None means run on, a tensor is the step's final hidden
state. The exit test's logits are kept for the runner's `compute_logits` on that state, so
an exiting step runs the LM head once."""

from __future__ import annotations

import torch
from torch import nn

from sparsa.config.early_exit import EarlyExitConfig
from sparsa.layers.attention import AttentionMetadata


def confidence(logits: torch.Tensor, measure: str) -> torch.Tensor:
    """Per row [T]: the top probability ("softmax") or top-1 minus top-2 ("margin")."""
    p = torch.softmax(logits.float(), dim=-1)
    if measure == "margin":
        top = p.topk(2, dim=-1).values
        return top[:, 0] - top[:, 1]
    return p.amax(dim=-1)


def fill_kv(attn: nn.Module, h: torch.Tensor, positions: torch.Tensor,
            meta: AttentionMetadata) -> None:
    """Writes the K/V of `h` (the layer's normed input, [T, H]) into `attn`'s paged cache at
    meta.slot_mapping, as `Attention.forward` computes them, without attending."""
    # (q is computed and dropped: the fused weight has no K/V-only GEMV)
    _, k, v = attn.qkv_heads(attn.qkv_proj(h), positions)
    attn.kv_cache.write(k, v, meta.slot_mapping)


class EarlyExit:
    """The exit test and the KV fill of one model (see the module doc)."""

    def __init__(self, model: nn.Module, config: EarlyExitConfig):
        from sparsa.models.blocks import Attention
        from sparsa.models.decoder import DecoderLayer

        decoder = getattr(model, "model", None)
        layers = list(getattr(decoder, "layers", None) or [])
        if not layers or not hasattr(model, "compute_logits"):
            raise ValueError("early_exit_config needs a decoder model (model.model.layers)")
        for i, layer in enumerate(layers):
            attn = getattr(layer, "self_attn", None)
            if type(layer) is not DecoderLayer or not isinstance(attn, Attention):
                kind = type(attn).__name__
                what = " (DeepSeek-V2's multi-head latent attention)" \
                    if kind == "MLAttention" else ""
                raise ValueError(
                    f"early_exit_config: layer {i}'s attention is {kind}{what}; filling the "
                    "skipped layers' KV from the exit state is implemented for standard "
                    "(multi-head / grouped-query) attention only")
        self.config = config
        self.exit_layers = frozenset(config.layers_for(len(layers)))
        self.last_exit = max(self.exit_layers)
        self.num_layers = len(layers)
        self.threshold = config.threshold
        self.measure = config.confidence
        self._final_norm = decoder.norm
        self._compute_logits = model.compute_logits
        # (input norm, attention) per layer: what a skipped layer's KV fill needs
        self._fills = [(layer.input_layernorm, layer.self_attn) for layer in layers]
        self._kept: tuple[torch.Tensor, torch.Tensor] | None = None  # (exit state, logits)
        self.steps = self.exited = self.tokens = self.layer_tokens = 0

    def __call__(self, layer: int, x: torch.Tensor, positions: torch.Tensor,
                 meta: AttentionMetadata) -> torch.Tensor | None:
        """After `layer` of an all-decode step with residual stream x [T, H]: the final
        hidden state when the step exits here (the skipped layers' KV filled), else None."""
        if layer not in self.exit_layers:
            return None
        h = self._final_norm(x)
        logits = self._compute_logits(h)
        T = x.shape[0]
        if not bool((confidence(logits, self.measure) >= self.threshold).all()):
            if layer == self.last_exit:  # no exit left: the step runs every layer
                self._count(T, self.num_layers, exited=False)
            return None
        for norm, attn in self._fills[layer + 1:]:
            fill_kv(attn, norm(x), positions, meta)
        self._count(T, layer + 1, exited=True)
        self._kept = (h, logits)
        return h

    def logits_for(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """The exit test's logits when `hidden` is the exit state just returned (the
        runner's compute_logits on it), else None; each is handed out once."""
        kept = self._kept
        if kept is None or kept[0] is not hidden:
            return None
        self._kept = None
        return kept[1]

    def _count(self, rows: int, layers: int, exited: bool) -> None:
        self.steps += 1
        self.exited += exited
        self.tokens += rows
        self.layer_tokens += rows * layers

    def stats(self) -> dict:
        """All-decode steps tested, how many exited, and the mean layers run per token."""
        return {"steps": self.steps, "exited": self.exited,
                "mean_layers": self.layer_tokens / self.tokens if self.tokens else
                float(self.num_layers)}


def attach(model: nn.Module, config: EarlyExitConfig | None) -> EarlyExit | None:
    """Installs early exit on `model` (a `DecoderForCausalLM`), fresh counters included, or
    removes it (config None); an unsupported model or an exit layer out of its range is a
    ValueError."""
    if config is None:
        if hasattr(getattr(model, "model", None), "early_exit"):
            model.model.early_exit = None
        return None
    ee = model.model.early_exit = EarlyExit(model, config)
    return ee
