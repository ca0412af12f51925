"""The compressed expert store: offloaded experts kept losslessly compressed on disk.

Expert offloading at a small budget is bound by the disk (each DeepSeek-V2-Lite bf16 expert
is 17.3 MB). Trained weights' bytes are far from random once split into byte planes: a bf16
tensor's high bytes (sign and 7 exponent bits) take few values and zstd (level 1) shrinks
them to about a third of their size, while the low bytes (mantissa) do not compress.
So with `OffloadConfig(compression="zstd")` the first load streams every routed expert from the
checkpoint (two in memory at a time), splits each of its tensors (gate, up, down [out, in])
into `itemsize` byte planes (plane j = byte j of every element, little-endian), compresses each
plane with zstd (frame content checksum on) and keeps it raw where that does not pay (ratio
above `RAW_ABOVE`); later loads reuse the store. A load reads the expert's compressed span
(`ExpertReader`, layout "packed"), decompresses its planes on the I/O thread (zstd releases the
GIL) and interleaves them into a pooled page-aligned slab: the checkpoint's tensors, bit for
bit, in the "native" layout. The cache budget counts those decompressed bytes.

Layout: as sparsa.offload.quantized_store's (whose helpers this reuses): one safetensors file
per MoE layer of uint8 tensors `{e}.{gate|up|down}.p{j}` and `{e}.phase` (where each tensor
starts in the checkpoint, modulo 64), each expert one contiguous 4 KiB-aligned span
(`{e}.pad`); a plane stored raw has exactly its element count of bytes, a compressed one
fewer. `store.json` is written last, files go to temporary names first, the
directory name hashes the checkpoint's identity and the codec. Each layer file's header is
sized before its experts are compressed (from their raw sizes) and filled in after them.

A truncated, incomplete or mismatched store is rebuilt with a warning. A flipped byte in a
compressed plane fails its checksum (a CheckpointError at load); one in a raw plane is caught,
like one in the checkpoint, only where it makes a weight non-finite.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from sparsa.loader.safetensors_reader import CheckpointError, TensorLocation
from sparsa.offload.expert_reader import (
    ExpertLocation,
    ExpertReader,
    PackedLocation,
    SlabPool,
    all_finite,
)
from sparsa.offload.quantized_store import (
    STORE_VERSION,
    expert_pad,
    layer_files,
    layer_header,
    open_or_build,
    prepare_dir,
    read_manifest,
    shard_identity,
    store_path,
    stream_experts,
    write_atomic,
    write_manifest,
)

log = logging.getLogger(__name__)

CODECS = ("none", "zstd")
# zstd level 1: a DeepSeek-V2-Lite-shaped bf16 expert's high plane shrinks to 0.369 (level 9:
# 0.399, -1: 0.660) and one of 2.88 MB decompresses in 1.8 ms (level 9: 2.1, -1: 1.4) on one
# core here (BENCHMARKS.md, Beyond RAM)
ZSTD_LEVEL = 1
RAW_ABOVE = 0.95  # a plane whose compressed size is above this share of its bytes stays raw
_NAMES = ("gate", "up", "down")
_FORMAT = "sparsa-compressed-experts"
_HEADER_SLACK = 128  # bytes per expert a header may grow by when sizes are filled in
# Each tensor is rebuilt at the address modulo this that the uncompressed read gives it (its
# checkpoint offset's): fp32 GEMMs round differently at other alignments.
_PHASE = 64

def _zstd():
    """zstandard, from the `offload` extra (imported when a compressed store is used)."""
    from sparsa.extras import require

    return require("zstandard", "offload", "offload_compression='zstd'")



def split_planes(t: torch.Tensor) -> list[np.ndarray]:
    """t's byte planes: plane j holds byte j (little-endian) of every element, in order."""
    b = t.contiguous().view(torch.uint8).numpy().reshape(-1, t.element_size())
    return [np.ascontiguousarray(b[:, j]) for j in range(b.shape[1])]


