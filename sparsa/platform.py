"""What the machine has: probes that configs and the engine ask, kept out of the configs."""

from __future__ import annotations

import os


def physical_cores() -> int:
    """Physical CPU cores (psutil), else the logical count: the default thread count."""
    try:
        import psutil

        n = psutil.cpu_count(logical=False)
        if n:
            return n
    except Exception:  # psutil missing or unable to tell
        pass
    return os.cpu_count() or 1


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


_cpu_bf16: bool | None = None


def cpu_has_bf16_dot() -> bool:
    """True when this CPU has bf16 dot-product instructions (AVX-512 BF16 or AMX), where a
    bf16 GEMM is several times faster than fp32; without them it is ~600x slower.
    ``SPARSA_BF16_GEMM=0|1`` overrides the check."""
    global _cpu_bf16
    env = os.environ.get("SPARSA_BF16_GEMM")
    if env in ("0", "1"):
        return env == "1"
    if _cpu_bf16 is None:
        try:
            with open("/proc/cpuinfo") as f:
                flags = next((ln for ln in f if ln.startswith("flags")), "").split()
            _cpu_bf16 = "avx512_bf16" in flags or "amx_bf16" in flags
        except OSError:
            _cpu_bf16 = False
    return _cpu_bf16
