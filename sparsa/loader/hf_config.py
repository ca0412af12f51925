"""Reading an HF config whose field names differ between architectures."""

from __future__ import annotations

from typing import Any


def config_value(hf_config: Any, *names: str) -> Any:
    """The first of `names` that the config sets to something other than None."""
    for n in names:
        v = getattr(hf_config, n, None)
        if v is not None:
            return v
    return None
