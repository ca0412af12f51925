"""Building and loading the native kernels (the package docstring says when and where)."""


from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from types import ModuleType

import torch

logger = logging.getLogger(__name__)

_NAME = "sparsa_quant_kernels"
_SOURCES = [Path(__file__).parent / "csrc" / f for f in ("quant_kernels.cpp", "decode_ops.cpp",
                                                        "paged_attention.cpp", "w8a8.cpp",
                                                        "moe_w8a8.cpp")]
# -mavx2/-mfma rather than -march=native: the cache may be shared by machines of one kind,
# and nothing here needs more than AVX2 + FMA.
_CFLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp"]
# at::parallel_for is expanded in our translation unit (`#pragma omp parallel` in ATen's
# header), so it needs -fopenmp; libgomp.so.1 resolves to the copy torch already loaded,
# so both share one thread pool and torch.set_num_threads applies.
_LDFLAGS = ["-fopenmp"]

_lock = threading.Lock()
# the int8 dot-product instructions the kernels picked at build time (`vnni()`)
_ISA = {0: "AVX2", 1: "AVX-512 VNNI", 2: "AVX-VNNI"}
# called with the module once it is loaded (the package registers tuning.apply: this
# machine's cached choice of rows per tile and prefetch), so the loader imports no tuner
_on_load: list = []
_module: ModuleType | None = None
_tried = False
_reason = ""
_said_off = False


def _build_dir() -> Path:
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    base = Path(root) if root else Path.home() / ".cache" / "sparsa" / "torch_extensions"
    return base / f"torch{torch.__version__.split('+')[0]}" / _NAME


def _cpu_ok() -> str:
    """Empty if this CPU can run the kernels, else why not."""
    cap = torch.backends.cpu.get_cpu_capability()
    if cap not in ("AVX2", "AVX512", "AVX512_BF16", "AMX", "AVX512_VNNI"):
        return f"CPU capability {cap} has no AVX2"
    return ""


def load(verbose: bool = False, force: bool = False) -> ModuleType | None:
    """The compiled module, building it if needed; None (and a one-time info log) if the
    kernels cannot be used. `force` builds even when SPARSA_KERNELS=0."""
    global _module, _tried, _reason, _said_off
    if not force and os.environ.get("SPARSA_KERNELS", "1").strip() in ("0", "false", "off"):
        if not _said_off:  # once: this runs at every decode step
            _said_off = True
            logger.info("native kernels disabled by SPARSA_KERNELS; using PyTorch paths")
        return None
    if _tried:
        return _module
    with _lock:
        if _tried:
            return _module
        _reason = _cpu_ok()
        if not _reason:
            try:
                from torch.utils import cpp_extension

                build_dir = _build_dir()
                build_dir.mkdir(parents=True, exist_ok=True)
                _module = cpp_extension.load(
                    name=_NAME, sources=[str(s) for s in _SOURCES], extra_cflags=_CFLAGS,
                    extra_ldflags=_LDFLAGS, build_directory=str(build_dir), verbose=verbose)
            except Exception as exc:  # no compiler / ninja, or a compile error
                _reason = f"build failed: {type(exc).__name__}: {str(exc).strip()[-2000:]}"
                _module = None
        if _module is None:
            logger.info("native kernels unavailable (%s); using PyTorch paths", _reason)
        else:
            logger.info("native CPU kernels loaded (AVX2/FMA build; int8 dot products: %s)",
                        _ISA.get(int(_module.vnni()), "AVX2"))
            for hook in _on_load:
                hook(_module)
        _tried = True
    return _module


def on_load(hook) -> None:
    """Call `hook(module)` when the kernels are loaded (registered before first use)."""
    _on_load.append(hook)


def available() -> bool:
    """True when the native kernels are built and enabled (SPARSA_KERNELS unset or 1)."""
    return load() is not None


def unavailable_reason() -> str:
    """Why `available()` is False ('' when it is True or was not asked yet)."""
    if os.environ.get("SPARSA_KERNELS", "1").strip() in ("0", "false", "off"):
        return "disabled by SPARSA_KERNELS=0"
    return _reason


def int8_dot_isa() -> str:
    """The instructions the int8 decode kernels use on this CPU ("" when not built)."""
    mod = load()
    if mod is None:
        return ""
    return _ISA.get(int(mod.vnni()), "AVX2")
