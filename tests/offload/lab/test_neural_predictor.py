"""NeuralPredictor: the information rule, a planted pattern it must learn, pickling."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from sparsa.offload.lab.neural_predictor import NEAR_WINDOWS, NeuralPredictor, prompt_neighbours
from sparsa.offload.lab.predictors import History, predict_trace
from sparsa.offload.lab.trace import make_trace
from tests.offload.helpers import assert_ignores_unknowns, synthetic


def _small(**kw) -> NeuralPredictor:
    return NeuralPredictor(dim=16, hidden=16, batch=32, lr=1e-2, **kw)


@pytest.mark.parametrize("lookahead", [1, 2])
def test_neural_ignores_current_layer_and_future(lookahead):
    train = synthetic(n_prompts=6, seed=3)
    pred = _small(lookahead=lookahead, epochs=1).fit(train)
    assert_ignores_unknowns(pred, synthetic(n_prompts=3, seed=4), lookahead, tol=1e-5)


def _planted(n_prompts: int, seed: int, length: int = 16, layers: int = 4,
             experts: int = 8) -> object:
    """Layer j's first expert is (layer j-1's first expert + 1) % E, the second a fixed
    function of the first; layer 0 is random: only this token's earlier layers predict."""
    rng = np.random.default_rng(seed)
    n = n_prompts * length
    ex = np.empty((n, layers, 2), np.int64)
    ex[:, 0, 0] = rng.integers(experts, size=n)
    for j in range(1, layers):
        ex[:, j, 0] = (ex[:, j - 1, 0] + 1) % experts
    ex[:, :, 1] = (ex[:, :, 0] * 3 + 1 + np.arange(layers)) % experts
    same = ex[:, :, 1] == ex[:, :, 0]
    ex[:, :, 1][same] = (ex[:, :, 0][same] + 1) % experts
    return make_trace(ex, np.repeat(np.arange(n_prompts), length),
                      rng.integers(50, size=n), num_experts=experts)


def test_neural_learns_planted_pattern_and_beats_prior():
    train, test = _planted(40, 0), _planted(10, 1)
    pred = _small(epochs=6).fit(train)
    hot = test.multi_hot()
    top = predict_trace(pred, test, 2).astype(np.int64)
    prec = np.take_along_axis(hot, top, axis=2)[:, 1:].mean()  # layers 1.. are predictable
    # trivial baseline: each layer's two most popular training experts
    popular = np.argsort(-train.multi_hot().sum(0), axis=1)[:, :2]
    base = np.take_along_axis(hot, np.broadcast_to(popular, top.shape), axis=2)[:, 1:].mean()
    assert base < 0.4
    assert prec > 0.9


def test_neural_pickles_with_its_weights():
    train = synthetic(n_prompts=4, seed=1)
    pred = _small(epochs=1).fit(train)
    again = pickle.loads(pickle.dumps(pred))
    h = History(train, 2, 1)
    np.testing.assert_allclose(again.scores(h), pred.scores(h), rtol=1e-6)


def test_prompt_neighbours_follow_the_matching_earlier_token():
    # prompt of 4 tokens, 3 layers, top-2 of 8: token 3 repeats token 1 at layers 0-1, so
    # for layer 2 its best match is token 1 and the attention leans to token 1's layer 2
    ex = np.array([[[0, 1], [2, 3], [4, 5]],
                   [[6, 7], [0, 1], [2, 3]],
                   [[1, 2], [3, 4], [6, 7]],
                   [[6, 7], [0, 1], [5, 6]]])
    trace = make_trace(ex, num_experts=8)
    hist = History(trace, 2, 1)
    near = prompt_neighbours(trace.experts.astype(np.int64), hist.prev, hist.first, 8, [2],
                             lambda layer: layer)[:, 0].astype(np.float32)
    assert near.shape == (4, 16 * len(NEAR_WINDOWS)) and not near[0].any()  # no earlier token
    for i, window in enumerate(NEAR_WINDOWS):
        att, best = near[3, 16 * i:16 * i + 8], near[3, 16 * i + 8:16 * i + 16]
        shared = 2 * min(window, 2)  # token 1 shares both experts at each compared layer
        # the best match is token 1 (all shared: 1), its layer-2 experts are 2 and 3
        np.testing.assert_allclose(best, np.isin(np.arange(8), [2, 3]) * 1.0)
        w1 = np.exp(0.5 * shared) / (np.exp(0.5 * shared) + 2.0)  # softmax over tokens 0-2
        np.testing.assert_allclose(att[[2, 3]], [w1, w1], atol=2e-3)
        assert att.sum() == pytest.approx(2.0, abs=1e-2)
    # token 3's own layer 2 (what is predicted) is not read: changing it changes nothing
    ex2 = ex.copy()
    ex2[3, 2] = [0, 4]
    t2 = make_trace(ex2, num_experts=8)
    h2 = History(t2, 2, 1)
    again = prompt_neighbours(t2.experts.astype(np.int64), h2.prev, h2.first, 8, [2],
                              lambda layer: layer)[:, 0].astype(np.float32)
    np.testing.assert_array_equal(again, near)


def test_neural_without_neighbours_still_fits():
    train = synthetic(n_prompts=4, seed=1)
    pred = _small(epochs=1, near_windows=()).fit(train)
    assert pred.scores(History(train, 2, 1)).shape == (train.num_tokens, train.num_experts)
    assert pred.num_features == (4 * train.num_layers + 2) * train.num_experts
