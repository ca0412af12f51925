"""This CPU's model name and the instruction-set flags that matter to the kernels, as the
kernels' tuning cache keys them and the benchmarks report them."""

from __future__ import annotations

import subprocess

# "amx" stands for any amx_* flag
KEY_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16",
             "amx")


def parse_cpu(lscpu: str = "", cpuinfo: str = "", keys: tuple[str, ...] = KEY_FLAGS) -> dict:
    """{"model": CPU model name, "flags": the `keys` present} from `lscpu` output or, when
    that lacks them, /proc/cpuinfo text."""
    model = flags = None
    for text in (lscpu, cpuinfo):
        for line in text.splitlines():
            k, sep, v = line.partition(":")
            if not sep:
                continue
            k = k.strip().lower()
            if model is None and k == "model name" and v.strip():
                model = v.strip()
            elif flags is None and k == "flags":
                flags = set(v.split())
    flags = flags or set()
    present = [f for f in keys
               if f in flags or (f == "amx" and any(x.startswith("amx") for x in flags))]
    return {"model": model or "unknown", "flags": present}


def cpu_info(keys: tuple[str, ...] = KEY_FLAGS, lscpu: bool = True) -> dict:
    """parse_cpu of this machine: lscpu (unless `lscpu=False`: no subprocess), falling back
    to /proc/cpuinfo."""
    out = ""
    if lscpu:
        try:
            out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        except (OSError, subprocess.SubprocessError):
            out = ""
    try:
        with open("/proc/cpuinfo") as f:
            cpuinfo = f.read(200_000)
    except OSError:
        cpuinfo = ""
    return parse_cpu(out, cpuinfo, keys)
