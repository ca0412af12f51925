"""Expert predictors for prefetching, as pure trace-level components.

The information rule: a prediction for layer l of token t may use this token's experts at
layers before l, the experts of earlier tokens, and token ids. It is enforced by the type a
predictor receives: :class:`History` for target layer l is built from a COPY of only the
known layers of each token (``own``) and from arrays shifted by one token (``prev``), so the
current layer's true experts are not in the object at all.

Every predictor is batch-first: ``scores(history) -> (N, E)`` for all N tokens at once (the
replay needs every prediction, and numpy makes that one pass). The engine (later) can call
the same method on a one-token History; a gate-lookahead predictor, which needs hidden
states, implements :class:`Predictor` with the hidden state passed through ``History.extra``.
"""

from __future__ import annotations

import numpy as np

from sparsa.offload.lab.trace import Trace

__all__ = [
    "CombinedPredictor",
    "CooccurrencePredictor",
    "History",
    "Predictor",
    "PrevTokenPredictor",
    "TokenAffinityPredictor",
    "TransitionPredictor",
    "predict_trace",
]


class History:
    """What is known before layer ``layer`` runs, for every token of a trace.

    ``lookahead`` = d means the prediction is made when layer ``layer - d`` has finished, so
    ``own`` holds layers ``0 .. layer - d`` of each token (empty for the first layers, whose
    predictions are made when the token starts).
    """

    def __init__(self, trace: Trace, layer: int, lookahead: int = 1,
                 extra: dict | None = None) -> None:
        if lookahead < 1:
            raise ValueError("lookahead must be >= 1")
        self.layer = int(layer)
        self.num_layers = trace.num_layers
        self.num_experts = trace.num_experts
        known = max(0, self.layer - lookahead + 1)
        self.own = trace.experts[:, :known].astype(np.int64)  # (N, known, k), a copy
        self.first, self.prev = _shifted(trace)
        self.token_ids = trace.token_ids.copy()
        self.extra = extra or {}
        self._counts: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    @property
    def num_tokens(self) -> int:
        return int(self.token_ids.shape[0])

    def earlier(self, back: np.ndarray) -> np.ndarray:
        """(N, L, k) experts of token n - back[n] (back >= 1) of the same prompt, -1 where
        that is outside the prompt. Reads only ``prev`` rows <= n: no token's own row."""
        back = np.asarray(back, dtype=np.int64)
        if (back < 1).any():
            raise ValueError("back must be >= 1: a token's own routing is not history")
        n = np.arange(self.num_tokens)
        src = n - back + 1  # prev[m] holds token m-1
        seg = np.cumsum(self.first)
        ok = (src >= 0) & (seg[np.maximum(src - 1, 0)] == seg) & (src - 1 >= 0)
        out = self.prev[np.clip(src, 0, self.num_tokens - 1)].copy()
        out[~ok] = -1
        return out

    def same_token_back(self) -> np.ndarray:
        """(N,) distance to the previous occurrence of the same token id in the prompt
        (a huge number when there is none)."""
        key = self.token_ids * (self.num_tokens + 1) + np.cumsum(self.first)
        order = np.lexsort((np.arange(self.num_tokens), key))
        back = np.full(self.num_tokens, 1 << 40, dtype=np.int64)
        same = key[order][1:] == key[order][:-1]
        back[order[1:][same]] = order[1:][same] - order[:-1][same]
        return back

    def prompt_counts(self, layer: int) -> tuple[np.ndarray, np.ndarray]:
        """(N, E) uses of each expert at ``layer`` by EARLIER tokens of the same prompt, and
        (N,) how many earlier tokens there are."""
        if layer in self._counts:
            return self._counts[layer]
        hot = _multi_hot(self.prev[:, layer], self.num_experts).astype(np.float32)
        seg = np.cumsum(self.first) - 1
        csum = np.cumsum(hot, axis=0)
        starts = np.flatnonzero(self.first)
        base = np.where(starts[seg][:, None] > 0, csum[np.maximum(starts[seg] - 1, 0)], 0.0)
        n_prev = np.arange(self.num_tokens) - starts[seg]
        self._counts[layer] = (csum - base, n_prev.astype(np.float32))
        return self._counts[layer]


