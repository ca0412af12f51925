"""Configuration dataclasses, one per concern, validated when built."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype | None:
    """Map a user dtype name to a torch dtype; None means "auto"."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return None
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of auto, {', '.join(_DTYPES)}; got {dtype!r}")
    return _DTYPES[dtype]


def parse_size(size: str | float) -> int:
    """Parse '4GiB', '512MB', '1e9' or a plain number of bytes."""
    if isinstance(size, (int, float)):
        return int(size)
    s = size.strip()
    units = {
        "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40,
        "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "b": 1,
    }
    low = s.lower()
    for unit, mult in units.items():
        if low.endswith(unit):
            return int(float(low[: -len(unit)]) * mult)
    try:
        return int(float(s))
    except ValueError:
        raise ValueError(f"cannot parse size {size!r}; use e.g. '4GiB' or '512MB'") from None


PREFETCH_CHOICES = ("none", "lookahead", "history", "lookahead+history")
ON_MISS_CHOICES = ("wait", "low_precision", "host")
PREFETCH_EVICTS = ("cold", "any")
ENGINE_POLICIES = ("lru", "lfu", "lrfu", "arc", "activation")
CAPACITY_MODES = ("global", "per_layer")


@dataclass
class OffloadConfig:
    """Expert offloading: experts stay on disk, a budgeted cache holds compute-ready copies.

    expert_memory: None (off: every expert resident), bytes, "4GiB", or "25%" of all expert
    weights as stored in the cache (the checkpoint's dtype when narrower than the compute
    dtype, e.g. bf16 experts of a bf16 checkpoint computed in fp32; with int8/int4
    quantization the quantized experts, so more of them fit), or "auto": what the device
    has available once the rest of the model is loaded, less a reserve for the KV cache and
    working memory (max(2 GiB, 10%), plus a read buffer per I/O thread), as llama.cpp's page
    cache or vLLM's gpu_memory_utilization take what is there.
    Offloading works with ModelConfig.quantization "int8" / "int4" (and "bf16" for an fp32 or
    fp16 checkpoint; a bf16 checkpoint's experts are read as they are): on first load every
    expert is quantized, as the all-resident quantized model does it, into a store on disk
    (sparsa.offload.quantized_store) that later loads reuse; experts are read from there.
    store_dir: where those stores live (None: $SPARSA_EXPERT_STORE, else
    ~/.cache/sparsa/experts).
    policy: eviction ranking (lru, lfu, lrfu, arc, or activation: MoE-Infinity's match of the
    request's expert activation matrix against those of `predictor_trace`'s prompts).
    prefetch: "none", "lookahead" (the next MoE layer's router on this layer's input),
    "history" (the trace lab's co-occurrence + token-affinity + transition predictors, fit on
    `predictor_trace`, a trace recorded from this model), or "lookahead+history" (both).
    predictor_trace: a routing trace (.csv / .csv.gz from `sparsa trace`) for "history" and
    for policy "activation".
    history_topk: experts per token the history predictor prefetches (None: the router's k).
    prefetch_evicts: "cold" (default: a guessed prefetch evicts only experts unused in this
    forward pass and the previous one) or "any" (whatever the policy ranks lowest). "cold"
    read fewer experts and decoded as fast or faster on tinymoe-stories and mixtral-mini at
    25% and 50% budgets (BENCHMARKS.md); but where one pass's experts fill the budget, no
    expert is cold and no guess loads at all. Under both rules a guess never evicts another
    expert guessed for the same layer.
    lookahead_extra: experts beyond the next router's top-k that lookahead also prefetches.
    prefetch_when_idle: a guess (lookahead or history) starts loading only while an I/O
    thread is idle, so when the disk is the bottleneck guesses never delay known needs.
    on_miss: what a layer does when an expert it needs is not resident: "wait" for the load
    (outputs identical to the all-resident model), or "low_precision" (HOBBIT): every expert
    is also kept, quantized to `low_precision` ("int8" | "int4", groups of
    `low_precision_group_size`), in a RAM tier outside the budget; a miss computes with that
    copy while the full-precision load goes on in the background; or "host" (Fiddler): an
    expert the host tier holds is computed where it lives, on the CPU, for up to
    `host_compute_max_rows` rows, while its copy to the device goes on (any other miss waits).
    host_memory: None (off), bytes, "16GiB" or "50%" of the expert bytes: a second tier of
    experts in host memory (pinned on CUDA, so copies to the device run asynchronously on a
    side stream) between the device cache (`expert_memory`) and the disk, with its own hard
    budget and LRU eviction. It is meant for GPU machines; on a CPU-only machine it works
    (the tests run it there) but one larger `expert_memory` serves better. "auto": the host
    memory available at load, less max(2 GiB, 10%) (and, when the device is the CPU, less
    the device cache's budget); a model too large for a GPU gets it with expert_memory="auto"
    (ModelConfig.when_too_large).
    capacity: "global" (default: one pool for all layers) or "per_layer" (each MoE layer
    has an equal share of the budget: a layer holding its share evicts its own experts, as
    the trace lab's per-layer mode; a prefill batch whose layer needs more borrows from
    layers over their share). Layers run in a cycle, so one global LRU evicts the experts
    used longest ago, the next layers', needed soonest; per layer it evicts the layer's own,
    needed a token later: tinymoe-stories reads 10% fewer experts at 50% (demand loads), but
    DeepSeek-V2-Lite beyond RAM at 25% decodes within noise of the pool (BENCHMARKS.md).
    compression: "none" (read the checkpoint) or "zstd": on first load every expert is
    written, byte planes zstd-compressed, losslessly, to a store in store_dir
    (sparsa.offload.compressed_store) that loads read fewer bytes from; not with int8/int4.
    """

    expert_memory: str | int | None = None
    policy: str = "lru"
    prefetch: str = "lookahead"
    prefetch_evicts: str = "cold"
    lookahead_extra: int = 0
    prefetch_when_idle: bool = False
    io_threads: int = 2
    direct_io: bool = True
    on_miss: str = "wait"
    low_precision: str = "int4"
    low_precision_group_size: int = 64
    predictor_trace: str | None = None
    history_topk: int | None = None
    store_dir: str | None = None
    host_memory: str | int | None = None
    host_compute_max_rows: int = 4
    compression: str = "none"
    capacity: str = "global"

    def __post_init__(self) -> None:
        if self.expert_memory is not None and self.expert_memory != "auto":
            self.budget_bytes(1)  # validates the form
        if self.host_memory is not None and self.host_memory != "auto":
            self.host_budget_bytes(1)
        if self.on_miss == "host" and self.host_memory is None:
            raise ValueError("on_miss='host' computes misses with the host tier's copy: set "
                             "host_memory")
        if isinstance(self.host_compute_max_rows, bool) or \
                not isinstance(self.host_compute_max_rows, int) or self.host_compute_max_rows < 1:
            raise ValueError("host_compute_max_rows must be an integer >= 1; "
                             f"got {self.host_compute_max_rows!r}")
        if self.policy not in ENGINE_POLICIES:
            raise ValueError(f"offload policy must be one of {', '.join(ENGINE_POLICIES)}; "
                             f"got {self.policy!r}")
        if self.policy == "activation" and not self.predictor_trace:
            raise ValueError("policy='activation' matches requests against the activation "
                             "matrices of predictor_trace (a routing trace of this model, "
                             "from `sparsa trace`): set it")
        if self.prefetch not in PREFETCH_CHOICES:
            raise ValueError(f"prefetch must be one of {', '.join(PREFETCH_CHOICES)}; "
                             f"got {self.prefetch!r}")
        if "history" in self.prefetch and not self.predictor_trace:
            raise ValueError(f"prefetch={self.prefetch!r} needs predictor_trace (a routing "
                             "trace of this model, from `sparsa trace`)")
        if self.history_topk is not None and (isinstance(self.history_topk, bool) or
                                              not isinstance(self.history_topk, int) or
                                              self.history_topk < 1):
            raise ValueError(f"history_topk must be an integer >= 1; got {self.history_topk!r}")
        if isinstance(self.lookahead_extra, bool) or not isinstance(self.lookahead_extra, int) \
                or self.lookahead_extra < 0:
            raise ValueError("lookahead_extra must be an integer >= 0; "
                             f"got {self.lookahead_extra!r}")
        if self.prefetch_evicts not in PREFETCH_EVICTS:
            raise ValueError(f"prefetch_evicts must be one of {', '.join(PREFETCH_EVICTS)}; "
                             f"got {self.prefetch_evicts!r}")
        if self.io_threads < 1:
            raise ValueError(f"io_threads must be >= 1; got {self.io_threads}")
        if self.capacity not in CAPACITY_MODES:
            raise ValueError(f"capacity must be one of {', '.join(CAPACITY_MODES)}; "
                             f"got {self.capacity!r}")
        if self.compression not in ("none", "zstd"):
            raise ValueError(f"compression must be 'none' or 'zstd'; got {self.compression!r}")
        if self.on_miss not in ON_MISS_CHOICES:
            raise ValueError(f"on_miss must be one of {', '.join(ON_MISS_CHOICES)}; "
                             f"got {self.on_miss!r}")
        if self.low_precision not in ("int8", "int4"):
            raise ValueError(f"low_precision must be 'int8' or 'int4'; got "
                             f"{self.low_precision!r}")
        from sparsa.kernels.layout import INT4_GROUP_SIZES

        if self.low_precision == "int4" and \
                self.low_precision_group_size not in INT4_GROUP_SIZES:
            raise ValueError(f"low_precision_group_size must be one of {INT4_GROUP_SIZES}; "
                             f"got {self.low_precision_group_size!r}")

    @property
    def enabled(self) -> bool:
        return self.expert_memory is not None

    @property
    def lookahead(self) -> bool:
        return "lookahead" in self.prefetch

    @property
    def history(self) -> bool:
        return "history" in self.prefetch

    def budget_bytes(self, total_expert_bytes: int, available: int | None = None) -> int:
        """The expert budget in bytes; "auto" needs `available` (what it resolves to)."""
        if self.expert_memory == "auto":
            if available is None:
                raise ValueError("expert_memory='auto' is sized when the model loads")
            return available
        return _budget(self.expert_memory, total_expert_bytes, "expert_memory")

    def host_budget_bytes(self, total_expert_bytes: int, available: int | None = None) -> int:
        """The host tier's budget in bytes; "auto" needs `available` (what it resolves to)."""
        if self.host_memory == "auto":
            if available is None:
                raise ValueError("host_memory='auto' is sized when the model loads")
            return available
        return _budget(self.host_memory, total_expert_bytes, "host_memory")


