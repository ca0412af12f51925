"""Reading one expert's weights from the checkpoint, uncached by the OS and without copies.

`ExpertReader` fetches an expert's gate/up/down tensors straight from the safetensors files
with O_DIRECT, so the OS page cache cannot silently serve (and inflate the measured hit rate
of) a "slow tier" read; where O_DIRECT is refused (tmpfs, some filesystems) it reads
normally and drops the pages afterwards with posix_fadvise.

How a load is made fast (several times faster than reading tensor by tensor; figures in
BENCHMARKS.md): the three tensors of an expert are usually adjacent in
the file, so they are coalesced into one span and read in 4 MiB O_DIRECT chunks straight
into a page-aligned slab; the tensors are views of the slab (no copy when the checkpoint's
dtype is the store dtype). Slabs are recycled: a freshly mapped buffer costs a page fault
per 4 KiB inside the O_DIRECT read (a several-fold slower read), a reused one does not.

Layouts: "native" keeps the checkpoint's [out, in] tensors (gate, up, down), computed with
F.linear; "resident" transposes into FusedExperts' [in, out] layout (w13 [H, 2I], w2 [I, H]),
bit-identical to the all-resident model's arithmetic, with a ~25% faster GEMV here, but ~50 ms
of CPU per mixtral-mini expert load (sparsa.offload.loading.expert_layout picks). "packed"
reads the tensors of a `PackedLocation` (a quantized expert in the store that
sparsa.offload.quantized_store writes, or the compressed byte planes of one that
sparsa.offload.compressed_store writes) as they are and hands them to an `assemble` callable.
"""

from __future__ import annotations

import mmap
import os
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from sparsa.loader.safetensors_reader import CheckpointError, TensorLocation

_ALIGN = 4096  # O_DIRECT needs block-aligned offsets, lengths and buffers; a page covers all
# Bytes per read syscall: the virtio disk here splits requests at 4 MiB (max_sectors_kb);
# 4 MiB chunks read 2.3 GB/s, one 34.6 MB read 1.3 GB/s, 256 KiB chunks less.
_CHUNK = 4 << 20
# Tensors this close in one file are read as one span: a gap this small costs less to read
# than a separate request.
_MERGE_GAP = 256 << 10
LAYOUTS = ("native", "resident", "packed")


@dataclass
class ExpertLocation:
    gate: TensorLocation
    up: TensorLocation
    down: TensorLocation

    @property
    def tensors(self) -> tuple[TensorLocation, ...]:
        return (self.gate, self.up, self.down)


@dataclass
class PackedLocation:
    """Any tensors that make up one expert (e.g. a quantized one's weights and scales)."""

    names: tuple[str, ...]
    parts: tuple[TensorLocation, ...]

    @property
    def tensors(self) -> tuple[TensorLocation, ...]:
        return self.parts


@dataclass(frozen=True)
class _Segment:
    path: str
    start: int  # aligned file offset
    need: int  # bytes from `start` that hold tensor data (the read must reach this far)
    length: int  # aligned length read
    slab_off: int  # where it lands in the slab (aligned)


@dataclass(frozen=True)
class ReadPlan:
    segments: tuple[_Segment, ...]
    offsets: tuple[int, ...]  # of each of loc.tensors: byte offset in the slab
    nbytes: int  # slab bytes needed


