"""Expert pruning and expert merging settings (lossy): fewer routed experts per MoE layer,
chosen from routing statistics on calibration text. Given as one `expert_pruning` or
`expert_merging` dict (JSON on the command line and in `sparsa serve`)."""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal

from sparsa.config.base import check_choice, from_json_dict

CRITERIA = ("frequency", "weight")
SIMILARITIES = ("output", "output_mean", "router")
GROUPINGS = ("hierarchical", "dominant")
ROUTER_RULES = ("mean", "anchor", "sum")
# keys that only mean something when experts are merged
MERGE_ONLY = ("similarity", "grouping", "router", "align", "similarity_tokens")


@dataclass
class CompressConfig:
    """How many experts each MoE layer loses, and how they are chosen.

    method: "prune" (drop the least-used experts, router rows included) or "merge" (group
        similar experts and average each group into one, remapping the router).
    fraction: share of each MoE layer's experts removed (rounded half up), or
    count: experts removed per MoE layer (give exactly one of the two).
    calibration: a UTF-8 text file the statistics are recorded on.
    calibration_tokens: tokens of it to run (the file must have at least as many).
    criterion: how an expert's use is measured: "weight" (its summed router weight) or
        "frequency" (tokens routed to it); pruning drops the lowest, merging weights its
        averages by it and anchors each group on the highest. (On tinymoe-stories, whose
        experts are used almost evenly, "weight" prunes far better: docs/prune-merge-results.md.)
    similarity (merge): "router" (the experts' router logits on sampled calibration tokens,
        as M-SMoE), "output" (their outputs on those tokens) or "output_mean" (their mean
        output, as HC-SMoE); "router" measured best on tinymoe-stories.
    grouping (merge): "hierarchical" (average-linkage clustering, HC-SMoE) or "dominant"
        (the most-used experts are kept as centres, each other joins the most similar one,
        M-SMoE).
    router (merge): a merged expert's router row: "mean" (use-weighted mean of the group's
        rows), "anchor" (the most-used member's row) or "sum" (the rows added).
    align (merge): permute each member's intermediate neurons to match the anchor's before
        averaging (weight matching); false averages them as they are.
    similarity_tokens (merge): calibration tokens per layer kept to compare experts on.
    """

    method: Literal["prune", "merge"]
    calibration: str
    fraction: float | None = None
    count: int | None = None
    calibration_tokens: int = 8192
    criterion: str = "weight"
    similarity: str = "router"
    grouping: str = "hierarchical"
    router: str = "mean"
    align: bool = True
    similarity_tokens: int = 1024

    @property
    def setting(self) -> str:
        """The setting's name, for error messages."""
        return "expert_pruning" if self.method == "prune" else "expert_merging"

    def __post_init__(self) -> None:
        name = self.setting
        check_choice("method", self.method, ("prune", "merge"))
        if (self.fraction is None) == (self.count is None):
            raise ValueError(f"{name} needs exactly one of fraction (share of each layer's "
                             "experts removed) or count (experts removed per layer)")
        if self.fraction is not None:
            f = self.fraction
            if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0 < f <= 1:
                raise ValueError(f"{name} fraction must be a number in (0, 1]; got {f!r}")
            self.fraction = float(f)
        if self.count is not None and (isinstance(self.count, bool)
                                       or not isinstance(self.count, int) or self.count < 1):
            raise ValueError(f"{name} count must be an int >= 1; got {self.count!r}")
        if not isinstance(self.calibration, (str, Path)) or not str(self.calibration):
            raise ValueError(f"{name} needs calibration: a text file to record routing on")
        self.calibration = str(Path(self.calibration).expanduser())
        if not Path(self.calibration).is_file():
            raise ValueError(f"{name} calibration file not found: {self.calibration}")
        for key in ("calibration_tokens", "similarity_tokens"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int) or v < 16:
                raise ValueError(f"{name} {key} must be an int >= 16; got {v!r}")
        check_choice(f"{name} criterion", self.criterion, CRITERIA)
        check_choice(f"{name} similarity", self.similarity, SIMILARITIES)
        check_choice(f"{name} grouping", self.grouping, GROUPINGS)
        check_choice(f"{name} router", self.router, ROUTER_RULES)
        if not isinstance(self.align, bool):
            raise ValueError(f"{name} align must be true or false; got {self.align!r}")

    def removed(self, num_experts: int, top_k: int) -> int:
        """Experts this removes from a layer of `num_experts` routing `top_k` per token; an
        error naming the setting when none or all would go, or fewer than top-k stay."""
        what = f"fraction {self.fraction}" if self.fraction is not None \
            else f"count {self.count}"
        n = self.count if self.count is not None else int(self.fraction * num_experts + 0.5)
        if n < 1:
            raise ValueError(f"{self.setting} {what} removes no expert of a layer of "
                             f"{num_experts} experts; ask for more")
        if n >= num_experts:
            raise ValueError(f"{self.setting} {what} removes every expert of a layer "
                             f"({n} of {num_experts}); at least top-k ({top_k}) must stay")
        if num_experts - n < top_k:
            raise ValueError(f"{self.setting} {what} leaves {num_experts - n} experts per "
                             f"layer, fewer than the {top_k} each token is routed to "
                             f"(num_experts_per_tok)")
        return n

    def as_dict(self) -> dict[str, Any]:
        """Every field, the merge-only ones left out for pruning (the cache key)."""
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        if self.method == "prune":
            for k in MERGE_ONLY:
                d.pop(k)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], method: str) -> CompressConfig:
        """From an `expert_pruning` (method "prune") or `expert_merging` dict; an unknown
        key is an error naming it."""
        name = "expert_pruning" if method == "prune" else "expert_merging"
        known = {f.name for f in fields(cls)} - {"method"}
        if method == "prune":
            known -= set(MERGE_ONLY)
        if isinstance(d, dict) and set(d) <= known and "calibration" not in d:
            raise ValueError(f"{name} needs calibration: a text file to record routing on")
        return from_json_dict(cls, d, name, known, method=method)
