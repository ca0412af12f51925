"""Mixture-of-experts layers: routing functions and a grouped expert block.

Experts are stored stacked ([E, H, 2I] gate+up, [E, I, H] down, applied as x @ W). Tokens
are sorted by expert so each active expert runs one GEMM over all of its tokens; there is no
per-token Python loop and no token is dropped. `GroupedExperts` holds that grouping once for
every expert block (full precision here, quantized in sparsa.layers.quantization).
"""

from __future__ import annotations

import re

import torch
from torch import nn
from torch.nn import functional as F


def softmax_topk(
    router_logits: torch.Tensor, top_k: int, renormalize: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over all experts, keep the top-k (Mixtral, Qwen-MoE, OLMoE)."""
    probs = torch.softmax(router_logits, dim=-1, dtype=torch.float)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


def grouped_topk(
    router_logits: torch.Tensor,
    top_k: int,
    n_group: int,
    topk_group: int,
    renormalize: bool,
    scoring: str = "softmax",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Group-limited routing (DeepSeek-V2): pick the best `topk_group` expert groups by their
    max score, then the top-k experts inside them."""
    if scoring != "softmax":
        raise ValueError(f"unsupported scoring function {scoring!r}")
    scores = torch.softmax(router_logits, dim=-1, dtype=torch.float)
    T, E = scores.shape
    group_scores = scores.view(T, n_group, E // n_group).max(dim=-1).values
    group_idx = torch.topk(group_scores, topk_group, dim=-1, sorted=False).indices
    group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1.0)
    score_mask = group_mask.unsqueeze(-1).expand(T, n_group, E // n_group).reshape(T, E)
    masked = scores.masked_fill(score_mask == 0, 0.0)
    weights, ids = torch.topk(masked, top_k, dim=-1, sorted=False)
    if renormalize:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return weights, ids


class GroupedExperts(nn.Module):
    """Token grouping shared by every expert block: subclasses give `num_experts` and
    `expert_forward(e, x)` (expert e's SwiGLU over the rows of x); `forward` runs each active
    expert once over all of its tokens and sums the k weighted outputs of each token."""

    num_experts: int

    def expert_forward(self, e: int, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(
        self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor
    ) -> torch.Tensor:
        T, k = topk_ids.shape
        if T == 1:
            # Decode at batch 1: no sort/permute bookkeeping, just the k experts.
            ids = topk_ids[0].tolist()
            w = topk_weights[0].to(x.dtype)
            out = self.expert_forward(ids[0], x) * w[0]
            for j in range(1, k):
                out = out + self.expert_forward(ids[j], x) * w[j]
            return out
        flat = topk_ids.reshape(-1)
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=self.num_experts).tolist()
        x_sorted = x[order // k]
        y_sorted = torch.empty_like(x_sorted)
        start = 0
        for e, c in enumerate(counts):
            if c:
                y_sorted[start : start + c] = self.expert_forward(e, x_sorted[start : start + c])
                start += c
        y = torch.empty_like(y_sorted)
        y[order] = y_sorted
        # Summing over the k slots in a fixed order keeps each token's result independent
        # of which other tokens share the batch.
        y = y.view(T, k, -1) * topk_weights.to(x.dtype).unsqueeze(-1)
        out = y[:, 0]
        for j in range(1, k):
            out = out + y[:, j]
        return out


class FusedExperts(GroupedExperts):
    """E SwiGLU experts with stacked weights."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.num_experts = num_experts
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        # [in, out] per expert, applied as x @ W (faster GEMV on CPU; see layers/linear.py)
        self.w13 = nn.Parameter(
            torch.empty(num_experts, hidden_size, 2 * intermediate_size), requires_grad=False
        )
        self.w2 = nn.Parameter(
            torch.empty(num_experts, intermediate_size, hidden_size), requires_grad=False
        )

    def load_expert(self, expert: int, which: str, loaded: torch.Tensor) -> None:
        """which: 'gate' | 'up' | 'down' (HF names w1/w3/w2 or gate/up/down_proj)."""
        if not 0 <= expert < self.num_experts:
            raise ValueError(f"expert index {expert} out of range (model has {self.num_experts})")
        inter = self.intermediate_size
        if which == "gate":
            target = self.w13.data[expert, :, :inter]
        elif which == "up":
            target = self.w13.data[expert, :, inter:]
        elif which == "down":
            target = self.w2.data[expert]
        else:
            raise ValueError(f"unknown expert projection {which!r}")
        if tuple(target.shape) != tuple(loaded.t().shape):
            raise ValueError(
                f"expert {expert} {which}: checkpoint shape {tuple(loaded.shape)}, "
                f"model {tuple(target.t().shape)}"
            )
        target.copy_(loaded.t())

    def expert_forward(self, e: int, x: torch.Tensor) -> torch.Tensor:
        gate, up = (x @ self.w13[e]).chunk(2, dim=-1)
        return (F.silu(gate) * up) @ self.w2[e]


_LAYER = re.compile(r"layers\.(\d+)\.")


def moe_blocks(model: nn.Module) -> list[tuple[int, str, nn.Module]]:
    """(layer index, module name, block) of every MoE block (a module with a ``route``
    method and an ``experts`` module of any implementation), in layer order. Each block is
    named by its shortest path: offloaded experts hold the next layer's block as a
    submodule, so "layers.0.mlp.experts.next_block" is layer 1's block too."""
    names: dict[int, tuple[nn.Module, str]] = {}
    for name, mod in model.named_modules(remove_duplicate=False):
        if isinstance(getattr(mod, "experts", None), GroupedExperts) and hasattr(mod, "route"):
            seen = names.get(id(mod))
            if seen is None or name.count(".") < seen[1].count("."):
                names[id(mod)] = (mod, name)
    out = []
    for mod, name in names.values():
        m = _LAYER.search(name + ".")
        if m is None:
            raise ValueError(f"cannot tell the layer index of MoE block {name!r}")
        out.append((int(m.group(1)), name, mod))
    return sorted(out, key=lambda t: t[0])
