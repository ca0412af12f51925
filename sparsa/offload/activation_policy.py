"""MoE-Infinity's activation-aware eviction policy (Xue et al., 2024): a request's expert
activation matrix, matched against matrices recorded on a training trace, predicts which
experts the rest of the request will use. Used by the trace lab (`sparsa cache-sim --policy
activation`) and by the engine's expert cache (`offload_policy="activation"`)."""

from __future__ import annotations

import itertools

import numpy as np

from sparsa.offload.policy_base import CachePolicy, Stream, scatter_mask

__all__ = ["ActivationAware", "activation_library"]


class ActivationAware(CachePolicy):
    """MoE-Infinity's activation-aware priority: the current request's expert activation
    matrix (EAM, layers x experts counts so far) is matched by cosine similarity against EAMs
    recorded on the training trace (``library``), and a slot's priority is the matched EAM's
    activation ratio blended with the request's own counts; recency breaks ties."""

    name = "activation"

    def __init__(self, library: np.ndarray, own_weight: float = 1.0,
                 rematch_every: int = 4) -> None:
        lib = np.asarray(library, dtype=np.float64)  # (P, L, E) per-prompt counts
        self.library = lib.reshape(len(lib), -1)
        self.lib_unit = self.library / np.maximum(
            np.linalg.norm(self.library, axis=1, keepdims=True), 1e-9)
        self.lib_ratio = self.library / np.maximum(
            self.library.reshape(len(lib), lib.shape[1], -1).sum(2).repeat(lib.shape[2], 1),
            1e-9)
        self.own_weight = float(own_weight)
        self.rematch_every = int(rematch_every)

    def begin(self, stream: Stream) -> None:
        super().begin(stream)
        le = stream.num_layers * stream.num_experts
        self.flat_slot = stream.slot_layer * stream.num_experts + stream.slot_expert
        self.eam = np.zeros(le)
        self.match = self.lib_ratio.mean(0)  # before any evidence: the average request
        self.last = np.full((self.G, self.S), -1.0)
        self._since = 0
        self._prio = None

    def _rematch(self) -> None:
        norm = np.linalg.norm(self.eam)
        if norm > 0:
            best = int(np.argmax(self.lib_unit @ (self.eam / norm)))
            self.match = self.lib_ratio[best]
        self._prio = None

    def priority(self, t: int) -> np.ndarray:
        if self._prio is None:
            per_layer = self.eam.reshape(self.stream.num_layers, -1)
            own = per_layer / np.maximum(per_layer.sum(1, keepdims=True), 1.0)
            score = self.match + self.own_weight * own.reshape(-1)
            self._prio = score[self.flat_slot][None, :].repeat(self.G, 0)
        return self._prio + self.last * 1e-9

    def new_request(self) -> None:
        """A new request begins: its EAM starts empty and is matched at its first request.
        (The replay marks these in `Stream.prompt_start`; the engine calls this.)"""
        self.eam[:] = 0.0
        self._since = self.rematch_every

    def observe(self, t: int, req: np.ndarray, hit: np.ndarray,
                mask: np.ndarray | None = None) -> None:
        if t < len(self.stream.prompt_start) and self.stream.prompt_start[t]:
            self.new_request()
        m = scatter_mask((self.G, self.S), req) if mask is None else mask
        self.last[m] = t
        flat = self.flat_slot[np.nonzero(m)[1]]
        np.add.at(self.eam, flat, 1.0)
        self._since += 1
        if self._since >= self.rematch_every:
            self._since = 0
            self._rematch()
        else:
            self._prio = None


def activation_library(train) -> np.ndarray:
    """Per-prompt expert activation matrices (P, layers, experts counts) of a `Trace`: the
    library ActivationAware matches requests against."""
    starts = np.append(train.prompt_starts(), train.num_tokens)
    hot = train.multi_hot().astype(np.float32)
    return np.stack([hot[a:b].sum(0) for a, b in itertools.pairwise(starts)])
