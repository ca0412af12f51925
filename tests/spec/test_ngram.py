"""Prompt lookup: the continuation of the latest, longest earlier match of the suffix."""

from __future__ import annotations

import pytest

from sparsa.config.speculative import SpeculativeConfig
from sparsa.spec.ngram import lookup


@pytest.mark.parametrize("tokens,k,n_min,n_max,want", [
    ([1, 2, 3, 4, 5, 9, 2, 3, 4], 3, 2, 5, [5, 9, 2]),
    # the longest suffix wins over a later, shorter one
    ([7, 8, 9, 1, 5, 9, 1, 6, 8, 9, 1], 2, 1, 3, [5, 9]),
    # among equally long matches the latest one
    ([4, 1, 2, 4, 1, 3, 4, 1], 1, 2, 2, [3]),
    # fewer tokens than k when the match is near the end
    ([5, 5, 5, 5], 3, 1, 3, [5]),
    # no match of n_min tokens: no proposal
    ([1, 2, 3, 2, 4, 3], 2, 2, 4, []),
    ([1, 2, 3], 3, 2, 5, []),
    ([1], 3, 1, 2, []),
])
def test_lookup(tokens, k, n_min, n_max, want):
    assert lookup(tokens, k, n_min, n_max) == want


@pytest.mark.parametrize("bad,msg", [
    (dict(method="nope"), "method must be one of"),
    (dict(method="eagle"), 'needs "model"'),
    (dict(num_speculative_tokens=0), "num_speculative_tokens must be an int >= 1"),
    (dict(prompt_lookup_min=4, prompt_lookup_max=2), "prompt_lookup_min must be <="),
    (dict(disable_by_batch_size=0), "disable_by_batch_size"),
])
def test_bad_config(bad, msg):
    with pytest.raises(ValueError, match=msg):
        SpeculativeConfig(**bad)


def test_unknown_key_named():
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['num_tokens'\]"):
        SpeculativeConfig.from_dict({"method": "ngram", "num_tokens": 3})
