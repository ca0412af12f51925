"""The quantized expert store: offloaded experts quantized once, kept on disk, read per load.

With offloading and `quantization="int8" | "int4"`, the cache holds quantized experts, and
reading a full-precision expert only to quantize it on every load would cost the disk reads
and the quantization per miss. So the first load streams every routed expert from the
checkpoint (one at a time: memory stays at a few experts), quantizes it exactly as the
all-resident model does (`QuantizedExperts` over a one-expert `FusedExperts`, so the weights
and hence the outputs are the same), and writes the result to a store; later loads only
check it and read from it.

Layout: one safetensors file per MoE layer, `layer_{l}.safetensors`, in a directory per
(checkpoint, scheme) under `store_root()`. Each expert's tensors (`{e}.w13_q`, `{e}.w13_s`,
... as `QuantizedExperts.BUFFERS` names them, wider dtypes first so each stays aligned) are
contiguous and padded (a `{e}.pad` tensor) to 4 KiB, and the data starts 4 KiB-aligned: one
coalesced O_DIRECT read of exactly the expert's pages fetches it (`ExpertReader`, layout
"packed"). `store.json`, written last, lists what the files must hold; files and manifest
are written to temporary names and renamed, so a crash leaves no half store in use.

The directory name is a hash of the checkpoint's identity (every shard's path, size and
mtime), the scheme (method, group size, clip search), the compute dtype and the expert
shapes: a changed checkpoint gets a new store (the old one is left for the user to delete).

A store that is incomplete, truncated or does not match its manifest is rebuilt, with a
warning. Corruption inside the data that leaves the sizes intact (flipped bytes) is caught
only where it makes a scale non-finite (`ExpertReader`'s check, a CheckpointError at use),
as for the checkpoint itself: there is no checksum, which would cost a pass over every
expert per load.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import struct
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sparsa.layers.quantization import QuantConfig, QuantizedExperts
from sparsa.loader.safetensors_reader import (
    _DTYPES,
    CheckpointError,
    TensorLocation,
    _read_header,
)
from sparsa.offload.expert_reader import ExpertLocation, ExpertReader, PackedLocation

log = logging.getLogger(__name__)

STORE_VERSION = 1
STORE_ENV = "SPARSA_EXPERT_STORE"
_ALIGN = 4096
_MANIFEST = "store.json"
_ST_NAMES = {v: k for k, v in _DTYPES.items()}


def store_root(store_dir: str | os.PathLike | None = None) -> Path:
    """Where stores live: `store_dir`, else $SPARSA_EXPERT_STORE, else
    ~/.cache/sparsa/experts."""
    root = store_dir or os.environ.get(STORE_ENV) or Path.home() / ".cache" / "sparsa" / "experts"
    return Path(root).expanduser()


def store_identity(files: list[Path], qc: QuantConfig, dtype: torch.dtype, hidden_size: int,
                   intermediate_size: int) -> dict:
    """What a store's contents depend on (its directory name is a hash of this)."""
    return {"version": STORE_VERSION, "shards": shard_identity(files), "method": qc.method,
            "group_size": qc.group_size if qc.method == "int4" else None,
            "clip_search": qc.clip_search if qc.method == "int4" else None,
            "dtype": str(dtype), "hidden_size": hidden_size,
            "intermediate_size": intermediate_size}


def shard_identity(files: list[Path]) -> list:
    """Every checkpoint shard's path, size and mtime: a changed checkpoint gets a new store."""
    shards = []
    for f in sorted(files):
        st = f.stat()
        shards.append([str(f.resolve()), st.st_size, st.st_mtime_ns])
    return shards


@dataclass
class QuantizedStore:
    """An opened quantized store: where each expert's tensors are, and how to make a block
    of them."""

    path: Path
    config: QuantConfig
    hidden_size: int
    intermediate_size: int
    names: tuple[str, ...]  # the buffers of each expert, in file order
    locations: dict[tuple[int, int], PackedLocation] = field(default_factory=dict)
    expert_bytes: int = 0  # one expert's tensors (padding excluded)
    built: bool = False  # written by this load
    build_seconds: float = 0.0

    def assemble(self, raw: tuple[torch.Tensor, ...]) -> QuantizedExperts:
        """A one-expert `QuantizedExperts` over the tensors read (views of the read buffer,
        which they keep alive while the cache holds the block)."""
        return QuantizedExperts.from_buffers(
            self.config, self.hidden_size, self.intermediate_size,
            {n: t.unsqueeze(0) for n, t in zip(self.names, raw)})

    def report(self) -> dict:
        return {"expert_store": str(self.path), "expert_store_built": self.built,
                "expert_store_build_s": self.build_seconds,
                "quantization": self.config.method}


