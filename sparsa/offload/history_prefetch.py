"""History prefetch in the engine: the trace lab's predictors, fit on a recorded trace, guess
the next MoE layer's experts from what the engine already knows.

``LLM(expert_memory=..., offload_prefetch="history" | "lookahead+history",
offload_predictor_trace="train.csv.gz")``. The trace is one recorded from this model
(``sparsa trace MODEL --out train.csv.gz`` or any run with ``--trace-experts``); the
predictors are the trace lab's own (`sparsa.offload.lab.predictors`), so the engine's guesses are
the ones `sparsa cache-sim --predictor history` measures. For each token the guess for layer
l + 1 combines, as naive Bayes log-likelihood ratios added to the layer's log prior:

- co-occurrence with this token's experts at layers l, l - 1, ... (known: they have run);
- the token id's affinity (how often this token used each expert at that layer in the trace);
- the transition from the previous token of the same sequence (its experts at l .. l + 2).

Unlike gate lookahead this needs no hidden state, so it can also guess layers further ahead;
it is trained on routing alone, so it knows nothing a trace did not show (a token never seen
falls back to the layer's prior). The engine calls :meth:`begin_step` with the batch's rows,
:meth:`observe` as each MoE layer routes, and :meth:`predict` for the next layer;
:meth:`end_step` keeps each sequence's last token for the transition term.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from sparsa.offload.lab.predictors import (
    CooccurrencePredictor,
    TokenAffinityPredictor,
    TransitionPredictor,
)
from sparsa.offload.lab.trace import Trace

__all__ = ["HistoryPrefetcher"]


class HistoryPrefetcher:
    """Online co-occurrence + token-affinity + transition predictor over a fitted trace.

    ``layers`` are the model's MoE layer numbers (its module indices, as the tracer writes
    them); the trace must have the same layers and expert count. ``token_text`` maps a list of
    the model's token ids to the trace's token column (the tokenizer's
    ``convert_ids_to_tokens``, as the tracer used); without it the id's text is the key.
    """

    def __init__(self, train: Trace, layers: Sequence[int], num_experts: int,
                 token_text: Callable[[list[int]], Sequence[Any]] | None = None,
                 depth: int = 3, alpha: float = 4.0):
        if list(train.layers) != list(layers):
            raise ValueError(f"predictor trace has MoE layers {train.layers}, the model "
                             f"{list(layers)}: record the trace from this model")
        if train.num_experts != num_experts:
            raise ValueError(f"predictor trace has {train.num_experts} experts per layer, "
                             f"the model {num_experts}")
        self.layers = list(layers)
        self.index = {layer: j for j, layer in enumerate(self.layers)}
        self.num_experts = num_experts
        self.vocab = train.vocab
        self.token_text = token_text
        self.k = train.top_k  # width of the kept rows (-1 padded)
        self.cooc = CooccurrencePredictor(depth).fit(train)
        self.affinity = TokenAffinityPredictor(alpha).fit(train)
        self.transition = TransitionPredictor().fit(train)
        self.log_prior = np.log(self.cooc.prior).astype(np.float32)  # (L, E)
        # The log-likelihood tables with a zero row appended for the -1 padding, built once:
        # scores() runs per MoE layer per step. target layer -> [(known layer j, table)]
        pad = np.zeros((1, num_experts), np.float32)
        self._cooc: dict[int, list[tuple[int, np.ndarray, np.ndarray]]] = {}
        for (j, tgt), w in self.cooc.w.items():
            self._cooc.setdefault(tgt, []).append((j, np.vstack([w, pad]),
                                                   self.cooc.w0[j, tgt]))
        self._trans: dict[int, list[tuple[int, np.ndarray]]] = {}
        for (j, tgt), w in self.transition.w.items():
            self._trans.setdefault(tgt, []).append((j, np.vstack([w, pad])))
        self._tid: dict[int, int] = {}  # model token id -> trace token id (-1: unseen)
        self._last: dict[Any, np.ndarray] = {}  # sequence -> (L, k) its last token's experts
        self._rows: list[tuple[Any, int]] = []  # (sequence, is its last row) per flat row
        self._tokens = np.zeros(0, dtype=np.int64)
        self._prev = np.zeros((0, len(self.layers), 1), dtype=np.int64)
        self._own: list[np.ndarray | None] = [None] * len(self.layers)

    # ---- the step protocol (the model runner's) ---------------------------------------
    def begin_step(self, segments: Sequence[tuple[Any, int]], token_ids: Sequence[int],
                   positions: Sequence[int] | None = None) -> None:
        """``segments``: (sequence, number of its rows) in the flat order of ``token_ids``."""
        self._tokens = self._trace_ids([int(t) for t in token_ids])
        prev = np.full((len(self._tokens), len(self.layers), self.k), -1, dtype=np.int64)
        rows: list[tuple[Any, int]] = []
        r = 0
        for seq, n in segments:
            key = getattr(seq, "seq_id", id(seq))
            last = self._last.get(key)
            if last is not None and n:
                prev[r, :, : last.shape[1]] = last  # only the first row: the others' previous
            rows.extend((key, int(i == n - 1)) for i in range(n))  # token is in this batch
            r += n
        self._rows = rows
        self._prev = prev
        self._own = [None] * len(self.layers)

    def end_step(self) -> None:
        if any(o is None for o in self._own) or not self._rows:
            self._own = [None] * len(self.layers)
            return
        own = np.stack(self._own, axis=1)  # (T, L, k)
        for i, (key, is_last) in enumerate(self._rows):
            if is_last:
                self._last[key] = own[i]
        if len(self._last) > 4096:  # finished sequences: keep the newest only
            for key in list(self._last)[: len(self._last) - 4096]:
                del self._last[key]
        self._own = [None] * len(self.layers)

    def abandon_step(self) -> None:
        self._own = [None] * len(self.layers)

    # ---- per layer ----------------------------------------------------------------------
    def observe(self, layer: int, topk_ids: torch.Tensor) -> None:
        j = self.index.get(layer)
        if j is None or topk_ids.shape[0] != len(self._tokens):
            return
        ids = topk_ids.detach().to("cpu", torch.int64).numpy()
        pad = np.full((ids.shape[0], self.k), -1, dtype=np.int64)
        w = min(ids.shape[1], self.k)
        pad[:, :w] = ids[:, :w]
        self._own[j] = pad

    def scores(self, layer: int) -> np.ndarray | None:
        """(T, E) log-odds for ``layer`` of each row of the open step, from the layers
        observed so far; None when the step's rows are unknown."""
        tgt = self.index.get(layer)
        if tgt is None or not len(self._tokens):
            return None
        e = self.num_experts
        s = np.broadcast_to(self.log_prior[tgt], (len(self._tokens), e)).copy()
        for j, w, w0 in self._cooc.get(tgt, ()):
            ids = self._own[j]
            if ids is not None:
                s += w[np.where(ids < 0, e, ids)].sum(1) + w0
        tid = self._tokens
        seen = tid >= 0
        if seen.any():
            t = np.where(seen, tid, 0)
            c = self.affinity.counts[t, tgt * e:(tgt + 1) * e] * seen[:, None]
            n = self.affinity.n[t] * seen
            a = self.affinity.alpha
            p = (c + a * self.affinity.prior[tgt][None]) / (n + a)[:, None]
            s += np.log(p) - self.log_prior[tgt]
        for j, w in self._trans.get(tgt, ()):
            ids = self._prev[:, j]
            s += w[np.where(ids < 0, e, ids)].sum(1)
        return s

    def predict(self, layer: int, per_row: int) -> list[int]:
        """The union over the step's rows of each row's ``per_row`` best experts at
        ``layer`` (sorted ids); empty when nothing can be said."""
        s = self.scores(layer)
        if s is None or per_row < 1:
            return []
        m = min(per_row, s.shape[1])
        top = np.argpartition(-s, m - 1, axis=1)[:, :m]
        return sorted(set(top.reshape(-1).tolist()))

    # ---- helpers ------------------------------------------------------------------------
    def _trace_ids(self, ids: list[int]) -> np.ndarray:
        new = sorted({i for i in ids if i not in self._tid})
        if new:
            texts: Sequence[Any] = [str(i) for i in new]
            if self.token_text is not None:
                try:
                    texts = list(self.token_text(new))
                except Exception:  # a tokenizer smaller than the model's vocabulary
                    texts = [str(i) for i in new]
            for i, t in zip(new, texts):
                tid = self.vocab.get(str(t) if t is not None else str(i), -1)
                self._tid[i] = tid if tid < len(self.affinity.n) else -1
        return np.asarray([self._tid[i] for i in ids], dtype=np.int64)
