"""`LLM`: the offline API, with vLLM's semantics for generate() and chat()."""

from __future__ import annotations

from collections.abc import Sequence as Seq

from sparsa.config import (
    CacheConfig,
    DeviceConfig,
    EngineConfig,
    ModelConfig,
    OffloadConfig,
    SchedulerConfig,
)
from sparsa.engine.llm_engine import LLMEngine
from sparsa.outputs import RequestOutput
from sparsa.sampling_params import SamplingParams

PromptType = str | list[int] | dict


class LLM:
    def __init__(
        self,
        model: str,
        *,
        tokenizer: str | None = None,
        dtype: str = "auto",
        load_format: str = "auto",
        max_model_len: int | None = None,
        seed: int = 0,
        quantization: str | None = None,
        quantization_group_size: int = 64,
        int8_activations: str = "dynamic",
        bf16_prefill: bool | None = None,
        when_too_large: str = "offload",
        expert_memory: str | int | None = None,
        offload_policy: str = "lru",
        offload_prefetch: str = "lookahead",
        offload_prefetch_evicts: str = "cold",
        offload_prefetch_when_idle: bool = False,
        offload_lookahead_extra: int = 0,
        offload_on_miss: str = "wait",
        offload_low_precision: str = "int4",
        offload_io_threads: int = 2,
        offload_predictor_trace: str | None = None,
        offload_history_topk: int | None = None,
        offload_store_dir: str | None = None,
        offload_host_memory: str | int | None = None,
        offload_host_compute_max_rows: int = 4,
        offload_compression: str = "none",
        offload_capacity: str = "global",
        block_size: int = 16,
        kv_cache_memory: str | int | None = None,
        num_kv_blocks: int | None = None,
        max_num_seqs: int = 64,
        max_num_batched_tokens: int = 2048,
        enable_chunked_prefill: bool = True,
        enable_prefix_caching: bool = False,
        scheduling_policy: str = "fcfs",
        device: str = "auto",
        num_threads: int | None = None,
        native_decode: bool = True,
        trace_experts: str | None = None,
    ):
        config = EngineConfig(
            model=ModelConfig(model, tokenizer=tokenizer, dtype=dtype, load_format=load_format,
                              max_model_len=max_model_len, seed=seed,
                              quantization=quantization,
                              quantization_group_size=quantization_group_size,
                              int8_activations=int8_activations,
                              bf16_prefill=bf16_prefill, when_too_large=when_too_large,
                              offload=OffloadConfig(expert_memory=expert_memory,
                                                    policy=offload_policy,
                                                    prefetch=offload_prefetch,
                                                    prefetch_evicts=offload_prefetch_evicts,
                                                    prefetch_when_idle=(
                                                        offload_prefetch_when_idle),
                                                    lookahead_extra=offload_lookahead_extra,
                                                    on_miss=offload_on_miss,
                                                    low_precision=offload_low_precision,
                                                    io_threads=offload_io_threads,
                                                    predictor_trace=offload_predictor_trace,
                                                    history_topk=offload_history_topk,
                                                    store_dir=offload_store_dir,
                                                    host_memory=offload_host_memory,
                                                    host_compute_max_rows=(
                                                        offload_host_compute_max_rows),
                                                    compression=offload_compression,
                                                    capacity=offload_capacity)),
            cache=CacheConfig(block_size=block_size, kv_cache_memory=kv_cache_memory,
                              num_blocks=num_kv_blocks,
                              enable_prefix_caching=enable_prefix_caching),
            scheduler=SchedulerConfig(max_num_seqs=max_num_seqs,
                                      max_num_batched_tokens=max_num_batched_tokens,
                                      enable_chunked_prefill=enable_chunked_prefill,
                                      policy=scheduling_policy),
            device=DeviceConfig(device=device, num_threads=num_threads,
                                native_decode=native_decode),
            trace_experts=str(trace_experts) if trace_experts is not None else None,
        )
        self.engine = LLMEngine(config)

    def get_tokenizer(self):
        return self.engine.tokenizer

    def save_expert_trace(self, path: str | None = None, clear: bool = False):
        """Write the expert-routing trace recorded so far (``trace_experts=`` must be set):
        to ``path``, or to the ``trace_experts`` path by default; returns the path written,
        or None when no MoE layer has run yet. ``clear`` drops the rows written."""
        return self.engine.save_expert_trace(path, clear=clear)

    def close(self) -> None:
        """Shut the engine down: writes the expert trace when ``trace_experts`` is set
        (also done when the LLM is garbage collected or the interpreter exits)."""
        self.engine.shutdown()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @staticmethod
    def _normalize(prompts) -> list[PromptType]:
        if isinstance(prompts, str):
            return [prompts]
        if isinstance(prompts, dict):
            return [prompts]
        if isinstance(prompts, Seq) and prompts and all(
            isinstance(t, int) and not isinstance(t, bool) for t in prompts
        ):
            return [list(prompts)]
        if isinstance(prompts, Seq):
            return list(prompts)
        raise TypeError("prompts must be a string, a list of token ids, or a list of those")

    def generate(
        self,
        prompts,
        sampling_params: SamplingParams | list[SamplingParams] | None = None,
        priority: list[int] | None = None,
        use_tqdm: bool = False,
    ) -> list[RequestOutput]:
        items = self._normalize(prompts)
        if isinstance(sampling_params, list):
            if len(sampling_params) != len(items):
                raise ValueError("sampling_params list must have one entry per prompt")
            params = sampling_params
        else:
            params = [sampling_params or SamplingParams()] * len(items)
        if priority is not None and len(priority) != len(items):
            raise ValueError("priority must have one entry per prompt")
        ids = []
        try:
            for i, (p, sp) in enumerate(zip(items, params)):
                if isinstance(p, dict):
                    p = p.get("prompt_token_ids", p.get("prompt"))
                ids.append(self.engine.add_request(
                    p, sp, priority=priority[i] if priority else 0))
        except Exception:
            for rid in ids:
                self.engine.abort_request(rid)
            raise
        results: dict[str, RequestOutput] = {}
        while self.engine.has_unfinished_requests():
            for out in self.engine.step():
                if out.finished:
                    results[out.request_id] = out
        return [results[r] for r in ids]

    def chat(
        self,
        messages: list[dict] | list[list[dict]],
        sampling_params: SamplingParams | None = None,
        chat_template: str | None = None,
        add_generation_prompt: bool = True,
    ) -> list[RequestOutput]:
        tok = self.engine.tokenizer
        if tok is None:
            raise ValueError("this model has no tokenizer, so chat() is unavailable")
        convs = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = []
        for conv in convs:
            if not getattr(tok, "chat_template", None) and chat_template is None:
                raise ValueError("the tokenizer has no chat template; pass chat_template=")
            ids = tok.apply_chat_template(conv, chat_template=chat_template, tokenize=True,
                                          add_generation_prompt=add_generation_prompt)
            if isinstance(ids, dict) or hasattr(ids, "input_ids"):
                ids = ids["input_ids"]
            prompts.append(list(ids))
        return self.generate(prompts, sampling_params)