def quantize_expert(gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor,
                    qc: QuantConfig, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """One expert's quantized buffers (without the expert dimension), computed as the
    all-resident model computes them: its weights loaded into a `FusedExperts` of the
    compute dtype, then `QuantizedExperts`."""
    from sparsa.layers.moe import FusedExperts

    inter, hidden = gate.shape
    with torch.device("meta"):
        fe = FusedExperts(1, hidden, inter)
    fe.w13 = torch.nn.Parameter(torch.empty(1, hidden, 2 * inter, dtype=dtype),
                                requires_grad=False)
    fe.w2 = torch.nn.Parameter(torch.empty(1, inter, hidden, dtype=dtype), requires_grad=False)
    for which, t in (("gate", gate), ("up", up), ("down", down)):
        fe.load_expert(0, which, t)
    qe = QuantizedExperts(fe, qc)
    return {n: getattr(qe, n)[0].contiguous() for n in QuantizedExperts.BUFFERS[qc.method]}


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    return memoryview(t.contiguous().view(torch.uint8).numpy()).cast("B")


def stream_experts(reader: ExpertReader, keys: list[tuple[int, int]],
                   convert: Callable[[tuple[torch.Tensor, ...]], Any],
                   desc: str = "Building expert store") -> Iterator[tuple]:
    """(key, convert(the expert's weights)) in key order; the next expert is read on a thread
    while this one is converted (two full-precision experts in memory at most). A progress
    bar on a terminal: a first build reads every expert of the checkpoint (minutes)."""
    from tqdm import tqdm

    with ThreadPoolExecutor(1, thread_name_prefix="sparsa-store-read") as pool, \
            tqdm(total=len(keys), desc=desc, unit=" experts", disable=None, leave=False) as bar:
        nxt = pool.submit(reader.load, *keys[0]) if keys else None
        for i, key in enumerate(keys):
            w = nxt.result()
            nxt = pool.submit(reader.load, *keys[i + 1]) if i + 1 < len(keys) else None
            q = convert(w)
            del w
            bar.update(1)  # before the yield: a caller stops at the last expert
            yield key, q


def expert_pad(spec: list[tuple[str, torch.dtype, tuple]]) -> int:
    """Bytes after an expert's tensors that make its span a multiple of 4 KiB."""
    return -sum(dt.itemsize * math.prod(shape) for _, dt, shape in spec) % _ALIGN


def layer_header(layer: int, blocks: list[tuple[int, list[tuple[str, torch.dtype, tuple]]]],
                 fmt: str = "sparsa-quantized-experts", min_size: int = 0) -> bytes:
    """The safetensors header of one layer's file: each (expert, its tensors) in `blocks`
    padded (`{e}.pad`) to 4 KiB, the header itself padded so the data starts 4 KiB-aligned
    and at least `min_size` bytes long."""
    header: dict = {"__metadata__": {"format": fmt, "version": str(STORE_VERSION),
                                     "layer": str(layer)}}
    off = 0
    for e, spec in blocks:
        pad = expert_pad(spec)
        for name, dt, shape in spec:
            n = dt.itemsize * math.prod(shape)
            header[f"{e}.{name}"] = {"dtype": _ST_NAMES[dt], "shape": list(shape),
                                     "data_offsets": [off, off + n]}
            off += n
        if pad:
            header[f"{e}.pad"] = {"dtype": "U8", "shape": [pad], "data_offsets": [off, off + pad]}
            off += pad
    raw = json.dumps(header, separators=(",", ":")).encode()
    n = max(-(-(8 + len(raw)) // _ALIGN) * _ALIGN, min_size) - 8
    return struct.pack("<Q", n) + raw + b" " * (n - len(raw))


def _pid_alive(pid: str) -> bool:
    try:
        os.kill(int(pid), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True


def write_atomic(path: Path, chunks: Iterator[bytes | memoryview],
                 header: Callable[[], bytes] | None = None, header_size: int = 0) -> int:
    """Write `chunks` to a temporary name, then rename it to `path`; returns the size.
    `header`: called after the chunks, its result (exactly `header_size` bytes, reserved
    before them) goes at the start of the file (a header that depends on what follows)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.seek(header_size)
            for c in chunks:
                f.write(c)
            size = f.tell()
            if header is not None:
                h = header()
                if len(h) != header_size:
                    raise AssertionError(f"header of {len(h)} bytes, {header_size} reserved")
                f.seek(0)
                f.write(h)
            f.flush()
            os.fsync(f.fileno())
            # what was just written is read back with O_DIRECT: keep it out of the page cache
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return size


def build_store(path: Path, identity: dict, reader: ExpertReader,
                keys: list[tuple[int, int]], qc: QuantConfig, dtype: torch.dtype) -> None:
    """Quantize every expert in `keys` (read through `reader`, native layout) into `path`."""
    prepare_dir(path)
    stream = stream_experts(reader, sorted(keys), lambda w: quantize_expert(*w, qc, dtype),
                            f"Quantizing experts to {qc.method}")
    first = next(stream, None)
    if first is None:
        raise ValueError("no experts to store")
    spec = sorted(((n, t.dtype, tuple(t.shape)) for n, t in first[1].items()),
                  key=lambda s: -s[1].itemsize)  # wider first: every tensor stays aligned
    pending = [first]
    layers: dict[int, list[int]] = {}
    for layer, e in sorted(keys):
        layers.setdefault(layer, []).append(e)
    files = {}
    pad = expert_pad(spec)
    for layer, experts in layers.items():
        header = layer_header(layer, [(e, spec) for e in experts])

        def chunks(layer=layer, experts=experts, header=header, pad=pad):
            yield header
            for e in experts:
                key, q = pending.pop() if pending else next(stream)
                if key != (layer, e):
                    raise AssertionError(f"store build out of order: {key} != {(layer, e)}")
                for name, dt, shape in spec:
                    t = q[name]
                    if t.dtype != dt or tuple(t.shape) != shape:
                        raise ValueError(f"expert {key} {name}: {t.dtype} {tuple(t.shape)}, "
                                         f"the store holds {dt} {shape}")
                    yield _tensor_bytes(t)
                if pad:
                    yield bytes(pad)

        name = f"layer_{layer}.safetensors"
        files[str(layer)] = {"name": name, "size": write_atomic(path / name, chunks()),
                             "experts": experts}
    write_manifest(path, {"identity": identity, "names": [s[0] for s in spec],
                          "dtypes": [_ST_NAMES[s[1]] for s in spec],
                          "shapes": [list(s[2]) for s in spec], "files": files})


def prepare_dir(path: Path) -> None:
    """Make `path` ready for a build: no manifest until every file is in place (a build cut
    short is never taken as valid), no temporaries of builds that died."""
    path.mkdir(parents=True, exist_ok=True)
    (path / _MANIFEST).unlink(missing_ok=True)
    for tmp in path.glob(".*.tmp"):  # (a live build keeps its own)
        if not _pid_alive(tmp.name.rsplit(".", 2)[-2]):
            tmp.unlink(missing_ok=True)


def write_manifest(path: Path, manifest: dict) -> None:
    write_atomic(path / _MANIFEST, iter([json.dumps(manifest, indent=1).encode()]))


def read_manifest(path: Path, identity: dict) -> dict:
    """The manifest of the store at `path`, if it describes `identity`."""
    mpath = path / _MANIFEST
    if not mpath.exists():
        raise CheckpointError(f"{mpath} is missing (store not built, or its build was cut)")
    try:
        m = json.loads(mpath.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{mpath}: malformed manifest ({e!r})") from None
    if not isinstance(m, dict) or m.get("identity") != identity:
        raise CheckpointError(f"{mpath} describes another checkpoint or scheme")
    return m


def layer_files(path: Path, files: dict) -> Iterator[tuple[int, list[int], Path, dict, int]]:
    """(layer, experts, file, header, data start) of each file a manifest lists, each
    checked to exist with the size it had when written."""
    try:
        for info in files.values():
            f = path / info["name"]
            if not f.exists() or f.stat().st_size != info["size"]:
                raise CheckpointError(f"{f}: missing or truncated (expected {info['size']} "
                                      f"bytes)")
            header, data_start = _read_header(f)
            yield int(Path(info["name"]).stem.split("_")[1]), list(info["experts"]), f, \
                header, data_start
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise CheckpointError(f"{path / _MANIFEST}: malformed manifest ({e!r})") from None


def _open(path: Path, identity: dict, qc: QuantConfig, hidden: int, inter: int,
          keys: set[tuple[int, int]]) -> QuantizedStore:
    """The store at `path`, checked against its manifest; CheckpointError says what is
    wrong (missing, truncated, inconsistent)."""
    m = read_manifest(path, identity)
    try:
        names = tuple(m["names"])
        spec = [(n, _DTYPES[d], tuple(s)) for n, d, s in zip(names, m["dtypes"], m["shapes"])]
        files = m["files"]
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path / _MANIFEST}: malformed manifest ({e!r})") from None
    store = QuantizedStore(path, qc, hidden, inter, names)
    for layer, experts, f, header, data_start in layer_files(path, files):
        for e in experts:
            parts = []
            for n, dt, shape in spec:
                t = header.get(f"{e}.{n}")
                if t is None or _DTYPES.get(t["dtype"]) != dt or tuple(t["shape"]) != shape:
                    raise CheckpointError(f"{f}: tensor {e}.{n} missing or not {dt} {shape}")
                b, end = t["data_offsets"]
                parts.append(TensorLocation(f, data_start + b, end - b, dt, shape))
            store.locations[(layer, e)] = PackedLocation(names, tuple(parts))
    if set(store.locations) != keys:
        raise CheckpointError(f"{path}: holds other experts than the checkpoint's")
    store.expert_bytes = sum(dt.itemsize * math.prod(s) for _, dt, s in spec)
    return store


def open_store(ckpt_files: list[Path], locations: dict[tuple[int, int], ExpertLocation],
               qc: QuantConfig, dtype: torch.dtype, hidden: int, inter: int,
               store_dir: str | os.PathLike | None = None, direct_io: bool = True,
               model_name: str = "model") -> QuantizedStore:
    """The quantized store of these experts: reused when a valid one exists, else built
    (first load, or the old one was incomplete or damaged: rebuilt with a warning)."""
    identity = store_identity(ckpt_files, qc, dtype, hidden, inter)
    scheme = qc.method + (f"-g{qc.group_size}" if qc.method == "int4" else "")
    return open_or_build(
        store_path(store_dir, model_name, scheme, identity), "quantized", locations, dtype,
        direct_io, lambda path: _open(path, identity, qc, hidden, inter, set(locations)),
        lambda path, reader: build_store(path, identity, reader, list(locations), qc, dtype),
        log)


def store_path(store_dir: str | os.PathLike | None, model_name: str, scheme: str,
               identity: dict) -> Path:
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    return store_root(store_dir) / f"{model_name}-{scheme}-{digest}"


def open_or_build(path: Path, kind: str, locations: dict[tuple[int, int], ExpertLocation],
                  dtype: torch.dtype, direct_io: bool, open_fn: Callable[[Path], Any],
                  build_fn: Callable[[Path, ExpertReader], None], logger: logging.Logger):
    """open_fn(path) if that succeeds, else build_fn(path, a reader of the checkpoint's
    experts) and then open_fn(path), marked built."""
    if path.exists():
        try:
            return open_fn(path)
        except CheckpointError as e:
            logger.warning("%s expert store unusable, rebuilding it: %s", kind, e)
    t0 = time.perf_counter()
    reader = ExpertReader(locations, dtype, direct_io, "cpu", layout="native")
    reader.set_pool_slabs(3)  # reads into reused buffers (the two in memory, one spare)
    try:
        build_fn(path, reader)
    except OSError as e:
        # (a full disk, most likely: leave no partial store taking its space)
        shutil.rmtree(path, ignore_errors=True)
        raise OSError(f"cannot write the {kind} expert store {path}: {e} (set "
                      f"{STORE_ENV} or offload_store_dir to a directory with room for "
                      f"{len(locations)} {kind} experts)") from e
    finally:
        reader.close()
    store = open_fn(path)
    store.built = True
    store.build_seconds = time.perf_counter() - t0
    logger.info("wrote %d %s experts into %s in %.1f s", len(locations), kind, path,
                store.build_seconds)
    return store


ExpertStore = QuantizedStore  # (its earlier name)
