"""Expert cache eviction policies behind one interface.

The simulator (:mod:`sparsa.offload.lab.cache_sim`) owns residency; a policy only ranks. The cache
is split into ``G`` groups of ``S`` slots (per-layer capacity: one group per layer, a slot per
expert; global capacity: one group whose slots are all (layer, expert) pairs). At each step the
simulator asks :meth:`CachePolicy.priority` for a (G, S) array and evicts the resident,
unprotected slots with the LOWEST priority, then reports what happened through
:meth:`CachePolicy.observe` (demand requests) and :meth:`CachePolicy.inserted` (loads). A
priority interface keeps every policy vectorized over groups, which is what makes a full
replay take seconds instead of minutes.

Policies see only the past, except :class:`Belady`, the offline optimum, which is given the
future through :meth:`CachePolicy.begin` on purpose: it is the bound, not a usable policy.
"""

from __future__ import annotations

import numpy as np

from sparsa.offload.policy_base import CachePolicy, Stream, scatter_mask

__all__ = [
    "ARC",
    "LFU",
    "LRFU",
    "LRU",
    "Belady",
    "CachePolicy",
    "LearnedRF",
    "Stream",
    "make_policy",
]


class LRU(CachePolicy):
    """Least recently used: evict the slot whose last use (request or load) is oldest."""

    name = "lru"

    def begin(self, stream: Stream) -> None:
        super().begin(stream)
        self.last = np.full((self.G, self.S), -1.0)

    def priority(self, t: int) -> np.ndarray:
        return self.last

    def observe(self, t: int, req: np.ndarray, hit: np.ndarray,
                mask: np.ndarray | None = None) -> None:
        self.last[scatter_mask((self.G, self.S), req) if mask is None else mask] = t

    def inserted(self, t: int, mask: np.ndarray, prefetched: bool) -> None:
        self.last[mask] = t


class LFU(CachePolicy):
    """Least frequently used (counts over the whole replay, kept across evictions, which is
    better than per-residency counts for the stable popularity of experts); ties go to the
    least recently used."""

    name = "lfu"

    def begin(self, stream: Stream) -> None:
        super().begin(stream)
        self.count = np.zeros((self.G, self.S))
        self.last = np.full((self.G, self.S), -1.0)

    def priority(self, t: int) -> np.ndarray:
        # recency only breaks ties: it is scaled below one count
        return self.count + self.last / (t + 2.0) * 0.5

    def observe(self, t: int, req: np.ndarray, hit: np.ndarray,
                mask: np.ndarray | None = None) -> None:
        m = scatter_mask((self.G, self.S), req) if mask is None else mask
        self.count[m] += 1
        self.last[m] = t


class LRFU(CachePolicy):
    """Least recently/frequently used (Lee et al., 2001), the learned recency+frequency family:
    each slot's combined recency-frequency value is a sum over its past uses of
    ``2 ** (-decay * age)``. ``decay`` -> 0 is LFU, large ``decay`` is LRU; the simulator's
    ``tune`` helper picks it on the training trace. Kept as log-CRF for numerical range."""

    name = "lrfu"

    def __init__(self, decay: float = 0.05) -> None:
        self.decay = float(decay)

    def begin(self, stream: Stream) -> None:
        super().begin(stream)
        # log2 CRF at reference time 0: value(t) = crf * 2**(-decay*t), so rank by crf alone
        self.log_crf = np.full((self.G, self.S), -np.inf)

    def priority(self, t: int) -> np.ndarray:
        return self.log_crf

    def observe(self, t: int, req: np.ndarray, hit: np.ndarray,
                mask: np.ndarray | None = None) -> None:
        m = scatter_mask((self.G, self.S), req) if mask is None else mask
        # add 2**(decay*t) (the use's weight referred to time 0) in log space
        self.log_crf[m] = np.logaddexp2(self.log_crf[m], self.decay * t)