def merge_planes(planes: list[np.ndarray], out: np.ndarray) -> None:
    """The inverse of split_planes into `out` (uint8, every element's bytes)."""
    k = len(planes)
    if k == 2 and sys.byteorder == "little":
        # one pass of 16-bit shift-or: 1.6 ms per 8.6 MB plane pair here, a strided
        # out[1::2] = hi; out[0::2] = lo 4 ms
        o = out.view(np.uint16)
        np.left_shift(planes[1], 8, out=o, dtype=np.uint16)
        np.bitwise_or(o, planes[0], out=o)
    else:
        o = out.reshape(-1, k)
        for j, p in enumerate(planes):
            o[:, j] = p


def encode_plane(plane: np.ndarray, level: int = ZSTD_LEVEL) -> bytes | np.ndarray:
    """The zstd frame of `plane` (content size and checksum in it), or the plane itself
    where compression does not pay."""
    c = _zstd().ZstdCompressor(level=level, write_checksum=True).compress(plane)
    return c if len(c) <= RAW_ABOVE * plane.nbytes else plane


class _Decoder(threading.local):
    """Per I/O thread: a zstd context and a scratch buffer for the decompressed planes."""

    def __init__(self):
        self.dctx = _zstd().ZstdDecompressor()
        self.scratch = np.empty(0, dtype=np.uint8)
        self.one = np.empty(1, dtype=np.uint8)

    def buffer(self, nbytes: int) -> np.ndarray:
        if self.scratch.nbytes < nbytes:
            self.scratch = np.empty(nbytes, dtype=np.uint8)
        return self.scratch


_DECODER = _Decoder()


def decode_plane(data: np.ndarray, n: int, dst: np.ndarray) -> np.ndarray:
    """A plane of n bytes from what the store holds: itself if raw, else decompressed into
    dst[:n] (a CheckpointError if the frame is damaged or of another size)."""
    if data.nbytes == n:
        return data
    dst = dst[:n]
    got = extra = 0
    try:
        r = _DECODER.dctx.stream_reader(data, read_size=max(data.nbytes, 1))
        while got < n:
            k = r.readinto(dst[got:])
            if not k:
                break
            got += k
        extra = r.readinto(_DECODER.one)  # the frame must end here (checksum checked)
    except _zstd().ZstdError as e:
        raise CheckpointError(f"corrupt compressed plane in the expert store ({e})") from None
    if got != n or extra:
        raise CheckpointError(f"compressed plane in the expert store holds "
                              f"{'more than' if extra else got} bytes, not {n}")
    return dst


