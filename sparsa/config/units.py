"""Parsing the units settings are written in: dtypes, sizes, budgets."""

from __future__ import annotations

import torch

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype | None:
    """Map a user dtype name to a torch dtype; None means "auto"."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return None
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of auto, {', '.join(_DTYPES)}; got {dtype!r}")
    return _DTYPES[dtype]


def parse_size(size: str | float) -> int:
    """Parse '4GiB', '512MB', '1.5e9B' or a number of bytes (an int or float; a string needs
    its unit: '2' is far more often a mistyped '2GiB' than two bytes)."""
    if isinstance(size, (int, float)):
        return int(size)
    s = size.strip()
    units = {
        "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40,
        "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "b": 1,
    }
    low = s.lower()
    for unit, mult in units.items():
        if low.endswith(unit):
            return int(float(low[: -len(unit)]) * mult)
    try:
        float(s)
    except ValueError:
        raise ValueError(f"cannot parse size {size!r}; use e.g. '4GiB' or '512MB'") from None
    raise ValueError(f"size {size!r} needs a unit: e.g. '{s}GiB' or '{s}MB' ('{s}B' for bytes)")


def budget(m: str | int, total: int, name: str) -> int:
    """Bytes from a size ("4GiB", a number) or a percentage of `total` ("25%")."""
    if isinstance(m, str) and m.strip().endswith("%"):
        try:
            frac = float(m.strip()[:-1]) / 100
        except ValueError:
            raise ValueError(f"cannot parse {name} {m!r}") from None
        if not 0 < frac <= 1:
            raise ValueError(f"{name} percentage must be in (0, 100]; got {m!r}")
        return int(total * frac)
    n = parse_size(m)
    if n <= 0:
        raise ValueError(f"{name} must be positive; got {m!r}")
    return n
