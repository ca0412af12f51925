"""Experts that live on disk and a budgeted cache of compute-ready copies.

`ExpertReader` (sparsa.offload.expert_reader) fetches one expert's tensors from the
checkpoint with O_DIRECT, bypassing the OS page cache.

`ExpertCache` holds at most `budget_bytes` of expert weights in the compute dtype, accounted
per expert (bytes in flight count as soon as a load starts), with eviction ranked by any
`sparsa.offload.policies.CachePolicy` (one global group of layers x experts slots). With
`per_layer_capacity` each MoE layer has a share of the budget: a layer holding its share
evicts its own experts (the trace lab's per-layer mode), and one whose experts are all in use
(a prefill batch) borrows from layers over their share. Loads run
on background I/O threads; `acquire` waits for a load in flight or demand-loads a miss, or,
with `wait=False` (on_miss="low_precision" or "host"), starts the load and returns None at
once. With a `HostTier` (sparsa.offload.host_tier) loads go through it: from host memory
when it holds the expert, else from disk.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field

import numpy as np
import torch

from sparsa.offload.expert_reader import ExpertLocation, ExpertReader
from sparsa.offload.policies import CachePolicy, Stream, make_policy

__all__ = ["CacheStats", "ExpertCache", "ExpertLocation", "ExpertReader"]


@dataclass
class CacheStats:
    requests: int = 0
    hits: int = 0  # resident (or already loaded) when its layer asked for it
    # resident when its layer began, before the layer started loads of its own misses (the
    # trace lab's hit; `hits` also counts such a load that finished before the expert's turn)
    layer_start_hits: int = 0
    inflight_hits: int = 0  # started but not finished: the layer waited (or substituted)
    misses: int = 0  # nothing resident or in flight: demand load
    prefetches: int = 0
    useful_prefetches: int = 0
    evictions: int = 0
    bytes_loaded: int = 0
    peak_bytes: int = 0
    wait_seconds: float = 0.0
    # acquire(wait=False) found the expert not ready: computed with another copy (the
    # low-precision one, or the host tier's)
    substitutions: int = 0
    per_layer: dict = field(default_factory=dict)

    @property
    def hit_rate(self) -> float:
        return self.hits / self.requests if self.requests else 0.0

    @property
    def layer_start_hit_rate(self) -> float:
        return self.layer_start_hits / self.requests if self.requests else 0.0

    def as_dict(self) -> dict:
        d = {k: v for k, v in self.__dict__.items() if k != "per_layer"}
        d["hit_rate"] = self.hit_rate
        d["layer_start_hit_rate"] = self.layer_start_hit_rate
        return d


class _Entry:
    __slots__ = ("future", "pins", "prefetched", "used", "weights")

    def __init__(self, future: Future | None, prefetched: bool):
        self.future = future
        self.weights: tuple[torch.Tensor, ...] | None = None
        self.pins = 0
        self.prefetched = prefetched
        self.used = False


class ExpertCache:
    """Budgeted cache of (layer, expert) weights with background loads."""

    def __init__(self, reader: ExpertReader, num_layers: int, num_experts: int,
                 expert_bytes: int, budget_bytes: int, policy: str | CachePolicy = "lru",
                 io_threads: int = 2, clock: Callable[[], float] | None = None,
                 max_inflight: int | None = None, prefetch_evicts: str = "cold",
                 loader: Callable[[int, int], object] | None = None,
                 guess_when_idle: bool = False, per_layer_capacity: int = 0):
        """max_inflight: when set, `prefetch` and `acquire(wait=False)` start no load while
        that many are in flight (on_miss="low_precision" sets it to `io_threads`: a load
        queued behind busy I/O threads would only hold budget and arrive too late).
        prefetch_evicts: "cold" (default) lets a guessed prefetch evict only experts not used
        in this forward pass or the previous one (a guess never pushes out what the last
        token needed, which the next token often needs again); "any" lets the policy pick
        any victim. Neither lets a guess evict another guess for the same layer.
        guess_when_idle: a guessed prefetch starts only while an I/O thread is idle (fewer
        loads in flight than `io_threads`), so guesses use spare disk time and never queue
        ahead of the next layer's known needs when the disk is the bottleneck.
        loader: what a load calls, (layer, expert) -> weights (default `reader.load`; a
        `HostTier`'s load puts host memory in between).
        per_layer_capacity: 0 (one pool for every layer) or each layer's share of experts
        (at most `budget_bytes` together; see `_victims`)."""
        if prefetch_evicts not in ("cold", "any"):
            raise ValueError(f"prefetch_evicts must be 'cold' or 'any'; got {prefetch_evicts!r}")
        if budget_bytes < expert_bytes:
            raise ValueError(f"expert memory budget {budget_bytes} B holds no expert "
                             f"({expert_bytes} B each)")
        import time

        self.reader = reader
        self.loader = loader or reader.load
        self.L, self.E = num_layers, num_experts
        self.expert_bytes = expert_bytes
        self.budget_bytes = budget_bytes
        self.capacity = budget_bytes // expert_bytes
        if per_layer_capacity < 0 or per_layer_capacity > self.capacity:
            raise ValueError(f"per-layer capacity {per_layer_capacity} outside 0.."
                             f"{self.capacity} (the budget's experts)")
        self.per_layer_capacity = per_layer_capacity
        self._layer_n: dict[int, int] = {}  # entries per layer (held or loading)
        self._layer_peak: dict[int, int] = {}  # per-layer mode: most entries a layer held
        self.policy = make_policy(policy) if isinstance(policy, str) else policy
        S = num_layers * num_experts
        self.policy.begin(Stream(
            requests=np.zeros((0, 1, 1), dtype=np.int64), step_token=np.zeros(0, np.int64),
            prompt_start=np.zeros(0, bool), slot_layer=np.repeat(np.arange(num_layers),
                                                                   num_experts),
            slot_expert=np.tile(np.arange(num_experts), num_layers), num_layers=num_layers,
            num_experts=num_experts, capacity=np.array([self.capacity])))
        self._clock = clock or time.perf_counter
        self._entries: dict[tuple[int, int], _Entry] = {}
        self._lock = threading.RLock()
        self._pool = ThreadPoolExecutor(io_threads, thread_name_prefix="sparsa-expert-io")
        self._t = 0  # policy step: one per get()
        self.stats = CacheStats()
        self._S = S
        self.max_inflight = max_inflight
        self._loading = 0  # loads in flight
        self._loading_lock = threading.Lock()
        self.io_threads = io_threads
        self.guess_when_idle = guess_when_idle
        self.prefetch_evicts = prefetch_evicts
        # forward passes, counted by acquires going back to a lower layer or repeating a
        # key; the last pass that used each resident key
        self._pass = 0
        self._last_layer = -1
        self._last_use: dict[tuple[int, int], int] = {}

    # ---- accounting ---------------------------------------------------------------------

    @property
    def used_bytes(self) -> int:
        return len(self._entries) * self.expert_bytes

    @property
    def layer_peak(self) -> int:
        """Per-layer mode: the most experts any one layer has held, borrowed slots included
        (0 in global mode)."""
        return max(self._layer_peak.values(), default=0)

    def resident(self) -> set[tuple[int, int]]:
        with self._lock:
            return {k for k, e in self._entries.items() if e.weights is not None}

    def _slot(self, key: tuple[int, int]) -> int:
        return key[0] * self.E + key[1]

    def _mask(self, keys) -> np.ndarray:
        m = np.zeros((1, self._S), dtype=bool)
        for k in keys:
            m[0, self._slot(k)] = True
        return m

    def _observe(self, key: tuple[int, int], hit: bool) -> None:
        """One demand request at the current step. The (1, S) mask is passed along: each
        policy would rebuild it from the slot ids (np.put_along_axis, ~4 us a call)."""
        self.policy.observe(self._t, np.array([[self._slot(key)]]), np.array([[hit]]),
                            self._mask([key]))

    @staticmethod
    def _ready(entry: _Entry) -> bool:
        """Resident (a finished background load counts; a failed one is not)."""
        if entry.weights is None and entry.future is not None and entry.future.done() \
                and entry.future.exception() is None:
            entry.weights = entry.future.result()
        return entry.weights is not None

    def _inflight(self) -> int:
        """Loads started and not finished (a count kept by the loads' done callbacks, not a
        scan of every entry: guesses ask for each expert they would start). The count has
        its own lock: a callback never waits for the cache's, which a caller may hold while
        it waits for a load."""
        return self._loading

    def _load_done(self, _future: Future) -> None:
        with self._loading_lock:
            self._loading -= 1

    def _io_busy(self, guess: bool = False) -> bool:
        """max_inflight loads are in flight; for a guess with `guess_when_idle`, as many as
        there are I/O threads (lock held)."""
        limit = self.max_inflight
        if guess and self.guess_when_idle:
            limit = self.io_threads if limit is None else min(limit, self.io_threads)
        return limit is not None and self._inflight() >= limit

    def _add(self, key: tuple[int, int], entry: _Entry) -> None:
        self._entries[key] = entry
        n = self._layer_n[key[0]] = self._layer_n.get(key[0], 0) + 1
        if self.per_layer_capacity and n > self._layer_peak.get(key[0], 0):
            self._layer_peak[key[0]] = n

    def _drop(self, key: tuple[int, int]) -> None:
        if self._entries.pop(key, None) is not None:
            self._layer_n[key[0]] -= 1

    def _victims(self, victims: list, layer: int) -> list:
        """Per-layer shares: a layer holding its share evicts its own; one below it (a
        prefill batch needs more experts than the share, all in use) borrows, from layers
        over their share first, so the shares come back once the batch has passed."""
        share = self.per_layer_capacity
        n = self._layer_n
        own = [v for v in victims if v[1][0] == layer]
        if own and n.get(layer, 0) >= share:
            return own
        over = [v for v in victims if n.get(v[1][0], 0) > share]
        return over or own or victims

    def _make_room(self, protect: set[tuple[int, int]], layer: int) -> bool:
        """Evict until one more expert (of `layer`) fits; False if everything left is
        pinned/protected or still loading (bytes in flight count against the budget)."""
        while len(self._entries) + 1 > self.capacity:
            prio = self.policy.priority(self._t)[0]
            victims = [(prio[self._slot(k)], k) for k, e in self._entries.items()
                       if e.pins == 0 and k not in protect and self._ready(e)]
            if victims and self.per_layer_capacity:
                victims = self._victims(victims, layer)
            if not victims:
                return False
            _, key = min(victims)
            self._drop(key)
            self._last_use.pop(key, None)
            self.stats.evictions += 1
            self.policy.evicted(self._t, self._mask([key]))
        return True

    def _make_room_waiting(self, protect: set[tuple[int, int]], layer: int) -> None:
        """Make room for a demand load (lock held). If only loads in flight or protected
        experts stand in the way, wait for a load to finish, then give up protection (a
        protected expert is re-read later) rather than fail; pinned experts (being computed
        with) are never evicted."""
        while not self._make_room(protect, layer):
            pending = [e.future for e in self._entries.values()
                       if e.weights is None and e.future is not None and not e.future.done()]
            if pending:
                self._lock.release()
                try:
                    wait(pending, return_when=FIRST_COMPLETED)
                finally:
                    self._lock.acquire()
            elif protect:
                protect = set()
            else:
                raise RuntimeError("expert cache: every resident expert is in use; raise "
                                   "expert_memory")

    def _start_load(self, key: tuple[int, int], prefetched: bool) -> _Entry:
        entry = _Entry(None, prefetched)
        self._add(key, entry)
        self.stats.peak_bytes = max(self.stats.peak_bytes, self.used_bytes)
        entry.future = self._pool.submit(self.loader, *key)
        with self._loading_lock:
            self._loading += 1
        entry.future.add_done_callback(self._load_done)
        self.stats.bytes_loaded += self.expert_bytes
        self.policy.inserted(self._t, self._mask([key]), prefetched)
        return entry

    # ---- API ----------------------------------------------------------------------------

    def prefetch(self, layer: int, experts, protect: set[tuple[int, int]] | None = None,
                 guess: bool = True) -> int:
        """Start background loads for experts not resident; returns how many started.
        A prefetch never evicts a pinned expert or one in `protect`. `guess=False` marks
        experts the layer is known to need (their loads start early, in parallel): the
        "cold" rule holds back guesses only, since a known need would evict anyway."""
        started = 0
        experts = list(experts)
        with self._lock:
            entries = [self._entries.get((layer, int(e))) for e in experts]
            if not guess:
                self.stats.layer_start_hits += sum(1 for entry in entries
                                                   if entry is not None and self._ready(entry))
            if all(entry is not None for entry in entries):
                return 0  # the common case at a full budget: the loop below starts nothing
            protect = set(protect or ())
            if guess:  # never push out one guess for another
                protect |= {(layer, int(e)) for e in experts}
            if guess and self.prefetch_evicts == "cold":
                protect |= {k for k, p in self._last_use.items() if p >= self._pass - 1}
            for e in experts:
                key = (layer, int(e))
                if key in self._entries:
                    continue
                if self._io_busy(guess) or not self._make_room(protect, layer):
                    break
                self._start_load(key, prefetched=True)
                self.stats.prefetches += 1
                started += 1
        return started

    def _count_request(self, key: tuple[int, int]) -> None:
        """A request's pass tracking, policy step and count (lock held): a forward pass asks
        each (layer, expert) once, layers in order, so going back a layer or repeating a key
        starts the next pass."""
        if key[0] < self._last_layer or self._last_use.get(key) == self._pass:
            self._pass += 1
        self._last_layer = key[0]
        self._last_use[key] = self._pass
        self._t += 1
        self.stats.requests += 1

    def _pin(self, key: tuple[int, int], entry: _Entry, hit: bool) -> None:
        """A request that got its entry (lock held): prefetch credit, pin, policy update."""
        if entry.prefetched and not entry.used:
            self.stats.useful_prefetches += 1
        entry.used = True
        entry.pins += 1
        self._observe(key, hit)

    def acquire(self, layer: int, expert: int, protect: set[tuple[int, int]] | None = None,
                wait: bool = True, can_skip: Callable[[tuple[int, int]], bool] | None = None
                ) -> tuple[torch.Tensor, ...] | None:
        """The expert's weights, pinned until `release`; waits for a load in flight or
        demand-loads a miss. With `wait=False`, an expert that is not ready returns None
        (nothing pinned; counted in `substitutions`) after starting its load if the budget
        has room without waiting (and fewer than `max_inflight` are loading); `can_skip`,
        when given, is asked first (lock held) and a False makes the call wait after all."""
        key = (layer, expert)
        with self._lock:
            self._count_request(key)
            entry = self._entries.get(key)
            if not wait and can_skip is not None and \
                    not (entry is not None and self._ready(entry)) and not can_skip(key):
                wait = True
            if entry is None:
                self.stats.misses += 1
                if wait:
                    self._make_room_waiting(protect or set(), layer)
                    entry = self._start_load(key, prefetched=False)
                elif not self._io_busy() and self._make_room(protect or set(), layer):
                    entry = self._start_load(key, prefetched=False)
            elif self._ready(entry):
                self.stats.hits += 1
            else:
                self.stats.inflight_hits += 1
            if entry is not None and entry.weights is None and not wait \
                    and not entry.future.done():
                entry = None  # in flight (a failed load falls through and raises below)
            if entry is None:
                self.stats.substitutions += 1
                self._observe(key, False)
                return None
            self._pin(key, entry, entry.weights is not None)
        if entry.weights is None:
            t0 = self._clock()
            try:
                weights = entry.future.result()
            except Exception:
                with self._lock:
                    entry.pins -= 1
                    self._drop(key)
                raise
            self.stats.wait_seconds += self._clock() - t0
            with self._lock:
                entry.weights = weights
        return entry.weights

    def acquire_resident(self, layer: int, experts: list[int]
                         ) -> list[tuple[torch.Tensor, ...]] | None:
        """The fast path of a layer whose experts are all resident: each one's weights,
        pinned, with exactly the bookkeeping `acquire` does for a hit, expert by expert in
        order (policy step, pass tracking, stats, policy.observe), under one lock. None,
        with nothing changed, when any of them is missing or still loading: the caller
        then takes `acquire` per expert. Release with `release_many`."""
        with self._lock:
            entries = [self._entries.get((layer, e)) for e in experts]
            if not all(entry is not None and self._ready(entry) for entry in entries):
                return None
            out = []
            for e, entry in zip(experts, entries):
                key = (layer, e)
                self._count_request(key)
                self.stats.hits += 1
                self._pin(key, entry, True)
                out.append(entry.weights)
            return out

    def begin_request(self) -> None:
        """A new request begins (policies that track one, like ActivationAware, reset)."""
        new_request = getattr(self.policy, "new_request", None)
        if new_request is not None:
            with self._lock:
                new_request()

    def release_many(self, layer: int, experts) -> None:
        with self._lock:
            for e in experts:
                entry = self._entries.get((layer, e))
                if entry is not None:
                    entry.pins -= 1

    def release(self, layer: int, expert: int) -> None:
        self.release_many(layer, (expert,))

    def settle(self) -> None:
        """Wait for every load in flight (their weights become resident)."""
        with self._lock:
            pending = [(k, e) for k, e in self._entries.items() if e.weights is None]
        for k, e in pending:
            try:
                w = e.future.result()
            except Exception:
                with self._lock:
                    self._drop(k)
                continue
            with self._lock:
                e.weights = w

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self.reader.close()
