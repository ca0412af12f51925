"""The information rule, and that the predictors learn the synthetic structure."""

from __future__ import annotations

import numpy as np
import pytest

from sparsa.offload.lab.predictors import (
    CombinedPredictor,
    CooccurrencePredictor,
    History,
    PrevTokenPredictor,
    TokenAffinityPredictor,
    predict_trace,
)
from tests.offload.helpers import assert_ignores_unknowns, synthetic

PREDICTORS = [lambda: CooccurrencePredictor(2), TokenAffinityPredictor, PrevTokenPredictor,
              lambda: CombinedPredictor(sample=200)]


def test_history_holds_only_earlier_layers():
    tr = synthetic()
    for layer in range(tr.num_layers):
        for d in (1, 2):
            h = History(tr, layer, lookahead=d)
            assert h.own.shape[1] == max(0, layer - d + 1)
            # the shifted history never holds a token's own row
            assert (h.prev[tr.prompt_starts()] == -1).all()
            np.testing.assert_array_equal(h.prev[1:][~h.first[1:]],
                                          tr.experts[:-1][~h.first[1:]])


@pytest.mark.parametrize("make", PREDICTORS)
@pytest.mark.parametrize("lookahead", [1, 2])
def test_prediction_ignores_current_layer_and_future(make, lookahead):
    train = synthetic(n_prompts=8, seed=3)
    pred = make().fit(train)
    assert_ignores_unknowns(pred, synthetic(n_prompts=3, seed=4), lookahead)


def test_predictors_beat_chance_and_combined_is_best():
    train = synthetic(n_prompts=30, length=20, seed=5)
    test = synthetic(n_prompts=10, length=20, seed=6)
    hot = test.multi_hot()
    prec = {}
    for make in PREDICTORS:
        p = make().fit(train)
        top = predict_trace(p, test, 2).astype(np.int64)
        prec[p.name] = np.take_along_axis(hot, top, axis=2).mean()
    assert prec["token"] > 0.45 > 2 / 8  # the synthetic favourite expert is learnable
    assert prec["combined"] >= max(prec["cooc"], prec["prev"]) - 0.02
