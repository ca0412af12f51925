"""Synthetic routing traces with some structure (token affinity, layer-to-layer carry)."""

from __future__ import annotations

import numpy as np

from sparsa.offload.trace import Trace, make_trace


def synthetic(n_prompts: int = 6, length: int = 12, layers: int = 4, experts: int = 8,
              k: int = 2, seed: int = 0, vocab: int = 10) -> Trace:
    # the structure (each token's favourite expert per layer) is the same for every seed, so
    # a trace drawn with one seed trains predictors for another
    favourite = np.random.default_rng(12345).integers(0, experts, size=(vocab, layers))
    rng = np.random.default_rng(seed)
    rows, prompts, tokens = [], [], []
    for p in range(n_prompts):
        for _ in range(length):
            tok = int(rng.integers(vocab))
            ex = np.empty((layers, k), dtype=np.int64)
            for j in range(layers):
                first = favourite[tok, j] if rng.random() < 0.7 else rng.integers(experts)
                rest = rng.choice([e for e in range(experts) if e != first], k - 1,
                                  replace=False)
                ex[j] = [first, *rest]
            rows.append(ex)
            prompts.append(100 + p)
            tokens.append(f"t{tok}")
    tr = make_trace(np.stack(rows), prompts, tokens, num_experts=experts)
    tr.token_ids = np.asarray([int(t[1:]) for t in tokens])  # one vocabulary for all seeds
    tr.vocab = {f"t{i}": i for i in range(vocab)}
    return tr