def plan_reads(loc: ExpertLocation | PackedLocation, merge_gap: int = _MERGE_GAP) -> ReadPlan:
    """One aligned span per group of tensors that are adjacent (within `merge_gap`) in one
    file; spans land one after another, page-aligned, in the slab."""
    tensors = loc.tensors
    order = sorted(range(len(tensors)), key=lambda i: (str(tensors[i].path), tensors[i].offset))
    groups: list[list] = []  # [path, lo, hi, members]
    for i in order:
        t = tensors[i]
        g = groups[-1] if groups else None
        if g is not None and g[0] == str(t.path) and t.offset - g[2] <= merge_gap:
            g[2] = max(g[2], t.offset + t.nbytes)
            g[3].append(i)
        else:
            groups.append([str(t.path), t.offset, t.offset + t.nbytes, [i]])
    segments, offsets, slab = [], [0] * len(tensors), 0
    for path, lo, hi, members in groups:
        start = lo // _ALIGN * _ALIGN
        length = -(-(hi - start) // _ALIGN) * _ALIGN
        segments.append(_Segment(path, start, hi - start, length, slab))
        for i in members:
            offsets[i] = slab + tensors[i].offset - start
        slab += length
    return ReadPlan(tuple(segments), tuple(offsets), slab)


def _map_slab(nbytes: int) -> tuple[mmap.mmap, np.ndarray]:
    """A page-aligned anonymous buffer. MAP_POPULATE faults its pages in at once, far
    cheaper than one by one inside the O_DIRECT read. (Transparent huge pages were tried:
    with the budget at half of RAM their compaction and splits tripled the TTFT.)"""
    flags = mmap.MAP_PRIVATE | getattr(mmap, "MAP_ANONYMOUS", 0x20) | \
        getattr(mmap, "MAP_POPULATE", 0)
    mm = mmap.mmap(-1, nbytes, flags=flags)
    return mm, np.frombuffer(mm, dtype=np.uint8)


class SlabPool:
    """Page-aligned anonymous buffers, reused once nothing views them.

    `lease` returns a fresh numpy view of a slab; every tensor made from it (torch.from_numpy
    and any view of that) keeps the numpy array alive, so the slab is free exactly when the
    weak reference to that array is dead. At most `max_bytes` of slabs are kept; beyond that
    a lease gets a buffer of its own, unmapped when its tensors die."""

    def __init__(self, max_bytes: int = 0):
        self.max_bytes = max_bytes
        self._slabs: list[list] = []  # [mmap, weakref to the current lease or None]
        self._lock = threading.Lock()
        self.allocated = 0  # slabs ever mapped (first use of each pays its page faults)

    @property
    def pooled_bytes(self) -> int:
        return sum(len(s[0]) for s in self._slabs)

    def lease(self, nbytes: int) -> np.ndarray:
        with self._lock:
            for slot in self._slabs:
                if len(slot[0]) == nbytes and (slot[1] is None or slot[1]() is None):
                    arr = np.frombuffer(slot[0], dtype=np.uint8)
                    slot[1] = weakref.ref(arr)
                    return arr
            mm, arr = _map_slab(nbytes)
            self.allocated += 1
            if self.pooled_bytes + nbytes <= self.max_bytes:
                self._slabs.append([mm, weakref.ref(arr)])
            return arr

    def reserve(self, n: int, nbytes: int, threads: int = 1) -> int:
        """Map (and fault in) up to n free slabs of nbytes now, within max_bytes, on
        `threads` threads; returns how many were mapped. A fresh 17 MB slab costs 9-36 ms
        here (page faults and zeroing), which otherwise lands on the first request's loads
        (DeepSeek-V2-Lite bf16, 25% budget: 15 s of I/O-thread time inside the TTFT)."""
        with self._lock:
            n = min(n, (self.max_bytes - self.pooled_bytes) // nbytes) if nbytes else 0
        if n <= 0:
            return 0
        if threads > 1:
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(threads) as ex:
                maps = list(ex.map(lambda _: _map_slab(nbytes)[0], range(n)))
        else:
            maps = [_map_slab(nbytes)[0] for _ in range(n)]
        with self._lock:
            self._slabs.extend([mm, None] for mm in maps)
            self.allocated += len(maps)
        return len(maps)

    def clear(self) -> None:
        with self._lock:
            self._slabs = [s for s in self._slabs if s[1] is not None and s[1]() is not None]


def _sum(t: torch.Tensor) -> torch.Tensor:
    """A streaming sum for the finiteness check. bf16 sums natively (fp32 accumulation, the
    fp32 exponent range): sum(dtype=float32) would first copy the tensor to fp32, an 11 MB
    temporary and ~2-6 ms per DeepSeek-V2-Lite expert tensor on the I/O threads."""
    return t.sum() if t.dtype == torch.bfloat16 else t.sum(dtype=torch.float32)


def all_finite(tensors) -> bool:
    """No NaN or inf in any floating-point tensor of `tensors`: a NaN or inf anywhere makes
    the sum non-finite, one streaming pass per tensor instead of isfinite's boolean
    temporary (3x slower here). (A sum can overflow on huge but finite weights: confirm
    with isfinite then.) (Integer tensors, quantized weights, have no invalid values.)"""
    return all(torch.isfinite(_sum(t)) or bool(torch.isfinite(t).all()) for t in tensors
               if t.dtype.is_floating_point)


class ExpertReader:
    """Reads (layer, expert) -> weights in `dtype` and `layout`: "native" gives
    (gate [I, H], up [I, H], down [H, I]); "resident" gives FusedExperts' (w13 [H, 2I],
    w2 [I, H]); "packed" gives assemble(the location's tensors as stored)."""

    def __init__(self, locations: dict[tuple[int, int], ExpertLocation | PackedLocation],
                 dtype: torch.dtype, direct_io: bool = True,
                 device: torch.device | str = "cpu", layout: str = "native",
                 pool_bytes: int = 0, assemble: Callable[[tuple], Any] | None = None,
                 slab_bytes: int = 0):
        """slab_bytes: the least size of a pooled slab (an `assemble` that fills slabs of
        the reader's pool with what it makes needs them as large as that)."""
        if layout not in LAYOUTS:
            raise ValueError(f"expert layout must be one of {LAYOUTS}; got {layout!r}")
        if (layout == "packed") != (assemble is not None):
            raise ValueError("the packed layout needs `assemble`, and only it")
        self.assemble = assemble
        self.locations = locations
        self.dtype = dtype
        self.device = torch.device(device)
        self.direct_io = direct_io
        self.layout = layout
        self._fds: dict[tuple[str, bool], int] = {}
        self._lock = threading.Lock()
        self.bytes_read = 0  # from disk, alignment padding included
        self.read_seconds = 0.0  # inside read syscalls, summed over threads
        self.loads = 0
        self._plans = {k: plan_reads(v) for k, v in locations.items()}
        # One slab size for every expert (spans differ by a page with their alignment), so
        # any free slab serves any load.
        self.raw_bytes = max((p.nbytes for p in self._plans.values()), default=0)
        self.slab_bytes = max(self.raw_bytes, -(-slab_bytes // _ALIGN) * _ALIGN)
        if layout == "resident":
            elem = {v.gate.dtype.itemsize for v in locations.values()} | {dtype.itemsize}
            numel = max((sum(t.nbytes // t.dtype.itemsize for t in (v.gate, v.up, v.down))
                         for v in locations.values()), default=0)
            self.slab_bytes = max(self.slab_bytes, -(-numel * max(elem) // _ALIGN) * _ALIGN)
        self.pool = SlabPool(pool_bytes)
        self._streams = threading.local()  # each I/O thread's CUDA side stream

    def raw_offsets(self, layer: int, expert: int) -> tuple[int, ...]:
        """Where `read_raw`'s tensors start in its slab (a copy that keeps these offsets in a
        page-aligned buffer keeps their alignment, and so the kernels' rounding)."""
        return self._plans[(layer, expert)].offsets

    def set_pool_slabs(self, n: int) -> None:
        """Keep up to n slabs for reuse (the cache's capacity plus loads in flight)."""
        self.pool.max_bytes = n * self.slab_bytes

    def _fd(self, path: str) -> tuple[int, bool]:
        with self._lock:
            for direct in ((True, False) if self.direct_io else (False,)):
                fd = self._fds.get((path, direct))
                if fd is not None:
                    return fd, direct
                flags = os.O_RDONLY | (getattr(os, "O_DIRECT", 0) if direct else 0)
                if direct and not getattr(os, "O_DIRECT", 0):
                    continue
                try:
                    fd = os.open(path, flags)
                except OSError:
                    if direct:
                        continue
                    raise
                self._fds[(path, direct)] = fd
                return fd, direct
        raise OSError(f"cannot open {path}")

    def _drop_direct(self, path: str, fd: int) -> None:
        with self._lock:
            if self._fds.get((path, True)) == fd:
                del self._fds[(path, True)]
                os.close(fd)
            self.direct_io = False

    def _read_segment(self, seg: _Segment, slab: np.ndarray) -> None:
        fd, direct = self._fd(seg.path)
        buf = slab[seg.slab_off : seg.slab_off + seg.length]
        done = 0
        t0 = time.perf_counter()
        try:
            while done < seg.need:
                n = os.preadv(fd, [buf[done : min(done + _CHUNK, seg.length)]],
                              seg.start + done)
                done += n
                if n == 0 or (direct and n % _ALIGN):
                    break  # end of file (a direct read cannot go on from an unaligned offset)
        except OSError:
            if not direct:
                raise
            # Some filesystems accept O_DIRECT at open but fail the read: fall back once.
            self._drop_direct(seg.path, fd)
            return self._read_segment(seg, slab)
        if done < seg.need:
            raise CheckpointError(f"{seg.path}: short read of an expert tensor (file truncated "
                                  f"after it was opened?)")
        if not direct and hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, seg.start, seg.length, os.POSIX_FADV_DONTNEED)
        with self._lock:
            self.bytes_read += done
            self.read_seconds += time.perf_counter() - t0

    def read_raw(self, layer: int, expert: int) -> tuple[torch.Tensor, ...]:
        """The location's tensors as stored on disk ((gate, up, down) [out, in] in the
        checkpoint's dtype for an ExpertLocation), views of one slab; the floating-point
        ones checked for non-finite values."""
        loc = self.locations.get((layer, expert))
        if loc is None:
            raise KeyError(f"no expert {expert} in layer {layer}")
        plan = self._plans[(layer, expert)]
        slab = self.pool.lease(self.slab_bytes)
        for seg in plan.segments:
            self._read_segment(seg, slab)
        with self._lock:
            self.loads += 1
        out = []
        for off, t in zip(plan.offsets, loc.tensors):
            raw = torch.from_numpy(slab[off : off + t.nbytes])
            if off % t.dtype.itemsize:  # misaligned for a dtype view (no safetensors writer
                raw = raw.clone()       # does this): copy
            out.append(raw.view(t.dtype).view(t.shape))
        if not all_finite(out):
            raise CheckpointError(f"layer {layer} expert {expert}: non-finite weights on disk "
                                  f"(corrupt file {loc.tensors[0].path})")
        return tuple(out)

    def load(self, layer: int, expert: int) -> Any:
        raw = self.read_raw(layer, expert)
        try:
            return self.device_form(raw)
        except CheckpointError as e:  # (an assemble's: say which expert)
            raise CheckpointError(f"layer {layer} expert {expert}: {e}") from None

    def device_form(self, raw: tuple[torch.Tensor, ...]) -> Any:
        """`compute_form`, made on the calling I/O thread's own CUDA stream when the device
        is a GPU: on the default stream an I/O thread's copies and conversions would queue
        behind the compute stream's kernels (and hold them up), instead of overlapping."""
        if self.device.type != "cuda":
            return self.compute_form(raw)
        stream = getattr(self._streams, "stream", None)
        if stream is None:
            stream = self._streams.stream = torch.cuda.Stream(self.device)
        with torch.cuda.stream(stream):
            weights = self.compute_form(raw)
        stream.synchronize()
        # The copies were allocated on the side stream; the compute stream uses and frees
        # them, so the allocator must wait for its work before reusing their memory.
        compute = torch.cuda.default_stream(self.device)
        for t in _tensors(weights):
            t.record_stream(compute)
        return weights

    def compute_form(self, raw: tuple[torch.Tensor, ...]) -> Any:
        """What the cache computes with, from `read_raw`'s tensors (a slab's views or a host
        tier's copy, on the CPU), on `device`. Off the CPU the tensors move first, then
        convert there; pinned ones copy asynchronously on the caller's current stream."""
        if self.device.type != "cpu":
            raw = tuple(t.to(self.device, non_blocking=t.is_pinned()) for t in raw)
        if self.layout == "packed":
            return self.assemble(raw)
        gate, up, down = raw
        if self.layout == "native":
            return tuple(t if t.dtype == self.dtype else t.to(self.dtype)
                         for t in (gate, up, down))
        inter, hidden = gate.shape
        if self.device.type != "cpu":
            return (torch.cat([gate.t(), up.t()], dim=1).to(self.dtype),
                    down.t().contiguous().to(self.dtype))
        arr = self.pool.lease(self.slab_bytes)
        flat = torch.from_numpy(arr[: 3 * inter * hidden * self.dtype.itemsize])
        flat = flat.view(self.dtype)
        w13 = flat[: 2 * inter * hidden].view(hidden, 2 * inter)
        w2 = flat[2 * inter * hidden :].view(inter, hidden)
        w13[:, :inter].copy_(gate.t())
        w13[:, inter:].copy_(up.t())
        w2.copy_(down.t())
        return (w13, w2)

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()
        self.pool.clear()


def _tensors(weights) -> list[torch.Tensor]:
    """The device tensors of a compute form: a tuple of tensors or a module's buffers."""
    if isinstance(weights, tuple):
        return [t for t in weights if isinstance(t, torch.Tensor)]
    return list(weights.buffers()) if hasattr(weights, "buffers") else []