class ARC(CachePolicy):
    """Adaptive replacement cache (Megiddo and Modha, 2003) per group: T1 holds slots used
    once since they entered, T2 slots used again; ghost lists B1/B2 remember recent evictions
    from each, and a hit in a ghost list moves the target size ``p`` of T1. The victim is the
    LRU slot of T1 when |T1| > p, else the LRU slot of T2, expressed as a priority."""

    name = "arc"

    def begin(self, stream: Stream) -> None:
        super().begin(stream)
        g, s = self.G, self.S
        self.capacity = stream.capacity.astype(np.float64)
        self.last = np.full((g, s), -1.0)
        self.in_t2 = np.zeros((g, s), dtype=bool)
        self.resident = np.zeros((g, s), dtype=bool)
        self.ghost = np.zeros((g, s), dtype=np.int8)  # 1 = B1, 2 = B2
        self.ghost_time = np.full((g, s), -1.0)
        self.p = np.zeros(g)

    def priority(self, t: int) -> np.ndarray:
        t1 = self.resident & ~self.in_t2
        from_t1 = (t1.sum(1) > self.p) | ~(self.resident & self.in_t2).any(1)
        # the list not evicted from gets a large offset so the other list's LRU goes first
        shield = np.where(from_t1[:, None], self.in_t2, ~self.in_t2)
        return self.last + shield * 1e12

    def observe(self, t: int, req: np.ndarray, hit: np.ndarray,
                mask: np.ndarray | None = None) -> None:
        m = scatter_mask((self.G, self.S), req) if mask is None else mask
        hit_m = m & self.resident
        self.in_t2 |= hit_m  # a second use promotes to the frequency list
        self.last[m] = t

    def inserted(self, t: int, mask: np.ndarray, prefetched: bool) -> None:
        c = self.capacity
        b1 = (self.ghost == 1).sum(1)
        b2 = (self.ghost == 2).sum(1)
        in_b1 = (mask & (self.ghost == 1)).sum(1)
        in_b2 = (mask & (self.ghost == 2)).sum(1)
        # adaptation: a ghost hit in B1 says T1 was too small, in B2 that T2 was
        self.p = np.minimum(c, self.p + in_b1 * np.maximum(1.0, b2 / np.maximum(b1, 1)))
        self.p = np.maximum(0.0, self.p - in_b2 * np.maximum(1.0, b1 / np.maximum(b2, 1)))
        self.in_t2[mask] = (self.ghost[mask] > 0) & (not prefetched)
        self.ghost[mask] = 0
        self.resident |= mask
        self.last[mask] = t

    def evicted(self, t: int, mask: np.ndarray) -> None:
        self.ghost[mask] = np.where(self.in_t2[mask], 2, 1)
        self.ghost_time[mask] = t
        self.resident &= ~mask
        self.in_t2 &= ~mask
        # each ghost list keeps only its `capacity` most recent entries (rank by age per row)
        for lst in (1, 2):
            gl = self.ghost == lst
            if not (gl.sum(1) > self.capacity).any():
                continue
            order = np.argsort(np.where(gl, -self.ghost_time, np.inf), axis=1, kind="stable")
            rank = np.empty_like(order)
            np.put_along_axis(rank, order, np.arange(self.S)[None, :].repeat(self.G, 0), axis=1)
            self.ghost[gl & (rank >= self.capacity[:, None])] = 0