def _budget(m: str | int, total: int, name: str) -> int:
    """Bytes from a size ("4GiB", a number) or a percentage of `total` ("25%")."""
    if isinstance(m, str) and m.strip().endswith("%"):
        try:
            frac = float(m.strip()[:-1]) / 100
        except ValueError:
            raise ValueError(f"cannot parse {name} {m!r}") from None
        if not 0 < frac <= 1:
            raise ValueError(f"{name} percentage must be in (0, 100]; got {m!r}")
        return int(total * frac)
    n = parse_size(m)
    if n <= 0:
        raise ValueError(f"{name} must be positive; got {m!r}")
    return n


# --bf16-prefill choices -> ModelConfig.bf16_prefill
BF16_PREFILL_CHOICES = {"auto": None, "on": True, "off": False}


WHEN_TOO_LARGE = ("offload", "error", "ignore")


@dataclass
class ModelConfig:
    """What to load: an HF directory, a llama2.c .bin, or a built-in name (dummy weights)."""

    model: str
    tokenizer: str | None = None
    dtype: str = "auto"
    load_format: str = "auto"  # auto | safetensors | dummy
    max_model_len: int | None = None
    seed: int = 0
    hf_overrides: dict[str, Any] = field(default_factory=dict)
    # Weight form applied at load: "none" | "int8" | "int4" | "bf16"; None = automatic
    # (bf16 checkpoints on CPU keep bf16 weights, see quant_config)
    quantization: str | None = None
    quantization_group_size: int = 64  # int4 only: input channels per scale/zero pair
    # int8 only: "dynamic" (batched rows as W8A8 int8 GEMMs) or "none" (exact activations)
    int8_activations: str = "dynamic"
    # bf16 weights only: prefill GEMMs in bf16 on CPUs with bf16 dot products (activations
    # rounded to bf16, as vLLM and transformers compute bf16 checkpoints); None = on where
    # the CPU has them, False keeps fp32 math (lossless for bf16 checkpoints)
    bf16_prefill: bool | None = None
    offload: OffloadConfig = field(default_factory=OffloadConfig)
    # When the all-resident weights would not fit the device's available memory: "offload"
    # (an MoE checkpoint keeps its experts on disk with expert_memory="auto"; anything else
    # gets a clear error), "error" (always the error), "ignore" (load anyway)
    when_too_large: str = "offload"

    def __post_init__(self) -> None:
        if not isinstance(self.model, str) or not self.model:
            raise ValueError("model must be a non-empty path or built-in model name")
        parse_dtype(self.dtype)
        self.quant_config()  # validates method and group size
        if self.when_too_large not in WHEN_TOO_LARGE:
            raise ValueError(f"when_too_large must be one of {', '.join(WHEN_TOO_LARGE)}; "
                             f"got {self.when_too_large!r}")
        if self.offload.enabled and self.quant_config().enabled and \
                self.offload.on_miss == "low_precision":
            raise ValueError("offload_on_miss='low_precision' needs full-precision experts; "
                             "with int8/int4/bf16 quantization they are quantized already "
                             "(on_miss='wait' or 'host' work)")
        if self.load_format not in ("auto", "safetensors", "dummy"):
            raise ValueError(
                f"load_format must be 'auto', 'safetensors' or 'dummy'; got {self.load_format!r}"
            )
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"max_model_len must be >= 1; got {self.max_model_len}")

    def quant_config(self, checkpoint_dtype: torch.dtype | None = None,
                     device: torch.device | None = None):
        """The `QuantConfig` this model is loaded with (method "none" when off).

        With `quantization` left unset (None, not "none"), a bf16 checkpoint computed in fp32
        on a CPU keeps its weights in bf16 ("bf16" form: half the memory and half the bytes
        per decoded token, exactly the checkpoint's weights) when the native kernels are
        there to multiply them; pass the checkpoint dtype and device to get that choice."""
        from sparsa.layers.quantization import QuantConfig

        method = self.quantization
        if method is None and self._auto_bf16(checkpoint_dtype, device):
            method = "bf16"
        bf16_prefill = self.bf16_prefill
        if bf16_prefill is None:
            from sparsa.layers.quantization.matmul import cpu_has_bf16_dot

            bf16_prefill = method == "bf16" and cpu_has_bf16_dot()
        return QuantConfig(method=method or "none", group_size=self.quantization_group_size,
                           int8_activations=self.int8_activations,
                           bf16_prefill=bool(bf16_prefill))

    def _auto_bf16(self, checkpoint_dtype: torch.dtype | None,
                   device: torch.device | None) -> bool:
        if checkpoint_dtype != torch.bfloat16 or device is None or device.type != "cpu":
            return False
        # with offloading this is the form of the resident (non-expert) weights
        if parse_dtype(self.dtype) not in (None, torch.float32):
            return False
        from sparsa import kernels

        return kernels.available()


