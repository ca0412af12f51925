"""Expert pruning: per MoE layer, drop the experts the calibration text used least."""

from __future__ import annotations

import torch

from sparsa.compress.calibrate import LayerStats
from sparsa.compress.checkpoint import LayerPlan


def least_used(stats: LayerStats, removed: int, criterion: str) -> list[int]:
    """The `removed` experts of lowest use by `criterion` ("frequency": tokens routed,
    "weight": summed router weight); ties go by the other measure, then the higher index."""
    usage = stats.usage(criterion)
    other = stats.weights if criterion == "frequency" else stats.counts
    order = sorted(range(len(usage)), key=lambda e: (float(usage[e]), float(other[e]), -e))
    return sorted(order[:removed])


def prune_plan(stats: LayerStats, removed: int, criterion: str) -> LayerPlan:
    """The plan that keeps every expert but the `removed` least used, in their order (the
    router rows of the kept experts only)."""
    drop = set(least_used(stats, removed, criterion))
    return LayerPlan.keep([e for e in range(len(stats.counts)) if e not in drop])


def usage_table(stats: LayerStats) -> list[float]:
    """Each expert's share of the layer's routed tokens (for the recipe file)."""
    total = float(stats.counts.sum()) or 1.0
    return [round(float(c) / total, 5) for c in torch.as_tensor(stats.counts)]