_SHIFT_CACHE: dict[int, tuple[Trace, np.ndarray, np.ndarray]] = {}


def _shifted(trace: Trace) -> tuple[np.ndarray, np.ndarray]:
    """(prompt-start flags, experts shifted one token later within each prompt), cached per
    trace object because every layer's History needs the same arrays (read-only views)."""
    hit = _SHIFT_CACHE.get(id(trace))
    if hit is not None and hit[0] is trace:
        return hit[1], hit[2]
    first = np.zeros(trace.num_tokens, dtype=bool)
    first[trace.prompt_starts()] = True
    prev = np.full(trace.experts.shape, -1, dtype=np.int64)
    prev[1:] = trace.experts[:-1]
    prev[first] = -1
    first.flags.writeable = False
    prev.flags.writeable = False
    _SHIFT_CACHE.clear()  # one trace at a time: the arrays are large
    _SHIFT_CACHE[id(trace)] = (trace, first, prev)
    return first, prev


def _multi_hot(ids: np.ndarray, e: int) -> np.ndarray:
    """(N, k) ids (-1 = none) -> (N, E) bool."""
    out = np.zeros((ids.shape[0], e + 1), dtype=bool)
    np.put_along_axis(out, np.where(ids < 0, e, ids), True, axis=1)
    return out[:, :e]


class Predictor:
    """Interface: ``fit`` on a training trace, then ``scores`` for one target layer."""

    name = "base"

    def fit(self, train: Trace) -> Predictor:
        return self

    def scores(self, hist: History) -> np.ndarray:
        """(N, E) float, higher = more likely used at ``hist.layer``."""
        raise NotImplementedError


def predict_trace(pred: Predictor, trace: Trace, m: int, lookahead: int = 1) -> np.ndarray:
    """(N, L, m) the top-m ranked expert ids for every token and layer."""
    out = np.empty((trace.num_tokens, trace.num_layers, m), dtype=np.int16)
    for layer in range(trace.num_layers):
        s = pred.scores(History(trace, layer, lookahead))
        top = np.argpartition(-s, m - 1, axis=1)[:, :m]
        order = np.argsort(-np.take_along_axis(s, top, axis=1), axis=1, kind="stable")
        out[:, layer] = np.take_along_axis(top, order, axis=1)
    return out


def _layer_prior(train: Trace) -> np.ndarray:
    """(L, E) smoothed probability that an expert is used at a layer."""
    hot = train.multi_hot()
    return (hot.sum(0) + 1.0) / (hot.shape[0] + 2.0)


class CooccurrencePredictor(Predictor):
    """Naive Bayes over this token's known earlier layers: each known layer j within
    ``depth`` of the target adds log P(i at j | e at l) / P(i at j) for its experts i (and
    the absence terms), learned from co-occurrence counts on the training trace."""

    name = "cooc"

    def __init__(self, depth: int = 3) -> None:
        self.depth = int(depth)

    def fit(self, train: Trace) -> CooccurrencePredictor:
        ex = train.experts.astype(np.int64)
        n, nl, _ = ex.shape
        e = train.num_experts
        self.prior = _layer_prior(train)
        hot = train.multi_hot()
        used = hot.sum(0).astype(np.float64)  # (L, E)
        self.w: dict[tuple[int, int], np.ndarray] = {}
        self.w0: dict[tuple[int, int], np.ndarray] = {}
        for tgt in range(nl):
            for j in range(max(0, tgt - self.depth), tgt):
                # pair counts via bincount over the k x k expert pairs of every token
                a = ex[:, j][:, :, None] * e + ex[:, tgt][:, None, :]
                ok = (ex[:, j][:, :, None] >= 0) & (ex[:, tgt][:, None, :] >= 0)
                c = np.bincount(a[ok], minlength=e * e).reshape(e, e)  # [i, e]
                p_ie = (c + 1.0) / (used[tgt][None, :] + 2.0)
                p_i = (used[j] + 1.0) / (n + 2.0)
                w1 = np.log(p_ie) - np.log(p_i)[:, None]
                w0 = np.log1p(-p_ie) - np.log1p(-p_i)[:, None]
                self.w[j, tgt] = (w1 - w0).astype(np.float32)
                self.w0[j, tgt] = w0.sum(0).astype(np.float32)
        return self

    def scores(self, hist: History) -> np.ndarray:
        tgt = hist.layer
        s = np.broadcast_to(np.log(self.prior[tgt]).astype(np.float32),
                            (hist.num_tokens, hist.num_experts)).copy()
        for j in range(max(0, tgt - self.depth), min(tgt, hist.own.shape[1])):
            ids = hist.own[:, j]
            w = np.vstack([self.w[j, tgt], np.zeros((1, hist.num_experts), np.float32)])
            s += w[np.where(ids < 0, hist.num_experts, ids)].sum(1) + self.w0[j, tgt]
        return s


