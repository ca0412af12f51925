"""Replay a routing trace through an expert cache: hit rate, prefetch quality, bytes, stalls.

Replay order is batch-1 decode: each prompt's tokens in order, each token through the MoE
layers in order. A request is a hit only if the expert is resident when its layer runs.
Prefetched experts are loaded into the same capacity as demand-loaded ones (they evict by
the policy's priority), so a wrong prediction costs a slot and bandwidth.

Capacity is either per layer (``per_layer=True``: each layer holds ``capacity`` of its
experts; layers are independent, so all layers of a token advance together, vectorized) or
global (one pool of ``capacity`` (layer, expert) slots shared by all layers, replayed one
(token, layer) step at a time).

Prefetch lists come from a predictor (:mod:`sparsa.offload.lab.predictors`) before the replay:
predictions depend only on the trace, never on cache state, so they are computed in one
vectorized pass; ``prefetch[n, j]`` are the ranked experts to load for token n's layer j.
They are inserted just before layer j runs; when they were *issued* (``lookahead`` layers
earlier) only matters to the timing model, :func:`stall_model`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from sparsa.offload.lab.trace import Trace
from sparsa.offload.policies import CachePolicy, Stream

__all__ = ["BandwidthModel", "SimResult", "build_stream", "simulate", "stall_model"]

# DeepSeek-V2-Lite's routed expert: gate, up and down projections 2048 x 1408, bf16.
DSV2_LITE_EXPERT_BYTES = 3 * 2048 * 1408 * 2


@dataclass
class BandwidthModel:
    """One load channel of ``bandwidth`` bytes/s moving whole experts, FIFO; a layer computes
    for ``compute_s`` once all its experts are resident. Defaults: NVMe-class reads of
    DeepSeek-V2-Lite's bf16 experts and a CPU layer time (both assumptions: set them)."""

    expert_bytes: float = DSV2_LITE_EXPERT_BYTES
    bandwidth: float = 3.0e9
    compute_s: float = 5e-3


@dataclass
class SimResult:
    policy: str
    capacity: int
    per_layer: bool
    prefetch: int
    requests: int
    hits: int
    hit_rate: float
    demand_loads: int
    prefetch_loads: int
    prefetch_loads_used: int
    predicted: int
    predicted_correct: int
    prefetch_precision: float  # of the predicted (ranked list) experts, the share requested
    prefetch_recall: float  # of the requested experts, the share that was predicted
    bytes_loaded: float
    stall_s_per_token: float
    compute_s_per_token: float
    replay_seconds: float

    def as_dict(self) -> dict:
        return asdict(self)


def build_stream(trace: Trace, per_layer: bool) -> Stream:
    """The request stream of ``trace`` in replay order, in the policy's slot layout."""
    n, nl, k = trace.experts.shape
    e = trace.num_experts
    ex = trace.experts.astype(np.int64)
    first = np.zeros(n, dtype=bool)
    first[trace.prompt_starts()] = True
    if per_layer:
        return Stream(ex, np.arange(n), first, np.zeros(e, dtype=np.int64), np.arange(e),
                      nl, e)
    slots = np.where(ex < 0, -1, ex + (np.arange(nl) * e)[None, :, None])
    starts = np.zeros((n, nl), dtype=bool)
    starts[:, 0] = first
    return Stream(slots.reshape(n * nl, 1, k), np.repeat(np.arange(n), nl), starts.reshape(-1),
                  np.repeat(np.arange(nl), e), np.tile(np.arange(e), nl), nl, e)


def _prefetch_stream(prefetch: np.ndarray, num_experts: int, per_layer: bool) -> np.ndarray:
    pf = prefetch.astype(np.int64)
    if per_layer:
        return pf
    n, nl, m = pf.shape
    slots = np.where(pf < 0, -1, pf + (np.arange(nl) * num_experts)[None, :, None])
    return slots.reshape(n * nl, 1, m)


