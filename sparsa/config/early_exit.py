"""Early-exit settings (CALM-style adaptive depth), given as one `early_exit_config` (a
dict on `LLM(...)`, JSON on the command line and in `sparsa serve`), as
`speculative_config` is."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from sparsa.config.base import check_choice, from_json_dict

# CALM's two measures on the LM head's distribution: the top probability, and the gap
# between the top two probabilities ("softmax response" in the CALM paper)
CONFIDENCE_MEASURES = ("softmax", "margin")
_EVERY = re.compile(r"^\s*every\s+(\d+)\s*$")


@dataclass
class EarlyExitConfig:
    """Where a decode step may stop early, and how sure it must be. Lossy: the tokens can
    differ from the full model's (`sparsa bench early-exit` measures by how much).

    exit_layers: layer indices (0-based) after which the step tests whether to stop, or
        "every N" (after layers N-1, 2N-1, ... before the last). A test costs the final
        norm and the LM head on every row of the batch.
    threshold: the confidence, in (0, 1], every row must reach for the step to stop
        there (one row below it and the whole batch runs on, as CALM does for batches).
    confidence: "softmax" (the top token's probability) or "margin" (top-1 minus top-2
        probability).
    """

    exit_layers: list[int] | str = "every 2"
    threshold: float = 0.9
    confidence: str = "softmax"

    def __post_init__(self) -> None:
        v = self.exit_layers
        if isinstance(v, str):
            m = _EVERY.match(v)
            if m is None or int(m.group(1)) < 1:
                raise ValueError("early_exit_config exit_layers must be a list of layer "
                                 f"indices or \"every N\" with N >= 1; got {v!r}")
        elif not isinstance(v, (list, tuple)) or not v or any(
                isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in v):
            raise ValueError("early_exit_config exit_layers must be a non-empty list of layer "
                             f"indices >= 0 or \"every N\"; got {v!r}")
        else:
            self.exit_layers = sorted(set(v))
        t = self.threshold
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0.0 < t <= 1.0:
            raise ValueError(f"early_exit_config threshold must be a number in (0, 1]; got {t!r}")
        self.threshold = float(t)
        check_choice("early_exit_config confidence", self.confidence, CONFIDENCE_MEASURES)

    def layers_for(self, num_layers: int) -> list[int]:
        """The exit layers of a model with `num_layers` layers (an exit after the last layer
        would be the full model: refused when named, left out of "every N")."""
        if isinstance(self.exit_layers, str):
            n = int(_EVERY.match(self.exit_layers).group(1))
            out = list(range(n - 1, num_layers - 1, n))
            if not out:
                raise ValueError(f"early_exit_config exit_layers {self.exit_layers!r} leaves "
                                 f"no layer to exit after in a {num_layers}-layer model")
            return out
        bad = [i for i in self.exit_layers if i >= num_layers - 1]
        if bad:
            raise ValueError(f"early_exit_config exit_layers {bad} out of range: this model "
                             f"has {num_layers} layers, so an exit goes after layer 0.."
                             f"{num_layers - 2} (after the last one is the full model)")
        return list(self.exit_layers)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EarlyExitConfig:
        """From a dict (JSON object); an unknown key is an error naming it."""
        return from_json_dict(cls, d, "early_exit_config")
