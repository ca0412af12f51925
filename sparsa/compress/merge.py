"""Expert merging (HC-SMoE / M-SMoE style): per MoE layer, group similar experts and average
each group into one expert.

1. Similarity: each expert is described by its outputs on calibration tokens (sampled expert
   inputs, `calibrate`), by their mean, or by its router logits on those tokens; experts are
   compared by cosine distance.
2. Grouping into the target count: average-linkage hierarchical clustering (HC-SMoE), or
   the most-used experts as centres with every other expert joining the nearest (M-SMoE).
3. Merging: each group is anchored on its most-used member; the other members' intermediate
   neurons are permuted to match the anchor's (weight matching: a linear assignment on the
   similarity of each neuron's gate row, up row and down column), since two experts compute
   the same function with their neurons in any order; then gate, up and down are averaged
   weighted by use. The merged router row is the use-weighted mean of the group's rows (or
   the anchor's, or their sum).
"""

from __future__ import annotations

import numpy as np
import torch
from torch.nn import functional as F

from sparsa.compress.calibrate import LayerStats
from sparsa.compress.checkpoint import LayerPlan, MoeLayer, SourceCheckpoint
from sparsa.config.compress import CompressConfig


def expert_features(src: SourceCheckpoint, layer: MoeLayer, samples: torch.Tensor,
                    similarity: str) -> torch.Tensor:
    """[E, D]: what each expert is compared by (see the module docstring)."""
    x = samples.float()
    if similarity == "router":
        logits = x @ src.tensor(f"{layer.prefix}.gate.weight").float().T  # [S, E]
        # softmax routing ignores a shift shared by every expert: compare what is left
        logits = logits - logits.mean(dim=1, keepdim=True)
        return logits.T.contiguous()
    feats = []
    for e in range(layer.num_experts):
        gate, up, down = (src.expert(layer, e, r) for r in ("gate", "up", "down"))
        out = (F.silu(x @ gate.T) * (x @ up.T)) @ down.T  # [S, H]
        feats.append(out.mean(0) if similarity == "output_mean" else out.flatten())
    return torch.stack(feats)


def cosine_distances(feats: torch.Tensor) -> np.ndarray:
    f = F.normalize(feats.double(), dim=1)
    d = (1.0 - f @ f.T).clamp_min(0.0)
    d.fill_diagonal_(0.0)
    d = (d + d.T) / 2  # exactly symmetric, as scipy checks
    return d.numpy()


def group_experts(dist: np.ndarray, usage: torch.Tensor, target: int,
                  grouping: str) -> list[list[int]]:
    """`target` groups of expert indices (each sorted, groups by their first member)."""
    E = len(dist)
    if grouping == "hierarchical":
        from scipy.cluster.hierarchy import cut_tree, linkage
        from scipy.spatial.distance import squareform

        z = linkage(squareform(dist, checks=False), method="average")
        labels = cut_tree(z, n_clusters=target).flatten().tolist()
    else:  # dominant: the `target` most-used experts are the centres
        order = sorted(range(E), key=lambda e: (-float(usage[e]), e))
        centres = sorted(order[:target])
        labels = [e if e in centres else min(centres, key=lambda c: (dist[e][c], c))
                  for e in range(E)]
    groups: dict[int, list[int]] = {}
    for e, lab in enumerate(labels):
        groups.setdefault(lab, []).append(e)
    return sorted(groups.values(), key=lambda g: g[0])


def neuron_features(gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """[I, 3H]: each intermediate neuron's gate row, up row and down column."""
    return torch.cat([gate, up, down.T], dim=1)


def align_neurons(anchor: torch.Tensor, member: torch.Tensor) -> torch.Tensor:
    """The permutation p of the member's neurons (rows of `neuron_features`) that best
    matches the anchor's: member neuron p[j] goes where anchor neuron j is."""
    from scipy.optimize import linear_sum_assignment

    sim = F.normalize(anchor.double(), dim=1) @ F.normalize(member.double(), dim=1).T
    rows, cols = linear_sum_assignment(sim.numpy(), maximize=True)
    return torch.as_tensor(cols[np.argsort(rows)], dtype=torch.long)


def merge_plan(src: SourceCheckpoint, layer: MoeLayer, stats: LayerStats, removed: int,
               cfg: CompressConfig) -> LayerPlan:
    """The plan that merges the layer's experts into `num_experts - removed`."""
    if stats.samples is None or not len(stats.samples):
        raise ValueError(f"{cfg.setting}: no calibration tokens reached layer {layer.layer}")
    usage = stats.usage(cfg.criterion)
    dist = cosine_distances(expert_features(src, layer, stats.samples, cfg.similarity))
    groups = group_experts(dist, usage, layer.num_experts - removed, cfg.grouping)
    plan = LayerPlan([], [], [], [])
    for group in groups:
        # the anchor (most used) first: the others are aligned to it
        members = sorted(group, key=lambda e: (-float(usage[e]), e))
        u = torch.tensor([float(usage[e]) for e in members], dtype=torch.float64)
        w = (u / u.sum() if u.sum() > 0 else torch.full_like(u, 1 / len(u))).tolist()
        perms: list[torch.Tensor | None] = [None]
        if len(members) > 1 and cfg.align:
            ref = neuron_features(*(src.expert(layer, members[0], r)
                                    for r in ("gate", "up", "down")))
            for e in members[1:]:
                perms.append(align_neurons(ref, neuron_features(
                    *(src.expert(layer, e, r) for r in ("gate", "up", "down")))))
        else:
            perms += [None] * (len(members) - 1)
        router = {"mean": w, "anchor": [1.0] + [0.0] * (len(members) - 1),
                  "sum": [1.0] * len(members)}[cfg.router]
        plan.groups.append(members)
        plan.weights.append(w)
        plan.router.append(router)
        plan.perms.append(perms)
    return plan
