"""Optional dependencies: what only some commands need comes as a pip extra, and a missing
one is named in the error instead of surfacing as a bare ImportError."""

from __future__ import annotations

import importlib
from types import ModuleType


class MissingExtra(ImportError):
    """A feature's optional dependency is not installed."""


def require(module: str, extra: str, feature: str) -> ModuleType:
    """Import `module`, or raise MissingExtra saying which extra provides it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise MissingExtra(f"{feature} needs the '{module}' package: pip install "
                           f"'sparsa[{extra}]'") from e
