"""The engine's settings, one dataclass per concern, validated when built."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from sparsa.config.base import check_choice, setting
from sparsa.config.compress import CompressConfig
from sparsa.config.early_exit import EarlyExitConfig
from sparsa.config.offload import OffloadConfig
from sparsa.config.routing import RoutingConfig
from sparsa.config.speculative import SpeculativeConfig
from sparsa.config.units import parse_dtype, parse_size

WHEN_TOO_LARGE = ("offload", "error", "ignore")
# the command line's spelling of ModelConfig.bf16_prefill (and of any bool-or-auto field)
BF16_PREFILL_CHOICES = {"auto": None, "on": True, "off": False}


@dataclass
class ModelConfig:
    """What to load: an HF directory, a llama2.c .bin, or a built-in name (dummy weights),
    and in which form."""

    model: str  # an HF directory, a llama2.c .bin file or a built-in name (positional)
    tokenizer: str | None = setting(None, "tokenizer directory or hub id (unset: the "
                                          "model's)")
    revision: str | None = setting(
        None, "a hub model's branch, tag or commit (unset: main)")
    dtype: Literal["auto", "float32", "bfloat16", "float16", "fp32", "bf16", "fp16", "float",
                   "half"] = setting(
        "auto", "compute dtype (auto: the checkpoint's; bf16/fp16 checkpoints run as fp32 on "
                "CPU, which has no fast half GEMM)")
    load_format: Literal["auto", "safetensors", "dummy"] = setting(
        "auto", "dummy: random weights of the right shapes")
    max_model_len: int | None = setting(
        None, "context window (unset: the model's max_position_embeddings)")
    seed: int = setting(0, "seed of the engine: random (dummy) weights, and on the command "
                           "line also the sampling seed")
    hf_overrides: dict[str, Any] = setting(
        {}, "config.json fields to override, as JSON (e.g. '{\"num_hidden_layers\": 2}')")
    quantization: Literal["none", "int8", "int4", "bf16"] | None = setting(
        None, "weight form applied at load: int8/int4 weight-only quantization, bf16 weights "
              "with fp32 math (unset: none; bf16 checkpoints on CPU keep bf16 weights)",
        aliases=("-q",))
    quantization_group_size: int = setting(
        64, "int4 only: input channels per scale/zero pair (16..256)",
        aliases=("--group-size",))
    quantization_lm_head: Literal["same", "int8", "none"] = setting(
        "same", "the LM head's weight form: the same as the rest, int8 (an int4 body with an "
                "8-bit head, as llama.cpp's files keep it), or none (full precision)")
    int8_activations: Literal["dynamic", "none"] = setting(
        "dynamic", "int8 only: dynamic = batched rows (prefill) as int8 x int8 GEMMs with "
                   "activations quantized per row; none = exact activations")
    bf16_prefill: bool | None = setting(
        None, "bf16 weights only: prefill GEMMs in bf16 (activations rounded to bf16); "
              "auto = where the CPU has bf16 dot products; off keeps fp32 math (lossless)")
    offload: OffloadConfig = field(default_factory=OffloadConfig)
    when_too_large: Literal["offload", "error", "ignore"] = setting(
        "offload", "when the weights would not fit the device's available memory: offload "
                   "(an MoE checkpoint keeps its experts on disk, expert_memory=auto; others: "
                   "an error), error, or ignore (load anyway)")

    def __post_init__(self) -> None:
        if not isinstance(self.model, str) or not self.model:
            raise ValueError("model must be a non-empty path or built-in model name")
        if isinstance(self.bf16_prefill, str):  # "auto" | "on" | "off", as on the CLI
            check_choice("bf16_prefill", self.bf16_prefill, tuple(BF16_PREFILL_CHOICES))
            self.bf16_prefill = BF16_PREFILL_CHOICES[self.bf16_prefill]
        parse_dtype(self.dtype)
        self.quant_config()  # validates method and group size
        check_choice("when_too_large", self.when_too_large, WHEN_TOO_LARGE)
        if self.offload.enabled and self.quant_config().enabled and \
                self.offload.on_miss == "low_precision":
            raise ValueError("offload_on_miss='low_precision' needs full-precision experts; "
                             "with int8/int4/bf16 quantization they are quantized already "
                             "(on_miss='wait' or 'host' work)")
        check_choice("load_format", self.load_format, ("auto", "safetensors", "dummy"))
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"max_model_len must be >= 1; got {self.max_model_len}")
        if not isinstance(self.hf_overrides, dict):
            raise ValueError("hf_overrides must be a dict of config.json fields")

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
            from sparsa.platform import cpu_has_bf16_dot

            bf16_prefill = method == "bf16" and cpu_has_bf16_dot()
        return QuantConfig(method=method or "none", group_size=self.quantization_group_size,
                           lm_head=self.quantization_lm_head,
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

    block_size: int = setting(16, "tokens per KV block (a power of two)")
    kv_cache_memory: str | int | None = setting(
        None, "KV cache budget: bytes or e.g. '512MiB' (unset: kv_cache_memory_fraction)")
    memory_fraction: float = setting(
        0.25, "KV cache share of total RAM (CPU) or free device memory (CUDA) when "
              "kv_cache_memory is unset", name="kv_cache_memory_fraction")
    num_blocks: int | None = setting(
        None, "KV blocks, exactly (overrides the budget; mostly for tests)",
        name="num_kv_blocks")
    enable_prefix_caching: bool = setting(
        False, "reuse the KV blocks of prompt prefixes seen before (on in `sparsa serve`)",
        aliases=("--prefix-caching",))
    free_out_of_window: bool = setting(
        True, "give back KV blocks that every layer's sliding window has left (models whose "
              "every layer has a window; lossless)")
    kv_cache_dtype: Literal["auto", "int8"] = setting(
        "auto", "KV cache storage: auto (the model's dtype) or int8 (lossy: per token and "
                "head scales; ~4x smaller than fp32)")

    def __post_init__(self) -> None:
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two >= 1; got {self.block_size}")
        if not 0.0 < self.memory_fraction <= 0.95:
            raise ValueError(f"memory_fraction must be in (0, 0.95]; got {self.memory_fraction}")
        if self.kv_cache_memory is not None and parse_size(self.kv_cache_memory) <= 0:
            raise ValueError("kv_cache_memory must be positive")
        if self.num_blocks is not None and self.num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1; got {self.num_blocks}")
        check_choice("kv_cache_dtype", self.kv_cache_dtype, ("auto", "int8"))


@dataclass
class SchedulerConfig:
    """Continuous batching limits."""

    max_num_seqs: int = setting(64, "most sequences in one batch")
    max_num_batched_tokens: int = setting(2048, "most tokens computed in one step")
    enable_chunked_prefill: bool = setting(
        True, "split long prompts across steps so decodes keep running",
        aliases=("--chunked-prefill",))
    policy: Literal["fcfs", "priority"] = setting(
        "fcfs", "fcfs: arrival order; priority: lower `priority` first, ties by arrival",
        name="scheduling_policy")

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1; got {self.max_num_seqs}")
        if self.max_num_batched_tokens < 1:
            raise ValueError(
                f"max_num_batched_tokens must be >= 1; got {self.max_num_batched_tokens}"
            )
        check_choice("policy", self.policy, ("fcfs", "priority"))


@dataclass
class DeviceConfig:
    """Where and how wide the engine computes."""

    device: str = setting("auto", "auto, cpu, cuda or cuda:N")
    num_threads: int | None = setting(None, "CPU threads (unset: physical cores)",
                                      aliases=("--threads",))
    native_decode: bool = setting(
        True, "all-decode CPU steps as one native call sequence per layer (same results; "
              "off runs the model's modules)")

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
        """The torch device ("auto": CUDA when there is one, else the CPU)."""
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)


@dataclass
class EngineConfig:
    """Everything an LLMEngine is built from."""

    model: ModelConfig
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    device: DeviceConfig = field(default_factory=DeviceConfig)
    trace_experts: str | None = setting(
        None, "record every computed token's routed experts at every MoE layer to this "
              "trace (.csv or .csv.gz), written at shutdown")
    speculative_config: dict[str, Any] = setting(
        {}, "speculative decoding, as JSON (e.g. '{\"method\": \"ngram\", "
            "\"num_speculative_tokens\": 4}'; unset: off)")
    early_exit_config: dict[str, Any] = setting(
        {}, "early exit (CALM-style, lossy): decode steps stop after a layer once the LM head "
            "is confident there, as JSON (e.g. '{\"exit_layers\": \"every 2\", \"threshold\": "
            "0.9, \"confidence\": \"softmax\"}'; unset: off)")

    dynamic_routing: dict[str, Any] = setting(
        {}, "dynamic routing (lossy): fewer experts per token, as JSON (e.g. '{\"top_p\": "
            "0.7}', '{\"skip_threshold\": 0.3}', '{\"layer_top_k\": [2, 1, 1, 2]}'; keys "
            "top_p, min_k, max_k, skip_threshold, renormalize, layer_top_k; unset: off)")
    expert_pruning: dict[str, Any] = setting(
        {}, "expert pruning (lossy): drop each MoE layer's least-used experts, measured on "
            "calibration text; the engine loads a pruned copy of the checkpoint (cached), as "
            "JSON (e.g. '{\"fraction\": 0.25, \"calibration\": \"text.txt\"}'; keys "
            "fraction or count, calibration, calibration_tokens, criterion; unset: off)")
    expert_merging: dict[str, Any] = setting(
        {}, "expert merging (lossy): merge each MoE layer's similar experts into fewer, as "
            "expert_pruning (e.g. '{\"fraction\": 0.25, \"calibration\": \"text.txt\"}'; "
            "more keys: similarity, grouping, router, align, similarity_tokens; unset: off)")

    def __post_init__(self) -> None:
        self.routing  # noqa: B018  (validates it now)
        self.compression  # noqa: B018  (validates it now)
        if self.trace_experts is not None:
            self.trace_experts = str(self.trace_experts)  # a Path is welcome too
        self.speculative  # noqa: B018  (validates it now, not at the first step)
        if self.early_exit is not None and self.speculative is not None:
            # verification rows must come from the full model, or greedy would not be exact
            raise ValueError("early_exit_config cannot be combined with speculative_config: "
                             "speculative decoding verifies proposals with the full model")

    @property
    def speculative(self) -> SpeculativeConfig | None:
        """The speculative decoding settings, or None when off."""
        d = self.speculative_config
        if isinstance(d, SpeculativeConfig):
            return d
        return SpeculativeConfig.from_dict(d) if d else None

    @property
    def early_exit(self) -> EarlyExitConfig | None:
        """The early-exit settings, or None when off."""
        d = self.early_exit_config
        if isinstance(d, EarlyExitConfig):
            return d
        return EarlyExitConfig.from_dict(d) if d else None

    @property
    def routing(self) -> RoutingConfig | None:
        """The dynamic routing settings, or None when off."""
        d = self.dynamic_routing
        if isinstance(d, RoutingConfig):
            return d
        return RoutingConfig.from_dict(d) if d else None

    @property
    def compression(self) -> CompressConfig | None:
        """The expert pruning or merging settings, or None when both are off."""
        if self.expert_pruning and self.expert_merging:
            raise ValueError("expert_pruning and expert_merging cannot both be set: each "
                             "reduces the experts to a target count (pick one)")
        for d, method in ((self.expert_pruning, "prune"), (self.expert_merging, "merge")):
            if isinstance(d, CompressConfig):
                return d
            if d:
                return CompressConfig.from_dict(d, method)
        return None
