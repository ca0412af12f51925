"""Native CPU kernels (AVX2/FMA), built on first use with torch's C++ extension loader.

`available()` says whether they can be used; everything that calls them keeps a pure-PyTorch
path for when they cannot (no compiler, no AVX2, a failed build, a non-CPU device, or
``SPARSA_KERNELS=0``). The build result is cached under ``$TORCH_EXTENSIONS_DIR`` or
``~/.cache/sparsa/torch_extensions`` (torch rebuilds when the source or flags change), and
``python -m sparsa.kernels build`` builds it ahead of time (``make install`` does).
"""

from sparsa.kernels import tuning
from sparsa.kernels.build import (
    available,
    int8_dot_isa,
    load,
    on_load,
    unavailable_reason,
)

on_load(tuning.apply)  # this machine's cached choice (rows per tile, prefetch)

__all__ = ["available", "int8_dot_isa", "load", "on_load", "unavailable_reason"]
