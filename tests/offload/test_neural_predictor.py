"""NeuralPredictor: the information rule, a planted pattern it must learn, pickling."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from sparsa.offload.neural_predictor import NeuralPredictor
from sparsa.offload.predictors import History, predict_trace
from sparsa.offload.trace import make_trace

from .helpers import assert_ignores_unknowns, synthetic


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
