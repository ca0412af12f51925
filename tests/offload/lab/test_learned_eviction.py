"""Learned eviction (next-use scores): the information rule, a planted pattern, bounds."""

from __future__ import annotations

import numpy as np

from sparsa.offload.lab.cache_sim import simulate
from sparsa.offload.lab.learned_eviction import (
    NextUseModel,
    ScorePolicy,
    future_uses,
    next_use_scores,
    oracle_next_scores,
)
from sparsa.offload.lab.trace import make_trace
from sparsa.offload.policies import LRU, Belady
from tests.offload.helpers import synthetic


def _small(**kw) -> NextUseModel:
    return NextUseModel(horizon=3, gamma=0.5, dim=16, hidden=16, batch=32, lr=1e-2, **kw)


def test_next_use_scores_use_only_known_routing():
    train = synthetic(n_prompts=6, seed=3)
    model = _small(epochs=1).fit(train)
    test = synthetic(n_prompts=3, seed=4)
    base = next_use_scores(model, test)
    t = 17
    for layer in range(test.num_layers):
        ex = test.experts.copy()
        # layers <= `layer` of token t are known at its eviction; later ones and later
        # tokens are not
        ex[t, layer + 1:] = (ex[t, layer + 1:] + 3) % 8
        ex[t + 1:] = (ex[t + 1:] + 5) % 8
        changed = make_trace(ex, test.prompts, test.tokens, num_experts=8)
        changed.token_ids = test.token_ids
        after = next_use_scores(model, changed)
        np.testing.assert_array_equal(after[:t], base[:t])
        np.testing.assert_array_equal(after[t, : layer + 1], base[t, : layer + 1])


def test_future_uses_stay_inside_the_prompt():
    ex = np.array([[[0]], [[1]], [[0]], [[1]]])
    tr = make_trace(ex, ["a", "a", "b", "b"], num_experts=2)
    f = future_uses(tr, 2, 0.5).astype(np.float32)
    np.testing.assert_allclose(f[:, 0], [[0, 1 / 1.5], [0, 0], [0, 1 / 1.5], [0, 0]],
                               rtol=1e-3)


def _cyclic(n_prompts: int, seed: int, length: int = 30) -> object:
    """Each prompt cycles through three expert pairs in a random order (per prompt and
    layer). With room for two pairs LRU always evicts the pair needed next (the classic
    loop larger than the cache) and misses everything; keeping the pair of the token before
    last, which comes next, hits about half the requests (Belady's 0.506)."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n_prompts):
        order = np.stack([rng.permutation(3) for _ in range(2)], 1)  # (3, layers)
        for t in range(length):
            pair = order[t % 3]  # (layers,)
            rows.append(np.stack([2 * pair, 2 * pair + 1], 1))
    return make_trace(np.stack(rows), np.repeat(np.arange(n_prompts), length),
                      rng.integers(20, size=n_prompts * length), num_experts=6)


def test_next_use_policy_learns_a_cycle_lru_cannot():
    train, test = _cyclic(30, 0), _cyclic(8, 1)
    model = _small(epochs=5).fit(train)
    lru = simulate(test, LRU(), 4)[0].hit_rate
    learned = simulate(test, ScorePolicy(next_use_scores(model, test)), 4)[0].hit_rate
    belady = simulate(test, Belady(), 4)[0].hit_rate
    assert lru < 0.1
    assert 0.9 * belady < learned <= belady + 1e-12


def test_oracle_policy_bounds_per_layer_and_global():
    tr = synthetic(n_prompts=4, seed=2)
    sc = oracle_next_scores(tr)
    for per_layer, caps in ((True, [3, 5]), (False, [12, 20])):
        got = simulate(tr, ScorePolicy(sc, "oracle1"), caps, per_layer=per_layer)
        lru = simulate(tr, LRU(), caps, per_layer=per_layer)
        bel = simulate(tr, Belady(), caps, per_layer=per_layer)
        for g, lr, b in zip(got, lru, bel):
            assert lr.hit_rate - 0.02 <= g.hit_rate <= b.hit_rate + 1e-12
