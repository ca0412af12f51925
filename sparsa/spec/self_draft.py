"""MoE self-speculation: the target model as its own draft, made cheaper without a second
set of weights or any training. The copy shares every weight tensor with the target and
differs in what it runs: fewer experts per token (top-1 instead of top-k), and/or only its
first layers before the final norm and LM head. It keeps its own KV cache (its hidden
states differ from the target's, so their K/V do too)."""

from __future__ import annotations

import copy

from torch import nn


def _moe_blocks(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if hasattr(m, "top_k") and hasattr(m, "experts")]


def cheaper_copy(model: nn.Module, top_k: int, layers: int | None) -> nn.Module:
    """A copy of `model` sharing its weights, routing to at most `top_k` experts and
    keeping its first `layers` layers. A model it cannot make cheaper is an error."""
    moe = _moe_blocks(model)
    decoder = getattr(model, "model", None)
    all_layers = getattr(decoder, "layers", None)
    if all_layers is None:
        raise ValueError("self-speculation needs a decoder model (model.layers)")
    if layers is not None and layers >= len(all_layers):
        raise ValueError(f"speculative_config draft_layers={layers} is not fewer than the "
                         f"model's {len(all_layers)} layers")
    cheaper_routing = any(top_k < m.top_k for m in moe)
    if not cheaper_routing and layers is None:
        raise ValueError("self-speculation needs an MoE model whose routing it can narrow "
                         f"(draft_top_k={top_k} is not below any layer's top-k) or "
                         "draft_layers")
    if getattr(model, "offload", None) is not None:
        raise ValueError("self-speculation with offloaded experts is not supported yet")
    # every parameter and buffer is shared, and the KV pools are not copied (the draft's
    # runner gives it its own)
    memo: dict[int, object] = {id(t): t for t in model.parameters()}
    memo.update({id(t): t for t in model.buffers()})
    for a in model.attention_layers():
        if getattr(a, "kv_cache", None) is not None:
            memo[id(a.kv_cache)] = None
    draft = copy.deepcopy(model, memo)
    draft.model._plan = None  # its own native decode plan, over its own pools
    for m in _moe_blocks(draft):
        if top_k < m.top_k:
            m.top_k = top_k
            if hasattr(m, "renormalize"):
                m.renormalize = True  # the kept experts carry the whole output
    if layers is not None:
        draft.model.layers = nn.ModuleList(list(draft.model.layers)[:layers])
    return draft
