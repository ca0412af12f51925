"""Dynamic routing settings (lossy): fewer experts per token at inference, no retraining.
Given as one `dynamic_routing` dict (JSON on the command line and in `sparsa serve`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sparsa.config.base import from_json_dict


def _int(name: str, v: Any, low: int = 1) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v < low:
        raise ValueError(f'dynamic_routing "{name}" must be an int >= {low}; got {v!r}')


def _fraction(name: str, v: Any, *, closed_low: bool) -> float:
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and (
        0 <= v <= 1 if closed_low else 0 < v <= 1)
    if not ok:
        span = "[0, 1]" if closed_low else "(0, 1]"
        raise ValueError(f'dynamic_routing "{name}" must be a number in {span}; got {v!r}')
    return float(v)


def _fractions(name: str, v: Any, *, closed_low: bool) -> float | list[float]:
    """One number for every layer, or a list of one per MoE layer."""
    if isinstance(v, (list, tuple)):
        if not v:
            raise ValueError(f'dynamic_routing "{name}" must be a number or a non-empty list')
        return [_fraction(f"{name} entries", x, closed_low=closed_low) for x in v]
    return _fraction(name, v, closed_low=closed_low)


def per_layer(name: str, v: Any, layer: int, layers: int) -> Any:
    """A setting's value at MoE layer `layer` of `layers` (a list gives one per layer)."""
    if not isinstance(v, list):
        return v
    if len(v) != layers:
        raise ValueError(f'dynamic_routing "{name}" has {len(v)} entries; the model has '
                         f"{layers} MoE layers")
    return v[layer]


@dataclass
class RoutingConfig:
    """How many experts each token gets, per MoE layer (the router's softmax over all
    experts ranks them; the model's own top-k is the default number).

    top_p: keep, per token, the fewest best experts whose router probabilities sum to at
        least top_p (at least min_k, at most max_k); None: a fixed number (max_k). A list
        gives one value per MoE layer (as skip_threshold's).
    min_k, max_k: bounds on experts per token (max_k default: the model's top-k).
    skip_threshold: then drop a kept expert (beyond min_k) whose share of the kept
        experts' weight is below this (Mixtral's second expert when the first dominates).
    renormalize: the kept experts' weights are rescaled to the sum the model's routing
        gives its top-k (1 for models that renormalize, the top-k's mass for the others),
        so dropping an expert shifts its weight to the kept ones; false: dropped weight
        is lost.
    layer_top_k: per-layer max_k, one int per MoE layer in order (overrides max_k).
    """

    top_p: float | list[float] | None = None
    min_k: int = 1
    max_k: int | None = None
    skip_threshold: float | list[float] | None = None
    renormalize: bool = True
    layer_top_k: list[int] | None = None

    def __post_init__(self) -> None:
        if self.top_p is not None:
            self.top_p = _fractions("top_p", self.top_p, closed_low=False)
        if self.skip_threshold is not None:
            self.skip_threshold = _fractions("skip_threshold", self.skip_threshold,
                                             closed_low=True)
        _int("min_k", self.min_k)
        if self.max_k is not None:
            _int("max_k", self.max_k)
            if self.max_k < self.min_k:
                raise ValueError(f"dynamic_routing max_k ({self.max_k}) is below min_k "
                                 f"({self.min_k})")
        if not isinstance(self.renormalize, bool):
            raise ValueError(f"dynamic_routing renormalize must be true or false; got "
                             f"{self.renormalize!r}")
        if self.layer_top_k is not None:
            if not isinstance(self.layer_top_k, (list, tuple)) or not self.layer_top_k:
                raise ValueError("dynamic_routing layer_top_k must be a list of ints, one per "
                                 f"MoE layer; got {self.layer_top_k!r}")
            for v in self.layer_top_k:
                _int("layer_top_k entries", v)
            self.layer_top_k = list(self.layer_top_k)
        if (self.top_p is None and self.skip_threshold is None and self.max_k is None
                and self.layer_top_k is None):
            raise ValueError("dynamic_routing sets nothing to change: give top_p, "
                             "skip_threshold, max_k or layer_top_k (or leave it unset)")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RoutingConfig:
        """From a dict (JSON object); an unknown key is an error naming it."""
        return from_json_dict(cls, d, "dynamic_routing")
