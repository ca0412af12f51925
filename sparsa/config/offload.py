"""Expert offloading settings (sparsa/offload/README.md explains each technique)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

from sparsa.config.base import check_choice as _choice
from sparsa.config.base import setting
from sparsa.config.units import budget

EvictionPolicy = Literal["lru", "lfu", "lrfu", "arc", "activation"]
Prefetch = Literal["none", "lookahead", "history", "lookahead+history"]
OnMiss = Literal["wait", "low_precision", "host"]
PREFETCH_CHOICES = get_args(Prefetch)
ON_MISS_CHOICES = ("wait", "low_precision", "host")
PREFETCH_EVICTS = ("cold", "any")
ENGINE_POLICIES = get_args(EvictionPolicy)
CAPACITY_MODES = ("global", "per_layer")


@dataclass
class OffloadConfig:
    """Expert offloading: experts stay on disk, a budgeted cache holds compute-ready copies.

    Works with ModelConfig.quantization "int8" / "int4" (and "bf16" for an fp32 or fp16
    checkpoint): on first load every expert is quantized into a store on disk that later
    loads reuse. Keywords and flags carry the prefix `offload_` (`--offload-policy`), except
    `expert_memory`, which turns offloading on. The README of sparsa/offload details each
    choice and BENCHMARKS.md what it measured.
    """

    expert_memory: str | int | None = setting(
        None, "keep routed experts on disk and at most this much of them in memory: bytes, "
              "'4GiB', '25%' of all expert bytes, or 'auto' (what is available once the rest "
              "of the model is loaded); unset: every expert resident", name="expert_memory")
    policy: EvictionPolicy = setting(
        "lru", "eviction ranking of the expert cache (activation: MoE-Infinity's match of "
               "the request's expert activations against predictor_trace's prompts)")
    prefetch: Prefetch = setting(
        "lookahead", "lookahead: the next MoE layer's router on this layer's input; history: "
                     "predictors fit on offload_predictor_trace; or both")
    prefetch_evicts: Literal["cold", "any"] = setting(
        "cold", "cold: a guessed prefetch evicts only experts unused in this forward pass "
                "and the previous one; any: whatever the policy ranks lowest")
    lookahead_extra: int = setting(
        0, "experts beyond the next router's top-k that lookahead also prefetches")
    prefetch_when_idle: bool = setting(
        False, "start a guessed load only while an I/O thread is idle")
    io_threads: int = setting(2, "background threads reading experts")
    direct_io: bool = setting(
        True, "read experts with O_DIRECT where the filesystem allows (no page-cache copy)")
    on_miss: OnMiss = setting(
        "wait", "a missing expert: wait for its load (exact); low_precision: compute with a "
                "quantized copy kept in RAM while the load goes on (HOBBIT; lossy; on the "
                "command line int8/int4 say which copy); host: compute it on the CPU from the "
                "host tier's copy (Fiddler; needs offload_host_memory)",
        shorthands={q: {"offload_on_miss": "low_precision", "offload_low_precision": q}
                    for q in ("int8", "int4")})
    low_precision: Literal["int8", "int4"] = setting(
        "int4", "the form of the RAM copies that on_miss=low_precision computes with")
    low_precision_group_size: int = setting(
        64, "int4 group size of those copies (input channels per scale)")
    predictor_trace: str | None = setting(
        None, "a routing trace of this model (`sparsa trace`) for history prefetch and the "
              "activation policy")
    history_topk: int | None = setting(
        None, "experts per token that history prefetch loads (unset: the router's k)")
    store_dir: str | None = setting(
        None, "where quantized or compressed expert stores are built on first use and "
              "reused (unset: $SPARSA_EXPERT_STORE, else ~/.cache/sparsa/experts)")
    host_memory: str | int | None = setting(
        None, "a host-memory tier of experts between the device cache and the disk (pinned "
              "on CUDA): bytes, '16GiB', '50%' of the expert bytes, or 'auto'")
    host_compute_max_rows: int = setting(
        4, "with on_miss=host: the most rows a miss computes on the CPU",
        aliases=("--offload-host-compute-rows",))
    compression: Literal["none", "zstd"] = setting(
        "none", "zstd: read experts from a lossless store of zstd-compressed byte planes, "
                "written on first use (not with int8/int4)")
    capacity: Literal["global", "per_layer"] = setting(
        "global", "one pool of experts for all layers, or an equal share per MoE layer")
    layout: Literal["auto", "native", "resident"] = setting(
        "auto", "native: compute on the checkpoint's [out, in] tensors as read; resident: "
                "transpose each load into the fused layout (bit-identical to all-resident, "
                "repaid after ~100 uses); auto: resident when the budget holds every expert")
    reserve_buffers: bool = setting(
        True, "map every cached expert's read buffer at load rather than during the first "
              "request")

    def __post_init__(self) -> None:
        if self.expert_memory is not None and self.expert_memory != "auto":
            self.budget_bytes(1)  # validates the form
        if self.host_memory is not None and self.host_memory != "auto":
            self.host_budget_bytes(1)
        if self.on_miss == "host" and self.host_memory is None:
            raise ValueError("on_miss='host' computes misses with the host tier's copy: set "
                             "host_memory")
        for name, low in (("host_compute_max_rows", 1), ("io_threads", 1),
                          ("lookahead_extra", 0)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ValueError(f"{name} must be an integer >= {low}; got {v!r}")
        _choice("offload policy", self.policy, ENGINE_POLICIES)
        if self.policy == "activation" and not self.predictor_trace:
            raise ValueError("policy='activation' matches requests against the activation "
                             "matrices of predictor_trace (a routing trace of this model, "
                             "from `sparsa trace`): set it")
        _choice("prefetch", self.prefetch, PREFETCH_CHOICES)
        if "history" in self.prefetch and not self.predictor_trace:
            raise ValueError(f"prefetch={self.prefetch!r} needs predictor_trace (a routing "
                             "trace of this model, from `sparsa trace`)")
        if self.history_topk is not None and (isinstance(self.history_topk, bool) or
                                              not isinstance(self.history_topk, int) or
                                              self.history_topk < 1):
            raise ValueError(f"history_topk must be an integer >= 1; got {self.history_topk!r}")
        _choice("prefetch_evicts", self.prefetch_evicts, PREFETCH_EVICTS)
        _choice("capacity", self.capacity, CAPACITY_MODES)
        _choice("layout", self.layout, ("auto", "native", "resident"))
        _choice("compression", self.compression, ("none", "zstd"))
        _choice("on_miss", self.on_miss, ON_MISS_CHOICES)
        _choice("low_precision", self.low_precision, ("int8", "int4"))
        from sparsa.kernels.layout import INT4_GROUP_SIZES

        if self.low_precision == "int4" and \
                self.low_precision_group_size not in INT4_GROUP_SIZES:
            raise ValueError(f"low_precision_group_size must be one of {INT4_GROUP_SIZES}; "
                             f"got {self.low_precision_group_size!r}")

    @property
    def enabled(self) -> bool:
        """Whether experts are offloaded at all (expert_memory is set)."""
        return self.expert_memory is not None

    @property
    def lookahead(self) -> bool:
        """Whether the next layer's router prefetches."""
        return "lookahead" in self.prefetch

    @property
    def history(self) -> bool:
        """Whether the trace-fit history predictors prefetch."""
        return "history" in self.prefetch

    def budget_bytes(self, total_expert_bytes: int, available: int | None = None) -> int:
        """The expert budget in bytes; "auto" needs `available` (what it resolves to)."""
        return _bytes_of(self.expert_memory, "expert_memory", total_expert_bytes, available)

    def host_budget_bytes(self, total_expert_bytes: int, available: int | None = None) -> int:
        """The host tier's budget in bytes; "auto" needs `available` (what it resolves to)."""
        return _bytes_of(self.host_memory, "host_memory", total_expert_bytes, available)


def _bytes_of(value: str | int | None, name: str, total: int, available: int | None) -> int:
    if value == "auto":
        if available is None:
            raise ValueError(f"{name}='auto' is sized when the model loads")
        return available
    return budget(value, total, name)  # type: ignore[arg-type]