def _lowest(prio: np.ndarray, cand: np.ndarray, n: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """(G, S) mask of the n[g] candidates with the lowest priority in each group.

    A partial partition (O(S)) then a sort of the few taken: global pools have S = L * E
    slots and evict a handful per step, where a full sort per step dominated the replay."""
    pm = np.where(cand, prio, np.inf)
    nmax = int(n.max())
    if nmax < pm.shape[1]:
        part = np.argpartition(pm, nmax - 1, axis=1)[:, :nmax]
    else:
        part = np.broadcast_to(np.arange(pm.shape[1]), pm.shape)
    order = np.argsort(np.take_along_axis(pm, part, axis=1), axis=1, kind="stable")
    part = np.take_along_axis(part, order, axis=1)
    out = np.zeros_like(cand)
    out[rows, part] = np.arange(part.shape[1])[None, :] < n[:, None]
    return out


def _masks(idx: np.ndarray, s: int) -> np.ndarray:
    """(..., G, k) slot ids (-1 = none) -> (..., G, s) bool."""
    flat = np.zeros(idx.shape[:-1] + (s + 1,), dtype=bool)
    np.put_along_axis(flat, np.where(idx < 0, s, idx), True, axis=-1)
    return flat[..., :s]


def simulate(trace: Trace, policy: CachePolicy, capacity: int | Sequence[int],
             per_layer: bool = True, prefetch: np.ndarray | None = None,
             bandwidth: BandwidthModel | None = None, lookahead: int = 1
             ) -> list[SimResult]:
    """Replay ``trace`` through ``policy`` at each capacity (slots per layer, or in all).

    Capacities are independent caches replayed side by side (extra groups), so a sweep
    costs little more than one run. ``prefetch``: optional (N, L, m) ranked expert ids
    (-1 = none) to load before each (token, layer) runs; at most ``capacity`` are used.
    """
    t0 = time.perf_counter()
    caps = [int(capacity)] if np.isscalar(capacity) else [int(c) for c in capacity]
    base = build_stream(trace, per_layer)
    g0, s = base.shape
    if min(caps) < trace.top_k:
        raise ValueError(f"capacity {min(caps)} is below the routing top-k {trace.top_k}")
    caps = [min(c, s) for c in caps]
    nc = len(caps)
    stream = Stream(np.tile(base.requests, (1, nc, 1)), base.step_token, base.prompt_start,
                    base.slot_layer, base.slot_expert, base.num_layers, base.num_experts,
                    capacity=np.repeat(caps, g0))
    g = g0 * nc
    cap = stream.capacity
    pf = None
    if prefetch is not None:
        if prefetch.shape[:2] != trace.experts.shape[:2]:
            raise ValueError("prefetch must be (tokens, layers, m)")
        pf = _prefetch_stream(prefetch, trace.num_experts, per_layer)
        # each capacity copy uses at most `capacity` of the ranked list
        keep = np.arange(pf.shape[2])[None, :] < cap[:, None]  # (g, m)
        pf = np.where(keep[None], np.tile(pf, (1, nc, 1)), -1)
    policy.begin(stream)
    req_all = stream.requests
    steps = req_all.shape[0]
    resident = np.zeros((g, s), dtype=bool)
    count = np.zeros(g, dtype=np.int64)
    pending = np.zeros((g, s), dtype=bool)  # prefetched and not yet requested
    rows = np.arange(g)[:, None]
    pf_loads = np.zeros((steps, g), dtype=np.int32)
    dm_loads = np.zeros((steps, g), dtype=np.int32)
    hits = np.zeros(g, dtype=np.int64)
    pf_used = np.zeros(g, dtype=np.int64)
    predicted = np.zeros(g, dtype=np.int64)
    correct = np.zeros(g, dtype=np.int64)

    def make_room(t: int, protect: np.ndarray, n_new: np.ndarray,
                  count: np.ndarray) -> np.ndarray:
        """Evict the policy's lowest-priority unprotected slots so n_new more fit; returns
        the resident count left (resident/pending are updated in place)."""
        n_evict = count + n_new - cap
        if not (n_evict > 0).any():
            return count
        victims = _lowest(policy.priority(t), resident & ~protect, np.maximum(n_evict, 0),
                          rows)
        resident[victims] = False
        pending[victims] = False
        policy.evicted(t, victims)
        return np.minimum(count, cap - n_new)

    # request masks in chunks: whole-trace masks would take T*G*S bytes
    chunk = max(1, 2**24 // max(g * s, 1))
    for c0 in range(0, steps, chunk):
        rmasks = _masks(req_all[c0:c0 + chunk], s)
        pmasks = _masks(pf[c0:c0 + chunk], s) if pf is not None else None
        for i in range(rmasks.shape[0]):
            t = c0 + i
            rmask = rmasks[i]
            if pmasks is not None:
                pmask = pmasks[i]
                predicted += pmask.sum(1)
                correct += (pmask & rmask).sum(1)
                new = pmask & ~resident
                n_new = new.sum(1)
                count = make_room(t, pmask, n_new, count)
                resident |= new
                pending |= new
                count += n_new
                pf_loads[t] = n_new
                policy.inserted(t, new, True)
            hit_m = rmask & resident
            hits += hit_m.sum(1)
            pf_used += (pending & rmask).sum(1)
            pending &= ~rmask
            miss = rmask & ~resident
            n_miss = miss.sum(1)
            # observe first: the current request is known when its misses evict
            policy.observe(t, req_all[t], hit_m[rows, np.maximum(req_all[t], 0)], rmask)
            count = make_room(t, rmask, n_miss, count)
            resident |= miss
            count += n_miss
            dm_loads[t] = n_miss
            if n_miss.any():
                policy.inserted(t, miss, False)
    if (resident.sum(1) > cap).any() or (resident.sum(1) != count).any():
        raise AssertionError("cache accounting broken: capacity exceeded")
    bw = bandwidth or BandwidthModel()
    n_tok, nl = trace.experts.shape[:2]
    seconds = time.perf_counter() - t0
    out = []
    for ci, c in enumerate(caps):
        sl = slice(ci * g0, (ci + 1) * g0)
        # per-layer: steps are tokens and groups layers; global: steps are (token, layer)
        pfl = pf_loads[:, sl].reshape(n_tok, nl)
        dml = dm_loads[:, sl].reshape(n_tok, nl)
        stall = stall_model(pfl, dml, bw, lookahead if pf is not None else 0)
        req_total = int((req_all[:, sl] >= 0).sum())
        n_pred, n_corr = int(predicted[sl].sum()), int(correct[sl].sum())
        total_pf, total_dm = int(pfl.sum()), int(dml.sum())
        out.append(SimResult(
            policy=policy.name, capacity=c, per_layer=per_layer,
            prefetch=0 if pf is None else int(prefetch.shape[2]), requests=req_total,
            hits=int(hits[sl].sum()), hit_rate=int(hits[sl].sum()) / max(req_total, 1),
            demand_loads=total_dm, prefetch_loads=total_pf,
            prefetch_loads_used=int(pf_used[sl].sum()), predicted=n_pred,
            predicted_correct=n_corr,
            prefetch_precision=n_corr / n_pred if n_pred else 0.0,
            prefetch_recall=n_corr / req_total if n_pred else 0.0,
            bytes_loaded=(total_pf + total_dm) * bw.expert_bytes,
            stall_s_per_token=stall / max(n_tok, 1), compute_s_per_token=nl * bw.compute_s,
            replay_seconds=seconds))
    return out


def stall_model(pf_loads: np.ndarray, dm_loads: np.ndarray, bw: BandwidthModel,
                lookahead: int) -> float:
    """Total seconds layers wait for experts, from per-(token, layer) load counts.

    One FIFO load channel. At a token's start the prefetches for layers 0..lookahead-1 are
    queued (the token id is known then). When layer j is reached (the previous layer is done
    and layer j's router has chosen), its misses are queued, then the prefetch for layer
    j+lookahead (made from routing known by now); layer j computes once its misses and its
    prefetched experts have arrived. Misses wait behind earlier prefetches, as on a real
    channel that cannot recall a read already issued.
    """
    x = bw.expert_bytes / bw.bandwidth
    c = bw.compute_s
    n, nl = dm_loads.shape
    pf = pf_loads.tolist()
    dm = dm_loads.tolist()
    d = max(int(lookahead), 1)
    now = io_free = stall = 0.0
    for t in range(n):
        pf_t, dm_t = pf[t], dm[t]
        ready = [0.0] * nl
        for j in range(min(d, nl)):
            if pf_t[j]:
                io_free = max(io_free, now) + pf_t[j] * x
                ready[j] = io_free
        for j in range(nl):
            start = max(now, ready[j])
            if dm_t[j]:
                io_free = max(io_free, now) + dm_t[j] * x
                start = max(start, io_free)
            nxt = j + d
            if nxt < nl and pf_t[nxt]:
                io_free = max(io_free, now) + pf_t[nxt] * x
                ready[nxt] = io_free
            stall += start - now
            now = start + c
    return stall