class Belady(CachePolicy):
    """Belady's MIN: evict the slot whose next request is farthest in the future. Optimal for
    demand paging, so it is the bound for policies without prediction. Offline: it reads the
    whole request stream."""

    name = "belady"

    def begin(self, stream: Stream) -> None:
        super().begin(stream)
        req = stream.requests
        t_steps, g, _ = req.shape
        # next_req[t, g, i]: the next step after t at which slot req[t, g, i] is requested
        self.next_req = np.full(req.shape, np.iinfo(np.int64).max // 4, dtype=np.int64)
        upcoming = np.full((g, self.S + 1), np.iinfo(np.int64).max // 4, dtype=np.int64)
        rows = np.arange(g)[:, None]
        for t in range(t_steps - 1, -1, -1):
            r = np.where(req[t] < 0, self.S, req[t])
            self.next_req[t] = upcoming[rows, r]
            upcoming[rows, r] = t
        self.nxt = upcoming[:, : self.S].astype(np.float64)

    def priority(self, t: int) -> np.ndarray:
        return -self.nxt

    def observe(self, t: int, req: np.ndarray, hit: np.ndarray,
                mask: np.ndarray | None = None) -> None:
        ok = req >= 0
        g_idx = np.nonzero(ok)[0]
        self.nxt[g_idx, req[ok]] = self.next_req[t][ok]


class LearnedRF(CachePolicy):
    """Learned recency + frequency: priority is a linear score of recency-frequency values
    at three decays (fast ~ LRU, slow ~ LFU), the current request's own frequency (its
    activation matrix row) and the expert's prior popularity, with weights fit by least
    squares on the training trace to the discounted number of future uses (the quantity
    Belady ranks by, smoothed). Time is the token index, in per-layer and global mode."""

    name = "learned"
    DECAYS = (1.0, 0.25, 0.05)  # log2 decay per token

    def __init__(self, weights: np.ndarray, prior: np.ndarray) -> None:
        self.weights = np.asarray(weights, dtype=np.float64)  # (len(DECAYS) + 3,)
        self.prior = np.asarray(prior, dtype=np.float64)  # (L, E)

    @classmethod
    def fit(cls, experts: np.ndarray, prompt_start: np.ndarray, num_experts: int,
            horizon: int = 16, gamma: float = 0.8, every: int = 40) -> LearnedRF:
        """Fit on a training trace's (N, L, k) experts and (N,) prompt-start flags."""
        n, nl, _ = experts.shape
        hot = np.zeros((n, nl, num_experts + 1), dtype=np.float32)
        np.put_along_axis(hot, np.where(experts < 0, num_experts, experts), 1.0, axis=2)
        hot = hot[:, :, :num_experts]
        prior = (hot.sum(0) + 1.0) / (n + 2.0)
        # discounted future uses from token t+1, within the horizon, for every token
        fut = np.zeros_like(hot)
        for h in range(1, horizon + 1):
            fut[:-h] += gamma ** (h - 1) * hot[h:]
        crf = np.zeros((len(cls.DECAYS), nl, num_experts))
        count = np.zeros((nl, num_experts))
        n_in = 0
        xs, ys = [], []
        factors = np.exp2(-np.asarray(cls.DECAYS))[:, None, None]
        for t in range(n - horizon):
            if prompt_start[t]:
                count[:] = 0.0
                n_in = 0
            crf = crf * factors + hot[t][None]
            count += hot[t]
            n_in += 1
            if t % every == 0:
                free = hot[t] == 0  # the current request is never a candidate
                feats = np.concatenate([crf, (count / n_in)[None], np.log(prior)[None],
                                        np.ones((1, nl, num_experts))])
                xs.append(feats[:, free].T)
                ys.append(fut[t][free])
        x, y = np.concatenate(xs), np.concatenate(ys)
        w = np.linalg.lstsq(x, y, rcond=None)[0]
        return cls(w, prior)

    def begin(self, stream: Stream) -> None:
        super().begin(stream)
        g, s = self.G, self.S
        self.crf = np.zeros((len(self.DECAYS), g, s))
        self.last_token = -1
        self.count = np.zeros((g, s))
        self.n_in = 0
        self.log_prior = np.log(self.prior[stream.slot_layer, stream.slot_expert])[None, :]

    def _advance(self, token: int) -> None:
        if token != self.last_token:
            gap = token - self.last_token if self.last_token >= 0 else 0
            self.crf *= np.exp2(-np.asarray(self.DECAYS) * gap)[:, None, None]
            self.last_token = token
            self.n_in += 1

    def priority(self, t: int) -> np.ndarray:
        w = self.weights
        p = (self.crf * w[: len(self.DECAYS), None, None]).sum(0)
        return p + w[-3] * self.count / max(self.n_in, 1) + w[-2] * self.log_prior

    def observe(self, t: int, req: np.ndarray, hit: np.ndarray,
                mask: np.ndarray | None = None) -> None:
        if self.stream.prompt_start[t]:
            self.count[:] = 0.0
            self.n_in = 0
        self._advance(int(self.stream.step_token[t]))
        m = scatter_mask((self.G, self.S), req) if mask is None else mask
        self.crf[:, m] += 1.0
        self.count[m] += 1.0


def make_policy(name: str, capacity: int = 6, library: np.ndarray | None = None,
                lrfu_decay: float = 0.05) -> CachePolicy:
    """A policy by name: lru, lfu, lrfu, arc, activation (needs ``library``), belady."""
    if name == "lru":
        return LRU()
    if name == "lfu":
        return LFU()
    if name == "lrfu":
        return LRFU(lrfu_decay)
    if name == "arc":
        return ARC()
    if name == "belady":
        return Belady()
    if name == "activation":
        if library is None:
            raise ValueError("the activation policy needs a library of recorded EAMs")
        from sparsa.offload.activation_policy import ActivationAware

        return ActivationAware(library)
    raise ValueError(f"unknown policy {name!r} (lru, lfu, lrfu, arc, activation, belady)")