class TransitionPredictor(Predictor):
    """Naive Bayes from the PREVIOUS token's experts at layers l-1, l, l+1 to this token's
    layer l (consecutive tokens of a prompt share context, so their routing correlates)."""

    name = "transition"

    def fit(self, train: Trace) -> TransitionPredictor:
        first = np.zeros(train.num_tokens, dtype=bool)
        first[train.prompt_starts()] = True
        ex = train.experts.astype(np.int64)
        cur, prv = ex[1:][~first[1:]], ex[:-1][~first[1:]]
        e, nl = train.num_experts, train.num_layers
        self.prior = _layer_prior(train)
        n = len(cur)
        used_c = np.stack([np.bincount(cur[:, j][cur[:, j] >= 0], minlength=e)
                           for j in range(nl)]).astype(np.float64)
        used_p = np.stack([np.bincount(prv[:, j][prv[:, j] >= 0], minlength=e)
                           for j in range(nl)]).astype(np.float64)
        self.w: dict[tuple[int, int], np.ndarray] = {}
        for tgt in range(nl):
            for j in range(max(0, tgt - 1), min(nl, tgt + 2)):
                a = prv[:, j][:, :, None] * e + cur[:, tgt][:, None, :]
                ok = (prv[:, j][:, :, None] >= 0) & (cur[:, tgt][:, None, :] >= 0)
                c = np.bincount(a[ok], minlength=e * e).reshape(e, e)
                p_ie = (c + 1.0) / (used_c[tgt][None, :] + 2.0)
                p_i = (used_p[j] + 1.0) / (n + 2.0)
                self.w[j, tgt] = (np.log(p_ie) - np.log(p_i)[:, None]).astype(np.float32)
        return self

    def scores(self, hist: History) -> np.ndarray:
        tgt = hist.layer
        s = np.zeros((hist.num_tokens, hist.num_experts), np.float32)
        for (j, t2), w in self.w.items():
            if t2 == tgt:
                ids = hist.prev[:, j]
                w1 = np.vstack([w, np.zeros((1, hist.num_experts), np.float32)])
                s += w1[np.where(ids < 0, hist.num_experts, ids)].sum(1)
        return s


class TokenAffinityPredictor(Predictor):
    """log P(expert at layer | token id), counted on the training trace and shrunk towards
    the layer's prior with ``alpha`` pseudo-counts (rare and unseen tokens fall back to it)."""

    name = "token"

    def __init__(self, alpha: float = 4.0) -> None:
        self.alpha = float(alpha)

    def fit(self, train: Trace) -> TokenAffinityPredictor:
        self.prior = _layer_prior(train)
        v = int(train.token_ids.max()) + 1
        hot = train.multi_hot().reshape(train.num_tokens, -1).astype(np.float32)
        self.counts = np.zeros((v, hot.shape[1]), dtype=np.float32)
        np.add.at(self.counts, train.token_ids, hot)  # (V, L*E)
        self.n = np.bincount(train.token_ids, minlength=v).astype(np.float32)
        self.num_layers, self.num_experts = self.prior.shape
        return self

    def scores(self, hist: History) -> np.ndarray:
        tid = hist.token_ids
        seen = tid < len(self.n)
        t = np.where(seen, tid, 0)
        e = self.num_experts
        c = self.counts[t, hist.layer * e:(hist.layer + 1) * e] * seen[:, None]
        n = self.n[t] * seen
        p = (c + self.alpha * self.prior[hist.layer][None]) / (n + self.alpha)[:, None]
        return np.log(p)


