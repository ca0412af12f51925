"""A learned (torch) expert predictor: per-target-layer sparse features into a small MLP.

Why this shape: the strongest trace-only signals are pairwise ("expert i at layer j of this
token, or of the previous token, makes expert e at layer l likely") plus the token id. A
naive-Bayes or logistic combination (:class:`~sparsa.offload.lab.predictors.CombinedPredictor`)
adds those signals independently; here every (source, layer, expert) feature gets a learned
embedding PER TARGET LAYER (a dense (F, D) input matrix per layer: batches hold one target
layer each), summed with a token-id embedding and a layer embedding, and an MLP mixes them,
so interactions between signals can be learned. A "wide" (F, E) term per layer adds a direct
logistic weight per feature (what the naive-Bayes predictors capture), so the deep part only
has to learn the rest. On DeepSeek-V2-Lite: precision@6 0.697 on heldout (0.687 without the
prompt-neighbour features) against the combined predictor's 0.625 (sparsa/offload/README.md).

Inputs for target layer l of token n (only what the information rule allows; see
:class:`~sparsa.offload.lab.predictors.History`):

- this token's known layers (``own``: layers before ``l - lookahead + 1``), multi-hot;
- the previous token's and the one before's experts at every layer;
- the routing of the previous occurrence of the same token id in this prompt;
- this prompt's frequency of each expert at layer l so far, and an exponentially decayed
  recency count (weighted features);
- what the earlier tokens of the prompt whose routing matches this token's known layers
  used at layer l (:func:`prompt_neighbours`, an attention keyed by expert overlap: the
  context-specific "tokens like this one, here, went to ..." that weights fit over all
  prompts cannot hold; weighted features, ``near_windows``);
- the token id (ids seen fewer than ``min_count`` times in training share one embedding).

Training is BCE on the 64 multi-hot targets of every (token, layer) pair of the training
trace, one thread, two epochs (6-8 minutes on the full train split). The same inputs (less
the neighbour features), with ``own`` extended to the running layer and a future target,
drive the learned eviction policy (:mod:`sparsa.offload.lab.learned_eviction`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from sparsa.offload.lab.predictors import History, Predictor, _multi_hot
from sparsa.offload.lab.trace import Trace

__all__ = ["NeuralPredictor", "TokenInputs", "prompt_neighbours", "token_inputs"]

GROUPS = 4  # own, prev, prev2, same-token: (L, k) id groups
REC_DECAY = 0.7  # per token: the recency count halves in about two tokens
# own layers compared with earlier tokens': the last known one, and the last six (chosen on a
# train split: 6 alone +0.0096 validation precision@6, adding 1 another +0.002)
NEAR_WINDOWS = (1, 6)
NEAR_BETA = 0.5  # attention logit per shared expert


@dataclass
class TokenInputs:
    """Token-level arrays from which every (token, target layer) input is gathered.

    ``own`` (N, L, k): the token's own experts where known (-1 elsewhere; the per-layer mask
    in :meth:`NeuralPredictor._batch` hides the rest anyway). ``prev``/``prev2``/``same``
    (N, L, k) earlier tokens. ``freq``/``rec`` (N, L, E) float16 prompt statistics of earlier
    tokens (only the target layer's row is used). ``tok`` (N,) token ids. ``near``: the
    neighbour features of :func:`prompt_neighbours` (None when the model does not use them)."""

    own: np.ndarray
    prev: np.ndarray
    prev2: np.ndarray
    same: np.ndarray
    freq: np.ndarray
    rec: np.ndarray
    tok: np.ndarray
    near: np.ndarray | None = None  # (N, L, 2E * windows) float16, see prompt_neighbours


def _prompt_stats(prev: np.ndarray, first: np.ndarray, e: int,
                  layers: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """(N, len(layers), E) in-prompt frequency and decayed recency of EARLIER tokens' uses,
    both computed from ``prev`` (token n-1's experts, -1 at a prompt start) only."""
    n = prev.shape[0]
    starts = np.flatnonzero(first)
    seg = np.cumsum(first) - 1
    pos = np.arange(n) - starts[seg]
    freq = np.zeros((n, len(layers), e), np.float16)
    rec = np.zeros((n, len(layers), e), np.float16)
    lengths = np.diff(np.append(starts, n))
    for c, layer in enumerate(layers):
        hot = _multi_hot(prev[:, layer], e).astype(np.float32)
        csum = np.cumsum(hot, axis=0)
        base = np.where(starts[seg][:, None] > 0, csum[np.maximum(starts[seg] - 1, 0)], 0.0)
        freq[:, c] = (csum - base) / np.maximum(pos, 1)[:, None]
        r = np.zeros((n, e), np.float32)
        # the recurrence runs over positions, vectorized over prompts (prompts are short)
        for p in range(int(lengths.max())):
            idx = starts[lengths > p] + p
            r[idx] = hot[idx] + (REC_DECAY * r[idx - 1] if p else 0.0)
        rec[:, c] = r
    return freq, rec


def prompt_neighbours(own: np.ndarray, prev: np.ndarray, first: np.ndarray, e: int,
                      layers: list[int], known: Callable[[int], int],
                      windows: tuple[int, ...] = NEAR_WINDOWS) -> np.ndarray:
    """(N, len(layers), 2E * len(windows)) float16: what EARLIER tokens of the prompt
    whose routing resembles this token's used at the target layer l.

    Why: tokens that agreed with this one on its last known layers tend to agree at layer l,
    and inside a prompt that agreement is specific to the context, which weights averaged
    over all training prompts cannot hold (alone, the attention average below with a window
    of 6 ranks the validation split's layers 1-25 at precision@6 0.56, co-occurrence from the
    last three layers 0.52). Similarity of token n and earlier token m, per window w: the
    number of shared experts at layers [K - w, K), K = ``known(l)`` (this token's known
    layers; none: zeros). Per window, 2E columns: the softmax(NEAR_BETA * similarity)-weighted
    average of the earlier tokens' layer-l multi-hot, then the best match's (latest among
    ties), scaled by its similarity / (k * window) (1 = all shared). ``own`` (N, L, k) this
    token's experts (only layers < K are read); ``prev`` (N, L, k) token n-1's experts (-1 at
    a prompt start): every earlier token's routing is read from ``prev`` rows <= n, so
    nothing after token n's known layers."""
    n, _, top_k = prev.shape
    starts = np.flatnonzero(first)
    ends = np.append(starts[1:], n)
    out = np.zeros((n, len(layers), 2 * e * len(windows)), np.float16)
    ks = [int(known(lay)) for lay in layers]
    deepest = max(windows)
    need = sorted({j for k in ks for j in range(max(0, k - deepest), k)} | set(layers))
    cur = {j: _multi_hot(own[:, j], e) for j in need if j < max(ks, default=0)}
    ear = {j: _multi_hot(prev[:, j], e) for j in need}
    for s, t in zip(starts, ends):
        if t - s < 2:
            continue
        # row a: token s+a; column b: earlier token s+b, whose routing is prev[s+b+1]
        seen = np.tri(t - s, t - s - 1, -1, dtype=bool)
        sims: dict[int, np.ndarray] = {}
        for c, (lay, k) in enumerate(zip(layers, ks)):
            if k == 0:
                continue
            for j in range(max(0, k - deepest), k):
                if j not in sims:
                    sims[j] = cur[j][s:t].astype(np.float32) @ ear[j][s + 1:t].T.astype(
                        np.float32)
            y = ear[lay][s + 1:t].astype(np.float32)
            for i, window in enumerate(windows):
                sim = np.zeros(seen.shape, np.float32)
                for j in range(max(0, k - window), k):
                    sim += sims[j]
                z = np.where(seen, NEAR_BETA * sim, -np.inf)
                zmax = z.max(1, keepdims=True)
                w = np.where(seen, np.exp(z - np.where(np.isfinite(zmax), zmax, 0.0)), 0.0)
                col = 2 * e * i
                out[s:t, c, col:col + e] = w @ y / np.maximum(w.sum(1, keepdims=True), 1e-12)
                best = np.where(seen, sim + 1e-3 * np.arange(t - s - 1), -1.0).argmax(1)
                scale = np.take_along_axis(sim, best[:, None], 1) * seen.any(1)[:, None]
                out[s:t, c, col + e:col + 2 * e] = y[best] * scale / (top_k * min(window, k))
    return out


def token_inputs(hist: History, own: np.ndarray, layers: list[int] | None = None,
                 known: Callable[[int], int] | None = None,
                 windows: tuple[int, ...] = NEAR_WINDOWS) -> TokenInputs:
    """The inputs of every token from a History (``own``: (N, known, k) known layers, padded
    here to all layers); ``layers``: the target layers whose prompt statistics are needed;
    ``known``: target layer -> this token's known layers, to add the neighbour features of
    ``windows`` (none when ``known`` is None or ``windows`` empty)."""
    n, nl, e = hist.num_tokens, hist.num_layers, hist.num_experts
    layers = list(range(nl)) if layers is None else layers
    k = hist.prev.shape[2]
    own_full = np.full((n, nl, k), -1, np.int64)
    own_full[:, : own.shape[1]] = own
    prev2 = hist.earlier(np.full(n, 2))
    same = hist.earlier(np.minimum(hist.same_token_back(), n + 1))
    freq_l, rec_l = _prompt_stats(hist.prev, hist.first, e, layers)
    freq = np.zeros((n, nl, e), np.float16)
    rec = np.zeros((n, nl, e), np.float16)
    freq[:, layers], rec[:, layers] = freq_l, rec_l
    near = None
    if known is not None and windows:
        near = np.zeros((n, nl, 2 * e * len(windows)), np.float16)
        near[:, layers] = prompt_neighbours(own_full, hist.prev, hist.first, e, layers, known,
                                            windows)
    return TokenInputs(own_full, np.asarray(hist.prev), prev2, same, freq, rec,
                       hist.token_ids.astype(np.int64), near)


class NeuralPredictor(Predictor):
    """Learned predictor; see the module docstring. ``fit`` trains, ``scores`` predicts."""

    name = "neural"
    near_windows: tuple[int, ...] = ()  # the default of fits pickled before the neighbours

    def __init__(self, lookahead: int = 1, dim: int = 128, hidden: int = 256,
                 epochs: int = 2, batch: int = 256, lr: float = 3e-3, min_count: int = 2,
                 seed: int = 0, max_pairs: int | None = None, threads: int = 1,
                 near_windows: tuple[int, ...] = NEAR_WINDOWS) -> None:
        self.lookahead = int(lookahead)
        self.near_windows = tuple(near_windows)  # prompt_neighbours windows; () = none
        self.dim, self.hidden, self.epochs = int(dim), int(hidden), int(epochs)
        self.batch, self.lr, self.min_count = int(batch), float(lr), int(min_count)
        self.seed = int(seed)
        self.threads = int(threads)
        self.max_pairs = max_pairs  # cap on (token, layer) training pairs (tests, quick runs)
        self.net = None

    # --- inputs -------------------------------------------------------------------------
    def _known(self, layer: np.ndarray) -> np.ndarray:
        """How many of a token's own layers are known when layer ``layer`` is predicted."""
        return np.maximum(0, layer - self.lookahead + 1)

    def _batch(self, x: TokenInputs, n: np.ndarray, layer: int):
        """(features (B, F), tok (B,)) torch tensors for tokens ``n`` at one target layer:
        the id groups as multi-hot and the prompt statistics as values. Dense inputs with
        one target layer per batch: a sparse bag over ~750 ids per pair made the backward
        and the sparse optimizer step 10x slower than this matmul."""
        import torch

        nl, e = self.num_layers, self.num_experts
        le = nl * e
        f = self.num_features
        j = np.arange(nl)[None, :, None]
        feats = np.zeros((len(n), f + 1), np.float32)
        for g, arr in enumerate((x.own, x.prev, x.prev2, x.same)):
            a = arr[n].astype(np.int64)  # (B, L, k)
            ok = a >= 0
            if g == 0:
                ok &= j < self._known(layer)
            ids = np.where(ok, g * le + j * e + a, f).reshape(len(n), -1)
            np.put_along_axis(feats, ids, 1.0, axis=1)
        feats[:, GROUPS * le:GROUPS * le + e] = x.freq[n, layer]
        feats[:, GROUPS * le + e:GROUPS * le + 2 * e] = x.rec[n, layer]
        if self.near_windows:
            feats[:, GROUPS * le + 2 * e:f] = x.near[n, layer]
        tok = np.where(x.tok < len(self.tok_map), self.tok_map[np.minimum(
            x.tok, len(self.tok_map) - 1)], 0)[n]
        return torch.from_numpy(feats[:, :f]), torch.from_numpy(tok)

    def _make_net(self, vocab: int):
        import torch
        from torch import nn

        nl, e, f, d, h = self.num_layers, self.num_experts, self.num_features, self.dim, \
            self.hidden

        class Net(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                # per target layer: (F, D + E) = the deep embedding and the wide logits;
                # separate tensors so a one-layer batch leaves the others' grads None
                self.inp = nn.ParameterList(
                    [nn.Parameter(torch.randn(f, d + e) * 0.01) for _ in range(nl)])
                self.tok = nn.Embedding(vocab, d, sparse=True)
                nn.init.normal_(self.tok.weight, std=0.02)
                self.lay = nn.Embedding(nl, d)
                self.mlp = nn.Sequential(nn.ReLU(), nn.Linear(d, h), nn.ReLU())
                self.head = nn.ParameterList(
                    [nn.Parameter(torch.randn(h, e) * (1.0 / h) ** 0.5) for _ in range(nl)])
                self.bias = nn.Parameter(torch.zeros(nl, e))

            def forward(self, feats, tok, layer: int):
                z = feats @ self.inp[layer]
                deep = z[:, :d] + self.tok(tok) + self.lay.weight[layer]
                return self.mlp(deep) @ self.head[layer] + z[:, d:] + self.bias[layer]

        return Net()

    # --- training -----------------------------------------------------------------------
    def _inputs(self, hist: History, own: np.ndarray, layers: list[int] | None = None
                ) -> TokenInputs:
        known = (lambda layer: int(self._known(layer))) if self.near_windows else None
        return token_inputs(hist, own, layers, known, self.near_windows)

    def _train_inputs(self, train: Trace) -> TokenInputs:
        return self._inputs(History(train, train.num_layers - 1, 1),
                            train.experts.astype(np.int64))

    def _targets(self, train: Trace) -> np.ndarray:
        """(N, L, E) float targets: the token's own routing at each layer."""
        return train.multi_hot()

    def fit(self, train: Trace) -> NeuralPredictor:
        import torch

        threads = torch.get_num_threads()
        torch.set_num_threads(self.threads)  # a shared box: minutes on one core, by design
        try:
            return self._fit(train)
        finally:
            torch.set_num_threads(threads)

    def _fit(self, train: Trace) -> NeuralPredictor:
        import torch

        torch.manual_seed(self.seed)
        rng = np.random.default_rng(self.seed)
        self.num_layers, self.num_experts = train.num_layers, train.num_experts
        # id groups, freq + rec, and two neighbour blocks per window
        near = 2 * len(self.near_windows)
        self.num_features = (GROUPS * self.num_layers + 2 + near) * self.num_experts
        counts = np.bincount(train.token_ids)
        keep = counts >= self.min_count
        self.tok_map = np.where(keep, np.cumsum(keep), 0).astype(np.int64)  # 0 = rare/unseen
        x = self._train_inputs(train)
        y = self._targets(train)
        net = self._make_net(int(keep.sum()) + 1)
        opt_s = torch.optim.SparseAdam([net.tok.weight], lr=self.lr)
        opt_d = torch.optim.Adam([p for p in net.parameters() if p is not net.tok.weight],
                                 lr=self.lr)
        # batches of one target layer each, in a random order of (layer, chunk)
        per_layer = train.num_tokens
        if self.max_pairs is not None:
            per_layer = min(per_layer, max(1, self.max_pairs // self.num_layers))
        n_chunks = (per_layer + self.batch - 1) // self.batch
        steps = self.epochs * n_chunks * self.num_layers
        step = 0
        net.train()
        for _ in range(self.epochs):
            toks = [rng.permutation(train.num_tokens)[:per_layer]
                    for _ in range(self.num_layers)]
            plan = [(lay, c) for lay in range(self.num_layers) for c in range(n_chunks)]
            for i in rng.permutation(len(plan)):
                lay, c = plan[i]
                n = toks[lay][c * self.batch:(c + 1) * self.batch]
                feats, tok = self._batch(x, n, lay)
                target = torch.from_numpy(y[n, lay].astype(np.float32))
                # linear decay of the learning rate: the last passes refine, not jump
                for opt in (opt_s, opt_d):
                    for grp in opt.param_groups:
                        grp["lr"] = self.lr * (1.0 - step / steps)
                loss = torch.nn.functional.binary_cross_entropy_with_logits(
                    net(feats, tok, lay), target)
                opt_s.zero_grad()
                opt_d.zero_grad()
                loss.backward()
                opt_s.step()
                opt_d.step()
                step += 1
        net.eval()
        self.net = net
        return self

    # --- prediction ---------------------------------------------------------------------
    def _logits(self, x: TokenInputs, layer: int, chunk: int = 4096) -> np.ndarray:
        import torch

        n_tok = x.tok.shape[0]
        out = np.empty((n_tok, self.num_experts), np.float32)
        with torch.no_grad():
            for c0 in range(0, n_tok, chunk):
                n = np.arange(c0, min(n_tok, c0 + chunk))
                out[n] = self.net(*self._batch(x, n, layer), layer).numpy()
        return out

    def scores(self, hist: History) -> np.ndarray:
        if self.net is None:
            raise RuntimeError("NeuralPredictor.scores before fit")
        x = self._inputs(hist, hist.own, [hist.layer])
        return self._logits(x, hist.layer)

    def __getstate__(self) -> dict:
        # pickled for the fit cache: torch modules pickle, but a state dict is smaller
        state = dict(self.__dict__)
        if self.net is not None:
            state["net"] = {k: v.clone() for k, v in self.net.state_dict().items()}
            state["_vocab"] = int(self.net.tok.weight.shape[0])
        return state

    def __setstate__(self, state: dict) -> None:
        net_state = state.pop("net")
        vocab = state.pop("_vocab", None)
        self.__dict__.update(state)
        self.net = None
        if net_state is not None:
            self.net = self._make_net(vocab)
            self.net.load_state_dict(net_state)
            self.net.eval()
