"""Simulator accounting: capacity, prefetch counting, precision/recall, the stall model."""

from __future__ import annotations

import numpy as np
import pytest

from sparsa.offload.lab.cache_sim import BandwidthModel, simulate, stall_model
from sparsa.offload.policies import make_policy
from tests.offload.helpers import synthetic


def test_oracle_prefetch_hits_everything_and_is_counted():
    tr = synthetic(layers=3, k=2, seed=2)
    oracle = tr.experts.copy()
    for per_layer, cap in ((True, 2), (False, 6)):
        r = simulate(tr, make_policy("lru"), cap, per_layer=per_layer, prefetch=oracle)[0]
        assert r.hit_rate == 1.0
        assert r.demand_loads == 0
        assert r.prefetch_precision == 1.0 and r.prefetch_recall == 1.0
        assert r.prefetch_loads == r.prefetch_loads_used > 0
        assert r.bytes_loaded == r.prefetch_loads * BandwidthModel().expert_bytes


def test_wrong_prefetch_takes_capacity():
    # capacity 2, top-2: prefetching two wrong experts evicts what would have hit
    tr = synthetic(layers=2, k=2, seed=3)
    wrong = (tr.experts + 1) % 8
    wrong[np.isin(wrong, tr.experts)] = -1  # keep only truly wrong predictions
    base = simulate(tr, make_policy("lru"), 2)[0]
    with_pf = simulate(tr, make_policy("lru"), 2, prefetch=wrong.astype(np.int16))[0]
    assert with_pf.prefetch_precision == 0.0
    assert with_pf.hits <= base.hits
    assert with_pf.prefetch_loads_used == 0
    assert with_pf.demand_loads + with_pf.prefetch_loads >= base.demand_loads


@pytest.mark.parametrize("per_layer", [True, False])
def test_capacity_checked_and_loads_add_up(per_layer):
    tr = synthetic(layers=4, k=2, seed=4)
    pf = np.roll(tr.experts, 1, axis=0)  # the previous token's experts as a "prediction"
    caps = [3, 5] if per_layer else [8, 16]
    for r in simulate(tr, make_policy("lfu"), caps, per_layer=per_layer, prefetch=pf):
        assert r.requests == tr.num_tokens * 4 * 2
        assert r.hits + r.demand_loads == r.requests
        assert r.prefetch_loads_used <= r.prefetch_loads
        assert r.predicted_correct <= r.predicted
    with pytest.raises(ValueError, match="top-k"):
        simulate(tr, make_policy("lru"), 1)


def test_stall_model_by_hand():
    bw = BandwidthModel(expert_bytes=1.0, bandwidth=1.0, compute_s=1.0)  # a load takes 1 s
    # demand only: 2 misses at layer 0 -> wait 2 s; none at layer 1
    assert stall_model(np.zeros((1, 2)), np.array([[2, 0]]), bw, 0) == 2.0
    # prefetch 1 for layer 1 issued when layer 0's routing is known (t=0): ready at t=1,
    # hidden behind layer 0's compute -> no wait
    assert stall_model(np.array([[0, 1]]), np.array([[0, 0]]), bw, 1) == 0.0
    # prefetch 3 for layer 1: ready at t=3, layer 1 could start at t=1 -> 2 s wait
    assert stall_model(np.array([[0, 3]]), np.array([[0, 0]]), bw, 1) == 2.0
    # lookahead 2 issues both layers' prefetches at the token start
    assert stall_model(np.array([[1, 1]]), np.array([[0, 0]]), bw, 2) == 1.0
