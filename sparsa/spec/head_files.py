"""Trained draft heads on disk (Medusa, EAGLE): the weights as safetensors beside a JSON
config, and the checks a load makes before any weight is used."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import nn


def save_head(module: nn.Module, out: str | Path, weights: str, config: str,
              cfg: dict[str, Any]) -> Path:
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in module.state_dict().items()},
              str(out / weights))
    (out / config).write_text(json.dumps(cfg, indent=1))
    return out


def read_head_config(path: str | Path, weights: str, config: str, what: str,
                     train_hint: str) -> dict[str, Any]:
    """The config of the head set in `path`; missing files or bad JSON are ValueErrors."""
    path = Path(path)
    cfg_file = path / config
    if not cfg_file.is_file() or not (path / weights).is_file():
        raise ValueError(f"{path} holds no {what} ({config} and {weights}); {train_hint}")
    try:
        cfg = json.loads(cfg_file.read_text())
    except ValueError as e:
        raise ValueError(f"{cfg_file} is not a {what} config: {e}") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{cfg_file} is not a {what} config: not a JSON object")
    return cfg


def check_head_fits(what: str, path: str | Path, hidden: int, vocab: int,
                    hidden_size: int, vocab_size: int) -> None:
    if hidden != hidden_size or vocab != vocab_size:
        raise ValueError(f"{what} in {path}: trained for hidden size {hidden} and a "
                         f"vocabulary of {vocab}; this model has {hidden_size} and "
                         f"{vocab_size}")


def load_head_weights(module: nn.Module, weights: str | Path) -> None:
    from safetensors.torch import load_file

    try:
        module.load_state_dict(load_file(str(weights)))
    except RuntimeError as e:
        raise ValueError(f"{weights} does not match its config: {e}") from None