@dataclass
class CacheConfig:
    """Paged KV cache: block size and how much memory the pool may take."""

    block_size: int = 16
    kv_cache_memory: str | int | None = None  # bytes or '2GiB'; None = derive from fraction
    memory_fraction: float = 0.25  # of total RAM (CPU) or free device memory (CUDA)
    num_blocks: int | None = None  # explicit override, mostly for tests
    enable_prefix_caching: bool = False

    def __post_init__(self) -> None:
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two >= 1; got {self.block_size}")
        if not 0.0 < self.memory_fraction <= 0.95:
            raise ValueError(f"memory_fraction must be in (0, 0.95]; got {self.memory_fraction}")
        if self.kv_cache_memory is not None and parse_size(self.kv_cache_memory) <= 0:
            raise ValueError("kv_cache_memory must be positive")
        if self.num_blocks is not None and self.num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1; got {self.num_blocks}")


@dataclass
class SchedulerConfig:
    """Continuous batching limits."""

    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    enable_chunked_prefill: bool = True
    policy: str = "fcfs"  # fcfs | priority

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1; got {self.max_num_seqs}")
        if self.max_num_batched_tokens < 1:
            raise ValueError(
                f"max_num_batched_tokens must be >= 1; got {self.max_num_batched_tokens}"
            )
        if self.policy not in ("fcfs", "priority"):
            raise ValueError(f"policy must be 'fcfs' or 'priority'; got {self.policy!r}")


@dataclass
class DeviceConfig:
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    num_threads: int | None = None  # CPU threads; None = physical cores
    # all-decode CPU steps as one native call sequence per layer (sparsa.models.native_decode)
    native_decode: bool = True

    def __post_init__(self) -> None:
        if self.device != "auto" and not (
            self.device == "cpu" or self.device.startswith("cuda")
        ):
            raise ValueError(f"device must be 'auto', 'cpu' or 'cuda[:N]'; got {self.device!r}")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError("device 'cuda' requested but CUDA is not available")
        if self.num_threads is not None and self.num_threads < 1:
            raise ValueError(f"num_threads must be >= 1; got {self.num_threads}")

    @property
    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)


def physical_cores() -> int:
    try:
        import psutil

        n = psutil.cpu_count(logical=False)
        if n:
            return n
    except Exception:
        pass
    return os.cpu_count() or 1


@dataclass
class EngineConfig:
    model: ModelConfig
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    device: DeviceConfig = field(default_factory=DeviceConfig)
    # Path of an expert-routing trace to record (CSV, .csv.gz), written on shutdown; None = off
    trace_experts: str | None = None
