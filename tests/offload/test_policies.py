"""Each policy on hand-made streams with known answers; Belady against brute force."""

from __future__ import annotations

import functools
import itertools

import numpy as np
import pytest

from sparsa.offload.activation_policy import ActivationAware
from sparsa.offload.lab.cache_sim import simulate
from sparsa.offload.lab.trace import make_trace
from sparsa.offload.policies import LearnedRF, make_policy

from .helpers import synthetic


def paging(seq: list[int], e: int = 4):
    """A one-layer, top-1 trace: classic paging."""
    return make_trace(np.asarray(seq).reshape(-1, 1, 1), num_experts=e)


def hits(policy: str, seq: list[int], cap: int, e: int = 4) -> int:
    return simulate(paging(seq, e), make_policy(policy), cap)[0].hits


def test_lru_and_lfu_evict_different_experts():
    # after 0 1 0 2 1: LRU evicted 1 then 0 (resident {2, 1}); LFU kept 0 (used twice)
    seq = [0, 1, 0, 2, 1, 0]
    assert hits("lru", seq, 2) == 1
    assert hits("lfu", seq, 2) == 2


def test_lru_textbook_sequence():
    # 3 frames, 1 2 3 4 1 2 5 1 2 3 4 5: LRU has 10 faults (2 hits)
    seq = [1, 2, 3, 4, 1, 2, 5, 1, 2, 3, 4, 5]
    assert hits("lru", [s - 1 for s in seq], 3, e=5) == 2
    assert hits("belady", [s - 1 for s in seq], 3, e=5) == 5  # OPT: 7 faults


def test_lrfu_spans_lru_and_lfu():
    seq = [0, 1, 0, 2, 1, 0]
    tr = paging(seq)
    assert simulate(tr, make_policy("lrfu", lrfu_decay=50.0), 2)[0].hits == hits("lru", seq, 2)
    assert simulate(tr, make_policy("lrfu", lrfu_decay=1e-4), 2)[0].hits == hits("lfu", seq, 2)


def brute_force_hits(requests: list[tuple[int, ...]], cap: int) -> int:
    """The best hit count over every eviction choice (exhaustive search)."""

    @functools.cache
    def best(t: int, res: frozenset) -> int:
        if t == len(requests):
            return 0
        r = set(requests[t])
        got = len(r & res)
        miss = r - res
        n_evict = max(0, len(res) + len(miss) - cap)
        out = -1
        for victims in itertools.combinations(sorted(res - r), n_evict):
            out = max(out, got + best(t + 1, frozenset((res - set(victims)) | miss)))
        return out

    return best(0, frozenset())


@pytest.mark.parametrize("seed", range(12))
def test_belady_is_optimal_on_small_cases(seed):
    rng = np.random.default_rng(seed)
    k, e, cap = (1, 5, 2) if seed % 2 else (2, 6, 3)
    reqs = [tuple(rng.choice(e, k, replace=False)) for _ in range(9)]
    tr = make_trace(np.asarray(reqs).reshape(-1, 1, k), num_experts=e)
    res = simulate(tr, make_policy("belady"), cap)[0]
    assert res.hits == brute_force_hits(reqs, cap)
    for other in ("lru", "lfu", "lrfu", "arc"):
        assert simulate(tr, make_policy(other), cap)[0].hits <= res.hits


def test_every_policy_respects_capacity_and_bounds():
    tr = synthetic(n_prompts=5, length=10, layers=3, experts=8, k=2, seed=1)
    library = tr.multi_hot()[:10].astype(float)
    first = np.zeros(tr.num_tokens, dtype=bool)
    first[tr.prompt_starts()] = True
    policies = [make_policy(n) for n in ("lru", "lfu", "lrfu", "arc", "belady")]
    policies += [ActivationAware(library), LearnedRF.fit(tr.experts, first, 8, horizon=4,
                                                         every=2)]
    belady = {r.capacity: r.hits for r in simulate(tr, make_policy("belady"), [2, 4, 8])}
    for pol in policies:
        for per_layer, caps in ((True, [2, 4, 8]), (False, [6, 12])):
            for r in simulate(tr, pol, caps, per_layer=per_layer):
                assert 0 <= r.hits <= r.requests == tr.num_tokens * 3 * 2
                assert r.demand_loads == r.requests - r.hits
                if per_layer:
                    assert r.hits <= belady[r.capacity]
                    if r.capacity == 8:  # everything fits: only compulsory misses
                        assert r.demand_loads == len(np.unique(
                            tr.experts + 8 * np.arange(3)[None, :, None]))