class PrevTokenPredictor(Predictor):
    """The previous token's experts at the same layer, then this prompt's frequency there
    (the request's own activation history, as MoE-Infinity's activation matrix keeps)."""

    name = "prev"

    def scores(self, hist: History) -> np.ndarray:
        prev = _multi_hot(hist.prev[:, hist.layer], hist.num_experts).astype(np.float32)
        counts, n_prev = hist.prompt_counts(hist.layer)
        return prev + counts / np.maximum(n_prev, 1.0)[:, None]


class CombinedPredictor(Predictor):
    """A per-layer logistic combination of the component predictors' scores: weights are
    fit on one half of the training prompts with components fit on the other half, so the
    weights see out-of-sample component scores (in-sample token affinity would look far
    better than it is); the components are then refit on the whole training trace."""

    name = "combined"

    def __init__(self, lookahead: int = 1, depth: int = 3, sample: int = 6000,
                 seed: int = 0) -> None:
        self.lookahead = int(lookahead)
        self.depth = int(depth)
        self.sample = int(sample)
        self.seed = int(seed)

    def _components(self) -> list[Predictor]:
        return [CooccurrencePredictor(self.depth), TokenAffinityPredictor(),
                CooccurrencePredictor(64), TransitionPredictor()]

    def _features(self, comps: list[Predictor], hist: History) -> np.ndarray:
        prev = _multi_hot(hist.prev[:, hist.layer], hist.num_experts).astype(np.float32)
        counts, n_prev = hist.prompt_counts(hist.layer)
        back = hist.same_token_back()
        same = hist.earlier(np.minimum(back, hist.num_tokens + 1))[:, hist.layer]
        feats = [comps[0].scores(hist), comps[1].scores(hist), prev,
                 counts / np.maximum(n_prev, 1.0)[:, None],
                 np.broadcast_to(np.log(self.prior[hist.layer]), prev.shape),
                 comps[2].scores(hist), comps[3].scores(hist),
                 _multi_hot(same, hist.num_experts)]
        return np.stack(feats, axis=-1).astype(np.float32)  # (N, E, F)

    def fit(self, train: Trace) -> CombinedPredictor:
        rng = np.random.default_rng(self.seed)
        prompts = np.unique(train.prompts)
        half = set(rng.permutation(prompts)[: len(prompts) // 2].tolist())
        a = train.subset(half)
        b = train.subset([p for p in prompts if p not in half])
        self.prior = _layer_prior(train)
        comps = [c.fit(a) for c in self._components()]
        hot = b.multi_hot()
        rows = rng.permutation(b.num_tokens)[: self.sample]
        self.coef = np.zeros((train.num_layers, 8 + 1), dtype=np.float64)
        for layer in range(train.num_layers):
            x = self._features(comps, History(b, layer, self.lookahead))[rows]
            y = hot[rows, layer]
            self.coef[layer] = _logistic(x.reshape(-1, x.shape[-1]), y.reshape(-1))
        self.comps = [c.fit(train) for c in self._components()]
        return self

    def scores(self, hist: History) -> np.ndarray:
        x = self._features(self.comps, hist)
        w = self.coef[hist.layer]
        return x @ w[:-1].astype(np.float32) + np.float32(w[-1])


def _logistic(x: np.ndarray, y: np.ndarray, iters: int = 60) -> np.ndarray:
    """Weights (F + 1,) of a logistic regression by Newton's method (few features, so the
    Hessian is tiny); features are standardized for conditioning, then mapped back."""
    mu, sd = x.mean(0), x.std(0) + 1e-6
    z = np.hstack([(x - mu) / sd, np.ones((len(x), 1), np.float32)]).astype(np.float64)
    w = np.zeros(z.shape[1])
    yf = y.astype(np.float64)
    for _ in range(iters):
        p = 1.0 / (1.0 + np.exp(-(z @ w)))
        grad = z.T @ (p - yf) + 1e-3 * w
        hess = (z * (p * (1 - p))[:, None]).T @ z + 1e-3 * np.eye(len(w))
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.abs(step).max() < 1e-6:
            break
    coef = w[:-1] / sd
    return np.append(coef, w[-1] - (coef * mu).sum())