@dataclass
class CompressedStore:
    """An opened store: where each expert's planes are, and how to rebuild its tensors."""

    path: Path
    dtype: torch.dtype  # the checkpoint's experts
    shapes: tuple[tuple[int, ...], ...]  # gate, up, down
    out_dtype: torch.dtype  # what load gives (the cache's dtype)
    locations: dict[tuple[int, int], PackedLocation] = field(default_factory=dict, repr=False)
    stored_bytes: int = 0  # every expert's planes as stored (padding excluded)
    built: bool = False  # written by this load
    build_seconds: float = 0.0
    pool: SlabPool | None = None  # the reader's (attach)
    slab_bytes: int = 0
    # CPU seconds of loads, summed over the I/O threads: decompressing, interleaving the
    # planes, the finiteness check
    seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(
        ("decompress", "interleave", "check"), 0.0))
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def tensor_bytes(self) -> int:
        """One expert's decompressed tensors."""
        return sum(math.prod(s) for s in self.shapes) * self.dtype.itemsize

    @property
    def out_bytes(self) -> int:
        """The slab they are rebuilt into (with room to place each at its phase)."""
        return self.tensor_bytes + 3 * _PHASE

    @property
    def raw_bytes(self) -> int:
        return len(self.locations) * self.tensor_bytes

    def attach(self, reader: ExpertReader) -> None:
        """Decompress into slabs of `reader`'s pool (made at least out_bytes large)."""
        self.pool, self.slab_bytes = reader.pool, reader.slab_bytes

    def assemble(self, raw: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        """(gate, up, down) [out, in], bit-identical to the checkpoint's, from the parts
        read (views of the read slab, free once this returns, or a host tier's copy)."""
        device = raw[0].device
        if device.type != "cpu":
            raw = tuple(t.cpu() for t in raw)
        k = self.dtype.itemsize
        scratch = _DECODER.buffer(max(math.prod(s) for s in self.shapes) * k)
        pool = self.pool if self.pool is not None else SlabPool()
        slab = pool.lease(max(self.slab_bytes, self.out_bytes))
        out, off, spent, phases = [], 0, [0.0, 0.0, 0.0], raw[-1].tolist()
        for i, shape in enumerate(self.shapes):
            n = math.prod(shape)
            off += (phases[i] - off) % _PHASE
            t0 = time.perf_counter()
            planes = [decode_plane(raw[i * k + j].numpy(), n, scratch[j * n:])
                      for j in range(k)]
            t1 = time.perf_counter()
            dst = slab[off : off + n * k]
            merge_planes(planes, dst)
            out.append(torch.from_numpy(dst).view(self.dtype).view(shape))
            off += n * k
            spent[0] += t1 - t0
            spent[1] += time.perf_counter() - t1
        t0 = time.perf_counter()
        ok = all_finite(out)
        spent[2] = time.perf_counter() - t0
        with self._lock:
            for name, s in zip(self.seconds, spent):
                self.seconds[name] += s
        if not ok:
            raise CheckpointError(f"non-finite weights in the compressed expert store "
                                  f"{self.path} (a non-finite checkpoint, or damaged bytes)")
        if self.out_dtype != self.dtype or device.type != "cpu":
            out = [t.to(device=device, dtype=self.out_dtype) for t in out]
        return tuple(out)

    def report(self) -> dict:
        files = sum(f.stat().st_size for f in self.path.glob("layer_*.safetensors"))
        return {"expert_store": str(self.path), "expert_store_built": self.built,
                "expert_store_build_s": self.build_seconds, "compression": "zstd",
                "compression_ratio": self.stored_bytes / self.raw_bytes if self.raw_bytes
                else 0.0, "compressed_bytes": self.stored_bytes,
                "expert_store_disk_bytes": files,
                **{f"{name}_seconds": s for name, s in self.seconds.items()}}


def _plane_names(k: int) -> list[str]:
    return [f"{n}.p{j}" for n in _NAMES for j in range(k)]


def _phases(loc: ExpertLocation) -> bytes:
    """Where the uncompressed read puts each tensor, modulo _PHASE (its checkpoint offset's)."""
    return bytes(t.offset % _PHASE if t.offset % t.dtype.itemsize == 0 else 0
                 for t in loc.tensors)


def _compress_expert(w: tuple[torch.Tensor, ...], pool: ThreadPoolExecutor) -> list:
    """(part name, stored bytes) of one expert's planes, compressed on `pool`'s threads."""
    planes = [p for t in w for p in split_planes(t)]
    return list(zip(_plane_names(w[0].element_size()), pool.map(encode_plane, planes)))


def build_compressed(path: Path, identity: dict, reader: ExpertReader,
                     locations: dict[tuple[int, int], ExpertLocation], shapes) -> None:
    """Compress every expert of `locations` (read through `reader`, native layout) into
    `path`."""
    prepare_dir(path)
    k, keys = reader.dtype.itemsize, list(locations)
    raw_spec = [(name, torch.uint8, (math.prod(shapes[i // k]),))
                for i, name in enumerate(_plane_names(k))] + [("phase", torch.uint8, (3,))]
    layers: dict[int, list[int]] = {}
    for layer, e in sorted(keys):
        layers.setdefault(layer, []).append(e)
    files = {}
    with ThreadPoolExecutor(os.cpu_count() or 1, thread_name_prefix="sparsa-zstd") as pool:
        stream = stream_experts(reader, sorted(keys), lambda w: _compress_expert(w, pool),
                                "Compressing experts")
        for layer, experts in layers.items():
            # room for the header of the raw sizes (no part is larger stored), a pad each
            bound = len(layer_header(layer, [(e, raw_spec) for e in experts], _FORMAT))
            size = -(-(bound + _HEADER_SLACK * len(experts)) // 4096) * 4096
            blocks: list = []

            def chunks(layer=layer, experts=experts, blocks=blocks):
                for e in experts:
                    key, parts = next(stream)
                    if key != (layer, e):
                        raise AssertionError(f"store build out of order: {key} != {(layer, e)}")
                    parts.append(("phase", _phases(locations[key])))
                    spec = [(name, torch.uint8, (len(b) if isinstance(b, bytes) else b.nbytes,))
                            for name, b in parts]
                    blocks.append((e, spec))
                    for _, b in parts:
                        yield b
                    if expert_pad(spec):
                        yield bytes(expert_pad(spec))

            name = f"layer_{layer}.safetensors"
            written = write_atomic(
                path / name, chunks(), header_size=size,
                header=lambda layer=layer, blocks=blocks, size=size:
                layer_header(layer, blocks, _FORMAT, min_size=size))
            files[str(layer)] = {"name": name, "size": written, "experts": experts}
    write_manifest(path, {"identity": identity, "files": files})


def _open(path: Path, identity: dict, locations: dict, dtype: torch.dtype, shapes,
          out_dtype: torch.dtype) -> CompressedStore:
    """The store at `path`, checked against its manifest; CheckpointError says what is
    wrong (missing, truncated, inconsistent)."""
    m = read_manifest(path, identity)
    store = CompressedStore(path, dtype, shapes, out_dtype)
    k = dtype.itemsize
    names = (*_plane_names(k), "phase")
    for layer, experts, f, header, data_start in layer_files(path, m.get("files")):
        for e in experts:
            parts = []
            for i, name in enumerate(names):
                t = header.get(f"{e}.{name}")
                lo, n = (3, 3) if name == "phase" else (1, math.prod(shapes[i // k]))
                if t is None or t["dtype"] != "U8" or len(t["shape"]) != 1 or \
                        not lo <= t["shape"][0] <= n:
                    raise CheckpointError(f"{f}: tensor {e}.{name} missing or not a plane of "
                                          f"at most {n} bytes")
                b, end = t["data_offsets"]
                start = data_start + b  # (adjacent to the last part, or aligned)
                if start != (parts[-1].offset + parts[-1].nbytes if parts else
                             -(-start // 4096) * 4096):
                    raise CheckpointError(f"{f}: expert {e} is not one aligned span")
                parts.append(TensorLocation(f, start, end - b, torch.uint8, (end - b,)))
            store.locations[(layer, e)] = PackedLocation(names, tuple(parts))
            store.stored_bytes += sum(p.nbytes for p in parts)
    if set(store.locations) != set(locations):
        raise CheckpointError(f"{path}: holds other experts than the checkpoint's")
    return store


def open_compressed_store(ckpt_files: list[Path], locations: dict[tuple[int, int], ExpertLocation],
                          codec: str, out_dtype: torch.dtype,
                          store_dir: str | os.PathLike | None = None, direct_io: bool = True,
                          model_name: str = "model") -> CompressedStore:
    """The compressed store of these experts: reused when a valid one exists, else built
    (first load, or the old one was incomplete or damaged: rebuilt with a warning)."""
    if codec != "zstd":
        raise ValueError(f"compression must be one of {', '.join(CODECS)}; got {codec!r}")
    first = next(iter(locations.values()))
    dtype = first.gate.dtype
    shapes = tuple(tuple(t.shape) for t in first.tensors)
    if any(tuple(tuple(t.shape) for t in loc.tensors) != shapes or
           {t.dtype for t in loc.tensors} != {dtype} for loc in locations.values()):
        raise CheckpointError("the compressed expert store needs every routed expert of one "
                              "dtype and shape")
    identity = {"version": STORE_VERSION, "shards": shard_identity(ckpt_files),
                "codec": codec, "level": ZSTD_LEVEL, "raw_above": RAW_ABOVE,
                "dtype": str(dtype), "shapes": [list(s) for s in shapes]}
    return open_or_build(
        store_path(store_dir, model_name, f"zstd{ZSTD_LEVEL}", identity), "compressed",
        locations, dtype, direct_io,
        lambda path: _open(path, identity, locations, dtype, shapes, out_dtype),
        lambda path, reader: build_compressed(path, identity, reader, locations, shapes),
        log)


_EXPERT_TENSOR = r"layers\.(\d+)\..*experts\.(\d+)\.(gate_proj|w1|up_proj|w3|down_proj|w2)\.weight$"


def measure(model_dir: str, n: int = 16) -> dict:
    """The codec on n routed experts of a checkpoint spread over its layers, in memory, on
    one thread: plane ratios and compress / decompress / interleave times (into buffers
    reused from one expert to the next, as the I/O threads do)."""
    import re
    import time

    from sparsa.loader.safetensors_reader import SafetensorsCheckpoint

    ckpt, found = SafetensorsCheckpoint(model_dir), {}
    which = {"gate_proj": 0, "w1": 0, "up_proj": 1, "w3": 1, "down_proj": 2, "w2": 2}
    for name in ckpt.names():
        m = re.search(_EXPERT_TENSOR, name)
        if m:
            found.setdefault((int(m[1]), int(m[2])), [None] * 3)[which[m[3]]] = \
                ckpt.locate(name)
    keys = sorted(found)[:: max(1, len(found) // n)][:n]
    reader = ExpertReader({k: ExpertLocation(*found[k]) for k in keys}, found[keys[0]][0].dtype)
    reader.set_pool_slabs(2)
    size = max(t.nbytes for k in keys for t in found[k])
    scratch, out_buf = np.empty(size, np.uint8), np.empty(size, np.uint8)
    scratch[:] = out_buf[:] = 0  # (faulted in)
    sizes, t = np.zeros((2, 4)), dict.fromkeys(("read", "compress", "decompress", "merge"), 0.0)
    for key in keys:
        t0 = time.perf_counter()
        w = reader.load(*key)
        t1 = time.perf_counter()
        for x in w:
            planes = split_planes(x)
            t2 = time.perf_counter()
            stored = [encode_plane(p) for p in planes]
            t3 = time.perf_counter()
            back = [decode_plane(np.frombuffer(s, np.uint8) if isinstance(s, bytes) else s,
                                 p.nbytes, scratch[j * p.nbytes:])
                    for j, (s, p) in enumerate(zip(stored, planes))]
            t4 = time.perf_counter()
            out = out_buf[: x.numel() * x.element_size()]
            merge_planes(back, out)
            t5 = time.perf_counter()
            assert np.array_equal(out, x.contiguous().view(torch.uint8).numpy().reshape(-1))
            for j, (s, p) in enumerate(zip(stored, planes)):
                sizes[:, j] += (len(s) if isinstance(s, bytes) else s.nbytes, p.nbytes)
            t["compress"] += t3 - t2
            t["decompress"] += t4 - t3
            t["merge"] += t5 - t4
        t["read"] += t1 - t0
    k = w[0].element_size()
    raw = sizes[1].sum()
    return {"experts": len(keys), "dtype": str(w[0].dtype), "expert_mb": raw / len(keys) / 1e6,
            "plane_ratios": [round(a / b, 3) for a, b in zip(*sizes[:, :k])],
            "ratio": sizes[0].sum() / raw,
            **{f"{a}_ms_per_expert": 1e3 * b / len(keys) for a, b in t.items()},
            "decompress_gb_s": raw / t["decompress"] / 1e9 if t["decompress"] else None}


if __name__ == "__main__":
    import argparse
    import json

    ap = argparse.ArgumentParser(description="measure the expert codec on a checkpoint")
    ap.add_argument("model")
    ap.add_argument("--experts", type=int, default=16)
    a = ap.parse_args()
    print(json.dumps(measure(a.model, a.experts), indent=1))
