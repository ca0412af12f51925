"""Per-machine tuning of the decode kernels: rows per tile and software prefetch distance.

How a core streams weights depends on the microarchitecture more than on the instruction
set: on an AVX2 Zen a tile reading four rows side by side needed software prefetch to keep
up, while on an AVX-512 Zen 5 the same tile streamed at ~70% of a plain read and a tile
reading one row at a time (a single sequential stream) at ~100%. So the choice is measured
on the machine itself, once, and cached (``python -m sparsa.kernels tune``; ``make install``
runs it). Every choice gives bit-identical results (each output row sums in the same order),
so tuning only changes speed.

The cache is one JSON file (``~/.cache/sparsa/kernel_tuning.json`` or
``$SPARSA_KERNEL_TUNING_FILE``) keyed by CPU model, instruction-set flags, thread count and
the kernels' source hash, so a new machine kind or a kernel change gets its own entry.
``SPARSA_KERNEL_TUNING="int8=1:0,int4_short=4:16"`` overrides it (slot=rows:prefetch_rows,
a slot being a weight form, with ``_short`` for rows of at most 512 bytes).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import statistics
import time
from pathlib import Path
from types import ModuleType

import torch

from sparsa.kernels import cpu

log = logging.getLogger(__name__)

# weight form -> `Kind` in quant_tiles.h; each form has two tuning slots, rows longer than
# 512 bytes and short rows (`tuning_slot` there: 2 * kind + short). Fine-grained MoEs have
# short expert rows (Qwen3-MoE's down projections: 768 int8 inputs, 384 bytes as int4),
# where four rows side by side lie within 1-2 KB and stream like one.
FORMS = {"int8": 0, "int8_exact": 1, "int4": 2, "bf16": 3}
KINDS = {**{f: 2 * i for f, i in FORMS.items()},
         **{f"{f}_short": 2 * i + 1 for f, i in FORMS.items()}}
SHORT_ROW_BYTES = 512
# Where nothing is tuned for this machine: what the AVX-512 Zen 5 development box measured at
# 2 threads (BENCHMARKS.md, issue 15); `tune` keeps these unless another beats them by 3%.
DEFAULTS = {k: (1, 0) for k in KINDS} | {"int8": (1, 4), "int4": (1, 4), "int4_short": (4, 16),
                                         "bf16": (4, 16)}
# (rows per tile, prefetch distance in rows)
CHOICES: tuple[tuple[int, int], ...] = ((1, 0), (1, 4), (4, 16), (4, 0), (2, 8))
DEFAULT = CHOICES[0]
_FLAGS = cpu.KEY_FLAGS


def cache_file() -> Path:
    env = os.environ.get("SPARSA_KERNEL_TUNING_FILE")
    return Path(env) if env else Path.home() / ".cache" / "sparsa" / "kernel_tuning.json"


def cpu_info() -> dict:
    """CPU model and the instruction-set flags that matter to the kernels (/proc/cpuinfo: no
    subprocess at every kernel load)."""
    return cpu.cpu_info(_FLAGS, lscpu=False)


def _source_hash() -> str:
    from sparsa.kernels.build import _SOURCES

    h = hashlib.sha256()
    for src in sorted(_SOURCES):
        h.update(src.read_bytes())
    for hdr in sorted(_SOURCES[0].parent.glob("*.h")):
        h.update(hdr.read_bytes())
    return h.hexdigest()[:16]


def machine_key(threads: int | None = None) -> str:
    info = cpu_info()
    threads = threads or torch.get_num_threads()
    return f"{info['model']}|{','.join(info['flags'])}|threads={threads}|src={_source_hash()}"


def parse_override(text: str) -> dict[str, tuple[int, int]]:
    """'int8=1:0,int4=4:16' -> {'int8': (1, 0), 'int4': (4, 16)}; ValueError on bad input."""
    out: dict[str, tuple[int, int]] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        kind, sep, val = part.partition("=")
        rows, sep2, pf = val.partition(":")
        if not sep or not sep2 or kind not in KINDS:
            raise ValueError(f"SPARSA_KERNEL_TUNING entry {part!r}: want SLOT=ROWS:PREFETCH with "
                             f"SLOT one of {list(KINDS)}")
        try:
            choice = (int(rows), int(pf))
        except ValueError:
            raise ValueError(f"SPARSA_KERNEL_TUNING entry {part!r}: rows and prefetch must be "
                             "integers") from None
        if choice[0] not in (1, 2, 4) or not 0 <= choice[1] <= 64:
            raise ValueError(f"SPARSA_KERNEL_TUNING entry {part!r}: rows must be 1, 2 or 4 and "
                             "prefetch 0..64")
        out[kind] = choice
    return out


def _read_cache() -> dict:
    try:
        data = json.loads(cache_file().read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def cached(threads: int | None = None) -> dict[str, tuple[int, int]] | None:
    entry = _read_cache().get(machine_key(threads))
    if not isinstance(entry, dict):
        return None
    try:
        return {k: (int(v[0]), int(v[1])) for k, v in entry.get("choice", {}).items()
                if k in KINDS}
    except (TypeError, ValueError, IndexError):
        return None


def set_choices(ext: ModuleType, choices: dict[str, tuple[int, int]]) -> None:
    for kind, (rows, pf) in choices.items():
        ext.set_tuning(KINDS[kind], rows, pf)


def current(ext: ModuleType) -> dict[str, tuple[int, int]]:
    return {kind: tuple(ext.tuning(i)) for kind, i in KINDS.items()}


def apply(ext: ModuleType) -> dict[str, tuple[int, int]]:
    """Set the kernels' tuning: the environment override, else this machine's cached
    choice, else the defaults. Returns what is in use."""
    choices = dict(DEFAULTS)
    mine = cached()
    choices.update(mine or {})
    env = os.environ.get("SPARSA_KERNEL_TUNING", "").strip()
    if env:
        choices.update(parse_override(env))
    set_choices(ext, choices)
    source = ("SPARSA_KERNEL_TUNING" if env else "tuned on this machine" if mine
              else "defaults: run `python -m sparsa.kernels tune` to measure this machine")
    log.info("kernel tiles (rows per tile, prefetch rows) %s (%s)",
             ", ".join(f"{k} {r}:{pf}" for k, (r, pf) in choices.items()
                       if k in ("int8", "int4", "bf16")), source)
    return choices


# ---- measuring ------------------------------------------------------------------------------

def _operands(kind: str, nbytes: int, n: int, k: int, gen: torch.Generator) -> list:
    kind = kind.removesuffix("_short")
    """Enough [n, k] weights of one form to hold `nbytes` (more than the last-level cache, so
    every pass streams from DRAM). Random bits: the speed does not depend on the values."""
    from sparsa.kernels.layout import int4_padded_k, pad_to

    mats = []
    if kind in ("int8", "int8_exact"):
        kp = pad_to(k, 128)
        for _ in range(max(1, nbytes // (n * kp))):
            mats.append((torch.randint(-127, 128, (n, kp), dtype=torch.int8, generator=gen),
                         torch.rand(n, generator=gen) * 1e-3))
    elif kind == "int4":
        kp = int4_padded_k(k, 64)
        for _ in range(max(1, nbytes // (n * kp // 2))):
            mats.append((torch.randint(0, 256, (n, kp // 2), dtype=torch.uint8, generator=gen),
                         (torch.rand(n, 2, kp // 64, generator=gen) * 1e-2).to(torch.bfloat16)))
    else:
        for _ in range(max(1, nbytes // (n * k * 2))):
            mats.append((torch.randn(n, pad_to(k, 8), generator=gen).to(torch.bfloat16),))
    return mats


def _call(kind: str, x: torch.Tensor, op: tuple) -> None:
    from sparsa.kernels import ops

    kind = kind.removesuffix("_short")
    if kind == "int8":
        ops.int8_gemm(x, *op)
    elif kind == "int8_exact":
        ops.int8_gemm(x, *op, exact=True)
    elif kind == "int4":
        ops.int4_gemm(x, op[0], op[1], 64)
    else:
        ops.bf16_gemm(x, op[0])


# GEMV shapes (rows, inputs) each slot is measured on: attention / dense-expert rows, and
# fine-grained expert rows (384 inputs: 384 bytes in int8, 192 in int4, 768 in bf16 (a long row
# there: bf16's short slot gets 192 inputs))
SHAPES = {"long": ((4096, 1024), (2048, 4096)), "short": ((16384, 384),),
          "bf16_short": ((16384, 192),)}


def _shapes(slot: str, shapes) -> tuple:
    if shapes is not None:
        return shapes
    if slot == "bf16_short":
        return SHAPES["bf16_short"]
    return SHAPES["short" if slot.endswith("_short") else "long"]


def gemv_sets(kind: str, gen: torch.Generator, shapes=None, nbytes: int = 96 << 20) -> list:
    """[(weights of one shape, x [1, K])] for a tuning slot: more bytes than the last-level
    cache, so a pass streams from DRAM."""
    return [(_operands(kind, nbytes, n, k, gen), torch.randn(1, k, generator=gen))
            for n, k in _shapes(kind, shapes)]


def gemv_pass(kind: str, sets: list) -> float:
    """GB/s of weights of one batch-1 GEMV pass over `sets` (`gemv_sets`)."""
    total = sum(t.numel() * t.element_size() for ops_, _ in sets for op in ops_ for t in op)
    t0 = time.perf_counter()
    for ops_, x in sets:
        for op in ops_:
            _call(kind, x, op)
    return total / (time.perf_counter() - t0) / 1e9


def measure(ext: ModuleType,
            kinds: tuple[str, ...] = ("int8", "int8_short", "int4", "int4_short", "bf16",
                                      "bf16_short"),
            choices: tuple[tuple[int, int], ...] = CHOICES, shapes=None,
            nbytes: int = 96 << 20, rounds: int = 5) -> dict[str, dict[tuple[int, int], float]]:
    """Median GB/s of batch-1 GEMVs per tuning slot and choice, choices interleaved round by
    round (so a slow phase of the machine hits them all)."""
    gen = torch.Generator().manual_seed(0)
    rates: dict[str, dict[tuple[int, int], list[float]]] = {}
    before = current(ext)
    try:
        for kind in kinds:
            sets = gemv_sets(kind, gen, shapes, nbytes)
            per = rates.setdefault(kind, {})
            for _ in range(rounds):
                for choice in choices:
                    ext.set_tuning(KINDS[kind], *choice)
                    per.setdefault(choice, []).append(gemv_pass(kind, sets))
    finally:
        set_choices(ext, before)
    return {k: {c: statistics.median(v) for c, v in per.items()} for k, per in rates.items()}


def tune(ext: ModuleType, save: bool = True, **kw) -> tuple[dict, dict]:
    """Measure, keep the fastest choice per slot (the default unless another beats it by
    more than 3%, so noise does not flip it), cache it for this machine and apply it."""
    rates = measure(ext, **kw)
    choice = {}
    for kind, per in rates.items():
        best = max(per, key=per.get)
        base = DEFAULTS[kind]
        choice[kind] = best if per[best] > 1.03 * per.get(base, 0.0) else base
    if save:
        data = _read_cache()
        data[machine_key()] = {"choice": {k: list(v) for k, v in choice.items()},
                               "gbps": {k: {f"{c[0]}:{c[1]}": round(r, 2) for c, r in per.items()}
                                        for k, per in rates.items()},
                               "cpu": cpu_info()["model"], "date": time.strftime("%Y-%m-%d")}
        path = cache_file()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=1))
        tmp.replace(path)
    set_choices(ext, choice)
    return choice, rates
