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
