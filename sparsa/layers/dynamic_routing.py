"""Dynamic routing (lossy): after a MoE layer's router ranks the experts, keep fewer of them
per token (top-p, weight-threshold skipping, a per-layer k). The kept experts are always a
prefix of the ranking, so the output is a narrower [T, k'] routing the expert kernels take
unchanged; a row that keeps fewer than k' repeats its best expert with weight 0, which
reads no extra weights. Counts experts per token and the expert bytes a step reads."""

from __future__ import annotations

import torch
from torch import nn

from sparsa.config.routing import RoutingConfig, per_layer


class DynamicRouting:
    """One MoE layer's policy. `route_k` experts are ranked by the router (raw softmax
    probabilities, best first); `apply` keeps what the config allows."""

    def __init__(self, config: RoutingConfig, top_k: int, model_renormalizes: bool,
                 num_experts: int, expert_bytes: int, layer: int = 0, layers: int = 1):
        self.config = config
        self.top_p = per_layer("top_p", config.top_p, layer, layers)
        self.skip_threshold = per_layer("skip_threshold", config.skip_threshold, layer, layers)
        layer_k = per_layer("layer_top_k", config.layer_top_k, layer, layers)
        self.top_k = top_k
        self.max_k = min(layer_k or config.max_k or top_k, num_experts)
        if config.min_k > self.max_k:
            raise ValueError(f"dynamic_routing min_k ({config.min_k}) is above the {self.max_k} "
                             "experts this layer may use")
        self.route_k = max(self.max_k, top_k)  # the model's top-k mass sets the weights' sum
        self.model_renormalizes = model_renormalizes
        self.expert_bytes = expert_bytes
        self.tokens = self.kept = self.loaded = 0

    def apply(self, probs: torch.Tensor, ids: torch.Tensor, count: bool = True
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """probs, ids [T, route_k] (best first) -> weights, ids [T, k'] for the experts.
        count=False: a guess (offloading's lookahead), not routing: not counted."""
        if probs.shape[0] == 1:
            return self._apply_one(probs, ids, count)
        c = self.config
        mass = probs[:, :self.top_k].sum(-1, keepdim=True)
        p = probs[:, :self.max_k]
        n = torch.full((p.shape[0],), self.max_k, dtype=torch.long, device=p.device)
        if self.top_p is not None:
            # the fewest experts whose probability reaches top_p (the one crossing it kept)
            n = (p.cumsum(-1) < self.top_p).sum(-1) + 1
        n = n.clamp(c.min_k, self.max_k)
        col = torch.arange(self.max_k, device=p.device)
        keep = col[None, :] < n[:, None]
        if self.skip_threshold is not None:
            share = p * keep / (p * keep).sum(-1, keepdim=True)
            keep &= (share >= self.skip_threshold) | (col[None, :] < c.min_k)
            n = keep.sum(-1)
        width = int(n.max())
        keep = keep[:, :width]
        w = p[:, :width] * keep
        # the model's own weights: its top-k renormalized to 1, or the raw probabilities
        own = mass if self.model_renormalizes else torch.ones_like(mass)
        if c.renormalize:
            w = w * (mass / w.sum(-1, keepdim=True)) / own
        else:
            w = w / own
        ids = torch.where(keep, ids[:, :width], ids[:, :1])
        if count:
            self._count(keep, ids)
        return w, ids

    def _apply_one(self, probs: torch.Tensor, ids: torch.Tensor, count: bool
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """`apply` for one token (batch-1 decode), in plain Python: a dozen tiny tensor ops
        per layer cost more than a small model's expert GEMVs."""
        c = self.config
        ranked = probs[0].tolist()  # route_k values: max_k, or the model's top-k if more
        row = ranked[:self.max_k]
        n = self.max_k
        if self.top_p is not None:
            total, n = 0.0, 0
            for x in row:
                total += x
                n += 1
                if total >= self.top_p:
                    break
        n = min(max(n, c.min_k), self.max_k)
        if self.skip_threshold is not None:
            kept = sum(row[:n])
            n = max(c.min_k, sum(1 for x in row[:n] if x / kept >= self.skip_threshold))
        mass = sum(ranked[:self.top_k])
        own = mass if self.model_renormalizes else 1.0
        factor = (mass / sum(row[:n]) if c.renormalize else 1.0) / own
        if count:
            self.tokens += 1
            self.kept += n
            self.loaded += n
        return probs[:, :n] * factor, ids[:, :n]

    def _count(self, keep: torch.Tensor, ids: torch.Tensor) -> None:
        T = keep.shape[0]
        kept = int(keep.sum())
        self.tokens += T
        self.kept += kept
        self.loaded += kept if T == 1 else int(torch.unique(ids[keep]).numel())


def expert_nbytes(experts: nn.Module, num_experts: int) -> int:
    """Bytes of one expert's weights in the form the layer runs them."""
    per = getattr(getattr(experts, "cache", None), "expert_bytes", None)  # offloaded
    if isinstance(per, int):
        return per
    total = sum(t.numel() * t.element_size()
                for t in list(experts.parameters()) + list(experts.buffers()))
    return total // max(num_experts, 1)


def attach(model: nn.Module, config: RoutingConfig) -> list[DynamicRouting]:
    """A policy on every routed MoE block of `model` (their `routing_policy`); a model
    without one is an error naming the setting."""
    blocks = [m for m in model.modules() if hasattr(m, "routing_policy")]
    if not blocks:
        raise ValueError("dynamic_routing needs a mixture-of-experts model; this one has no "
                         "routed expert layers")
    policies = []
    for i, block in enumerate(blocks):
        policy = DynamicRouting(config, block.top_k, block.renormalizes_top_k,
                                block.num_routed_experts,
                                expert_nbytes(block.experts, block.num_routed_experts),
                                i, len(blocks))
        block.routing_policy = policy
        policies.append(policy)
    return policies


def stats(policies: list[DynamicRouting]) -> dict:
    """Mean experts per token per MoE layer, and expert bytes read per token (all layers),
    over the tokens routed so far."""
    tokens = max(policies[0].tokens, 1) if policies else 1
    kept = sum(p.kept for p in policies)
    loaded = sum(p.loaded * p.expert_bytes for p in policies)
    return {"tokens": policies[0].tokens if policies else 0,
            "experts_per_token": kept / tokens / max(len(policies), 1),
            "expert_bytes_per_token": loaded / tokens}
