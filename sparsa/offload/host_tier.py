"""The host tier: experts in host memory between the device's expert cache and the disk.

On a GPU machine the device cache (`ExpertCache`, budget `expert_memory`) holds compute-ready
experts in GPU memory; the host tier holds up to `host_memory` bytes of experts as read from
disk (`ExpertReader.read_raw`'s tensors) in pinned host memory, so a device miss that the
host tier holds costs one asynchronous host-to-device copy instead of a disk read. Loads run
on the cache's I/O threads: the tier is the cache's loader (`load`), and each thread copies
on its own CUDA side stream (`ExpertReader.device_form`), synchronizing that stream before
the load counts as done.

The tier also serves Fiddler's option (on_miss="host"): when an expert is not on the device
when its layer runs but is in host memory, the layer computes it there, on the CPU, with
`acquire`d host weights (pinned against eviction until `release`), while its copy to the
device goes on.

Eviction is LRU over experts not in use; the budget counts every expert held or being
filled, and a read that finds the tier full of experts in use goes to the device without
being kept. The tier holds the raw tensors, so any layout (native, resident, the quantized
store's packed experts) works: `ExpertReader.compute_form` makes the device copy.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch

from sparsa.offload.expert_reader import ExpertReader, SlabPool

__all__ = ["HostTier", "HostTierStats"]


@dataclass
class HostTierStats:
    loads: int = 0  # device loads served through the tier
    hits: int = 0  # ... from host memory
    disk_reads: int = 0  # ... from disk (kept in the tier when there was room)
    not_kept: int = 0  # disk reads the tier had no room for (every slot in use)
    evictions: int = 0
    peak_bytes: int = 0
    host_computes: int = 0  # misses computed on the host (on_miss="host")
    host_compute_rows: int = 0

    @property
    def hit_rate(self) -> float:
        return self.hits / self.loads if self.loads else 0.0


class _HostEntry:
    __slots__ = ("pins", "raw")

    def __init__(self):
        self.raw: tuple[torch.Tensor, ...] | None = None  # None while being filled
        self.pins = 0


class HostTier:
    """Budgeted LRU of experts' raw tensors in host memory (pinned when the device is CUDA)."""

    def __init__(self, reader: ExpertReader, budget_bytes: int, expert_bytes: int):
        if budget_bytes < expert_bytes:
            raise ValueError(f"host memory budget {budget_bytes} B holds no expert "
                             f"({expert_bytes} B each)")
        self.reader = reader
        self.device = reader.device
        self.pinned = self.device.type == "cuda"
        self.expert_bytes = expert_bytes
        self.budget_bytes = budget_bytes
        self.capacity = budget_bytes // expert_bytes
        self.stats = HostTierStats()
        self._entries: OrderedDict[tuple[int, int], _HostEntry] = OrderedDict()
        self._lock = threading.Lock()
        # CPU buffers come from page-aligned slabs reused once nothing views them (fresh
        # multi-MB mallocs fragment glibc's heap); pinned ones from torch's caching host
        # allocator, which reuses freed blocks itself.
        self._slabs = SlabPool(0 if self.pinned else (self.capacity + 1) * reader.raw_bytes)

    @property
    def used_bytes(self) -> int:
        return len(self._entries) * self.expert_bytes

    def held(self) -> set[tuple[int, int]]:
        with self._lock:
            return {k for k, e in self._entries.items() if e.raw is not None}

    # ---- Fiddler: computing where the expert lives ---------------------------------------

    def acquire(self, layer: int, expert: int) -> tuple[torch.Tensor, ...] | None:
        """The expert's host tensors, pinned until `release`, or None if the tier does not
        hold it (or is still filling it)."""
        with self._lock:
            entry = self._entries.get((layer, expert))
            if entry is None or entry.raw is None:
                return None
            entry.pins += 1
            self._entries.move_to_end((layer, expert))
            return entry.raw

    def release(self, layer: int, expert: int) -> None:
        with self._lock:
            entry = self._entries.get((layer, expert))
            if entry is not None:
                entry.pins -= 1

    def count_compute(self, rows: int) -> None:
        with self._lock:
            self.stats.host_computes += 1
            self.stats.host_compute_rows += rows

    # ---- the device cache's loader ------------------------------------------------------

    def load(self, layer: int, expert: int):
        """The expert in the device cache's compute form, from host memory if held, else
        from disk (keeping a host copy when the budget has room)."""
        key = (layer, expert)
        raw = self.acquire(layer, expert)
        with self._lock:
            self.stats.loads += 1
            if raw is not None:
                self.stats.hits += 1
        pinned = raw is not None
        if raw is None:
            raw, pinned = self._read(key)
        try:
            return self.reader.device_form(raw)
        finally:
            if pinned:
                self.release(layer, expert)

    def _read(self, key: tuple[int, int]) -> tuple[tuple[torch.Tensor, ...], bool]:
        """Read from disk into a new host entry, pinned for the caller (True), or, with no
        room, return the reader's own buffers (False)."""
        with self._lock:
            self.stats.disk_reads += 1
            keep = key not in self._entries and self._make_room()
            if keep:
                entry = self._entries[key] = _HostEntry()
                entry.pins = 1
                self.stats.peak_bytes = max(self.stats.peak_bytes, self.used_bytes)
            else:
                self.stats.not_kept += 1
        try:
            raw = self.reader.read_raw(*key)
            if keep:
                raw = self._copy_in(key, raw)
        except BaseException:
            if keep:
                with self._lock:
                    self._entries.pop(key, None)
            raise
        if keep:
            with self._lock:
                entry.raw = raw
        return raw, keep

    def _make_room(self) -> bool:
        """Evict least recently used experts not in use until one more fits (lock held)."""
        while len(self._entries) + 1 > self.capacity:
            victim = next((k for k, e in self._entries.items()
                           if e.pins == 0 and e.raw is not None), None)
            if victim is None:
                return False
            del self._entries[victim]
            self.stats.evictions += 1
        return True

    def _copy_in(self, key: tuple[int, int],
                 raw: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        """Copies of the tensors (the reader's slab is reused) in one page-aligned buffer, at
        the offsets they have in the slab: the same alignment computes the same bits."""
        n = self.reader.raw_bytes
        if self.pinned:
            buf = torch.empty(n, dtype=torch.uint8, pin_memory=True)
        else:
            buf = torch.from_numpy(self._slabs.lease(n))
        out = []
        for t, off in zip(raw, self.reader.raw_offsets(*key)):
            dst = buf[off:off + t.nbytes].view(t.dtype).view(t.shape)
            dst.copy_(t)
            out.append(dst)
        return tuple(out)

    def report(self) -> dict:
        s = self.stats
        return {"host_budget_bytes": self.budget_bytes, "host_capacity_experts": self.capacity,
                "host_loads": s.loads, "host_hits": s.hits, "host_hit_rate": s.hit_rate,
                "host_disk_reads": s.disk_reads, "host_not_kept": s.not_kept,
                "host_evictions": s.evictions, "host_peak_bytes": s.peak_bytes,
                "host_pinned": self.pinned, "host_computes": s.host_computes,
                "host_compute_rows": s.host_compute_rows}
