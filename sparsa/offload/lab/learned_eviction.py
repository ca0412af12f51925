"""Learned eviction for demand paging: imitate Belady with a predicted next use.

Belady evicts the resident expert whose next request is farthest away. Under per-layer
capacity the next request for a layer-l expert comes from a LATER token at layer l, so a
usable imitation (the idea of Parrot, Liu et al. 2020) ranks resident experts by a learned
estimate of how soon, and how likely, later tokens use them at that layer. This module:

- :class:`NextUseModel`: the :class:`~sparsa.offload.lab.neural_predictor.NeuralPredictor`
  network with the running layer included in ``own`` (at layer l of token t the router has
  chosen, so layers <= l of this token are known; later tokens are not) and a soft target:
  the discounted uses by the next ``horizon`` tokens of the prompt at that layer.
- :func:`next_use_scores`: (N, L, E) scores for a whole trace in one vectorized pass. They
  depend only on the trace (never on cache state), so the replay just reads them.
- :class:`ScorePolicy`: a :class:`~sparsa.offload.policies.CachePolicy` whose priority is a
  precomputed score (recency breaks ties). With :func:`oracle_next_scores` it is the offline
  "knows the next token's set at this layer" bound used to explain the gap to Belady.

Global capacity (one pool of (layer, expert) slots): at step (t, l) a slot (j, e) with
j <= l next serves token t+1, so its score is ``scores[t, j]``; with j > l it serves this
token's layer j later, and the newest allowed estimate is ``scores[t-1, j]`` (made at token
t-1's layer j for "used by the next token").
"""

from __future__ import annotations

import numpy as np

from sparsa.offload.lab.neural_predictor import NeuralPredictor, TokenInputs, token_inputs
from sparsa.offload.lab.predictors import History
from sparsa.offload.lab.trace import Trace
from sparsa.offload.policy_base import CachePolicy, Stream, scatter_mask

__all__ = ["NextUseModel", "ScorePolicy", "future_uses", "next_use_scores",
           "oracle_next_scores"]


def future_uses(trace: Trace, horizon: int, gamma: float) -> np.ndarray:
    """(N, L, E) float16: sum over h = 1..horizon of gamma**(h-1) * [token n+h of the same
    prompt uses e at layer l], normalized to [0, 1] (the training target)."""
    hot = trace.multi_hot()
    first = np.zeros(trace.num_tokens, dtype=bool)
    first[trace.prompt_starts()] = True
    seg = np.cumsum(first)
    out = np.zeros(hot.shape, np.float32)
    for h in range(1, horizon + 1):
        same = seg[h:] == seg[:-h]  # token n+h is in token n's prompt
        out[:-h] += np.where(same[:, None, None], gamma ** (h - 1) * hot[h:], 0.0)
    z = sum(gamma ** (h - 1) for h in range(1, horizon + 1))
    return (out / z).astype(np.float16)


class NextUseModel(NeuralPredictor):
    """P(an expert of layer l is used soon by the next tokens) at layer l of token t, from
    token t's layers <= l, earlier tokens and token t's id (not token t+1's: unknown)."""

    name = "nextuse"

    def __init__(self, horizon: int = 8, gamma: float = 0.6, **kw: object) -> None:
        super().__init__(lookahead=0, near_windows=(), **kw)  # type: ignore[arg-type]
        self.horizon, self.gamma = int(horizon), float(gamma)

    def _known(self, layer: np.ndarray | int) -> np.ndarray:
        return np.asarray(layer) + 1  # the running layer's routing is known

    def _targets(self, train: Trace) -> np.ndarray:
        return future_uses(train, self.horizon, self.gamma)

    def scores_all(self, x: TokenInputs) -> np.ndarray:
        """(N, L, E) float16 probabilities for every token and layer."""
        out = np.empty((x.tok.shape[0], self.num_layers, self.num_experts), np.float16)
        for layer in range(self.num_layers):
            out[:, layer] = 1.0 / (1.0 + np.exp(-self._logits(x, layer)))
        return out


def next_use_scores(model: NextUseModel, trace: Trace) -> np.ndarray:
    """(N, L, E) next-use scores for ``trace``; entry [t, l] reads token t's layers <= l and
    earlier tokens only (``own`` is masked per layer in the model's input builder)."""
    hist = History(trace, trace.num_layers - 1, 1)  # for the earlier-token arrays only
    return model.scores_all(token_inputs(hist, trace.experts.astype(np.int64)))


def oracle_next_scores(trace: Trace) -> np.ndarray:
    """OFFLINE bound, not a policy: 1 where the NEXT token of the same prompt uses the expert
    at that layer. Ranking by it is "Belady with a one-token horizon"."""
    return future_uses(trace, 1, 1.0)


class ScorePolicy(CachePolicy):
    """Evict the lowest precomputed score; ``scores[t, l, e]`` must use only what is known at
    layer l of token t (see :func:`next_use_scores`). Ties (equal scores, e.g. the oracle's
    zeros) go to the least recently used."""

    def __init__(self, scores: np.ndarray, name: str = "nextuse") -> None:
        self.scores = scores
        self.name = name

    def begin(self, stream: Stream) -> None:
        super().begin(stream)
        self.last = np.full((self.G, self.S), -1.0)
        self.per_layer = stream.num_experts == self.S  # per layer: a slot per expert
        self.copies = self.G // (stream.num_layers if self.per_layer else 1)

    def priority(self, t: int) -> np.ndarray:
        recency = self.last / (t + 2.0) * 1e-3
        if self.per_layer:
            s = self.scores[t].astype(np.float64)  # (L, E): group = layer
            return np.tile(s, (self.copies, 1)) + recency
        nl = self.stream.num_layers
        tok, lay = divmod(t, nl)
        cur = self.scores[tok].astype(np.float64)
        prev = self.scores[tok - 1].astype(np.float64) if tok > 0 else np.zeros_like(cur)
        s = np.where(np.arange(nl)[:, None] <= lay, cur, prev).reshape(1, -1)
        return np.repeat(s, self.G, 0) + recency

    def observe(self, t: int, req: np.ndarray, hit: np.ndarray,
                mask: np.ndarray | None = None) -> None:
        self.last[scatter_mask((self.G, self.S), req) if mask is None else mask] = t

    def inserted(self, t: int, mask: np.ndarray, prefetched: bool) -> None:
        self.last[mask] = t
