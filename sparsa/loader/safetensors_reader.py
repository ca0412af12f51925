"""Streaming reader for (sharded) safetensors checkpoints.

Tensors are read with positional file reads into a buffer of one tensor at a time and
copied into the model's (possibly fused) parameters. Memory-mapping the whole file would
count every touched page towards RSS until the map is closed, doubling peak memory for
a single-shard checkpoint; streaming keeps the peak at the weights plus one tensor.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Container, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}
_MAX_HEADER = 100 * 1024 * 1024
_FP8_HINT = "; an FP8 checkpoint needs its bf16 or fp16 original (or a GGUF of it)"


class CheckpointError(ValueError):
    """A checkpoint file is missing, truncated or malformed."""


@dataclass(frozen=True)
class TensorLocation:
    """Where one tensor's bytes are: for readers that fetch it later (expert offloading)."""

    path: Path
    offset: int  # absolute byte offset in the file
    nbytes: int
    dtype: torch.dtype
    shape: tuple[int, ...]


def _read_header(path: Path) -> tuple[dict, int]:
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise CheckpointError(f"{path}: too short to be a safetensors file")
        (n,) = struct.unpack("<Q", raw)
        if n > _MAX_HEADER or 8 + n > size:
            raise CheckpointError(f"{path}: corrupt safetensors header (length {n})")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path}: corrupt safetensors header: {e}") from None
    header.pop("__metadata__", None)
    data_start = 8 + n
    for name, info in header.items():
        kind = info.get("dtype") if isinstance(info, dict) else None
        if isinstance(kind, str) and kind not in _DTYPES:
            raise CheckpointError(
                f"{path}: tensor {name!r} has dtype {kind}, which Sparsa does not load "
                f"(supported: {', '.join(_DTYPES)}){_FP8_HINT if kind.startswith('F8') else ''}")
        try:
            begin, end = info["data_offsets"]
            dtype = _DTYPES[info["dtype"]]
            shape = [int(d) for d in info["shape"]]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: bad entry for tensor {name!r}") from None
        numel = 1
        for d in shape:
            numel *= d
        if end - begin != numel * dtype.itemsize or data_start + end > size:
            raise CheckpointError(
                f"{path}: tensor {name!r} is truncated or inconsistent with its shape "
                f"(file size {size}, needs {data_start + end})"
            )
    return header, data_start


class SafetensorsCheckpoint:
    """All tensors of a local HF model directory (single file or sharded with an index)."""

    def __init__(self, model_dir: str | os.PathLike):
        self.dir = Path(model_dir)
        index = self.dir / "model.safetensors.index.json"
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise CheckpointError(f"{index}: malformed index ({e})") from None
            files = sorted(set(weight_map.values()))
            missing = [f for f in files if not (self.dir / f).exists()]
            if missing:
                raise CheckpointError(f"{self.dir}: shard files listed in the index are missing: "
                                      f"{', '.join(missing)}")
            self.files = [self.dir / f for f in files]
        else:
            self.files = sorted(self.dir.glob("*.safetensors"))
        if not self.files:
            others = [p.name for p in self.dir.glob("*.bin")] + [p.name for p in
                                                                  self.dir.glob("*.pt")]
            hint = (f" (found {', '.join(others)}: pickle checkpoints are not loaded for safety;"
                    " convert them to safetensors)") if others else ""
            raise CheckpointError(f"no *.safetensors files in {self.dir}{hint}")
        self._headers = {p: _read_header(p) for p in self.files}

    def names(self) -> list[str]:
        return [n for header, _ in self._headers.values() for n in header]

    def total_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.files)

    def bytes_as(self, dtype: torch.dtype) -> int:
        """The tensors' size with floating-point ones in `dtype` (what loading them into a
        model of that dtype allocates), from the headers alone."""
        total = 0
        for header, _ in self._headers.values():
            for info in header.values():
                dt = _DTYPES[info["dtype"]]
                total += math.prod(info["shape"]) * (dtype.itemsize if dt.is_floating_point
                                                     else dt.itemsize)
        return total

    def dtypes(self) -> set[torch.dtype]:
        return {_DTYPES[i["dtype"]] for h, _ in self._headers.values() for i in h.values()}

    def locate(self, name: str) -> TensorLocation:
        for path, (header, data_start) in self._headers.items():
            info = header.get(name)
            if info is not None:
                begin, end = info["data_offsets"]
                return TensorLocation(path, data_start + begin, end - begin,
                                      _DTYPES[info["dtype"]], tuple(info["shape"]))
        raise CheckpointError(f"tensor {name!r} is not in the checkpoint {self.dir}")

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        return self.tensors()

    def tensors(self, skip: Container[str] = ()) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, tensor) in file order; names in `skip` are not read."""
        for path, (header, data_start) in self._headers.items():
            with open(path, "rb", buffering=0) as f:
                for name, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
                    if name in skip:
                        continue
                    begin, end = info["data_offsets"]
                    dtype = _DTYPES[info["dtype"]]
                    buf = bytearray(end - begin)
                    f.seek(data_start + begin)
                    if f.readinto(buf) != len(buf):
                        raise CheckpointError(f"{path}: short read for tensor {name!r}")
                    if not buf:
                        yield name, torch.empty(info["shape"], dtype=dtype)
                        continue
                    yield name, torch.frombuffer(buf, dtype=dtype).view(info["shape"])
