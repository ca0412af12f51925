"""Prometheus metrics. Each server gets its own registry, so several servers in one
process (tests) don't clash; engine gauges are read at scrape time."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                    7.5, 10.0, 20.0, 40.0, 80.0, 160.0)
_HTTP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3,
                 0.4, 0.5, 0.75, 1.0, 2.5)


class _EngineCollector(Collector):
    def __init__(self, stats: Callable[[], dict]):
        self._stats = stats

    def collect(self) -> Iterable[GaugeMetricFamily | CounterMetricFamily]:
        s = self._stats()
        yield GaugeMetricFamily("sparsa_num_requests_running",
                                "Sequences in the running batch", value=s["running"])
        yield GaugeMetricFamily("sparsa_num_requests_waiting",
                                "Sequences waiting to be scheduled (queue length)",
                                value=s["waiting"])
        yield GaugeMetricFamily("sparsa_kv_cache_usage_perc",
                                "Fraction of KV blocks in use", value=s["kv_usage"])
        yield GaugeMetricFamily("sparsa_prefix_cache_hit_rate",
                                "Prompt tokens found in the prefix cache / tokens looked up",
                                value=s["prefix_cache_hit_rate"])
        yield GaugeMetricFamily("sparsa_prefix_cache_queries_tokens",
                                "Prompt tokens looked up in the prefix cache",
                                value=s["prefix_cache_query_tokens"])
        yield GaugeMetricFamily("sparsa_prefix_cache_hits_tokens",
                                "Prompt tokens found in the prefix cache",
                                value=s["prefix_cache_hit_tokens"])
        yield GaugeMetricFamily("sparsa_tokens_in_flight",
                                "Admitted tokens (n * (prompt + max_tokens)) not yet finished",
                                value=s.get("tokens_in_flight", 0))
        yield CounterMetricFamily("sparsa_num_preemptions",
                                  "Sequences preempted (KV blocks freed, recomputed later)",
                                  value=s.get("num_preemptions", 0))
        if "offload" in s:
            yield from _offload_metrics(s["offload"])
        if "speculative" in s:  # vLLM's names for the same counters
            sp = s["speculative"]
            for name, key, doc in (
                    ("sparsa_spec_decode_num_draft_tokens", "proposed", "Tokens proposed"),
                    ("sparsa_spec_decode_num_accepted_tokens", "accepted",
                     "Proposed tokens the target accepted"),
                    ("sparsa_spec_decode_num_drafts", "verify_steps",
                     "Sequence steps that verified proposals")):
                yield CounterMetricFamily(name, doc, value=sp[key])


# (name, report key, help) of the expert cache's metrics, when experts are offloaded
_OFFLOAD_GAUGES = (
    ("sparsa_expert_cache_hit_rate", "hit_rate",
     "Expert requests served from the expert cache (or a load already done) / requests"),
    ("sparsa_expert_cache_layer_start_hit_rate", "layer_start_hit_rate",
     "Expert requests resident when their layer began / requests"),
    ("sparsa_expert_cache_resident_bytes", "resident_bytes",
     "Bytes of experts held or being loaded in the expert cache"),
    ("sparsa_expert_cache_budget_bytes", "budget_bytes", "The expert cache's budget"),
    ("sparsa_expert_cache_peak_bytes", "peak_bytes", "Most expert bytes ever held at once"),
    ("sparsa_expert_prefetch_recall", "lookahead_recall",
     "Needed experts that prefetch guessed / needed experts"),
    ("sparsa_expert_host_tier_hit_rate", "host_hit_rate",
     "Device loads served from the host tier / device loads through it"),
)
_OFFLOAD_COUNTERS = (
    ("sparsa_expert_cache_requests", "requests", "Expert requests of MoE layers"),
    ("sparsa_expert_cache_hits", "hits", "Expert requests served without waiting for a load"),
    ("sparsa_expert_cache_evictions", "evictions", "Experts evicted from the expert cache"),
    ("sparsa_expert_prefetches", "prefetches", "Expert loads started by a prefetch guess"),
    ("sparsa_expert_disk_loads", "disk_loads", "Experts read from disk"),
    ("sparsa_expert_disk_read_bytes", "disk_bytes_read", "Bytes of experts read from disk"),
    ("sparsa_expert_load_wait_seconds", "wait_seconds",
     "Time MoE layers waited for expert loads"),
    ("sparsa_expert_substitutions", "substitutions",
     "Misses computed with another copy (low precision, or the host tier's) instead"),
)


def _offload_metrics(rep: dict) -> Iterable[GaugeMetricFamily | CounterMetricFamily]:
    for name, key, doc in _OFFLOAD_GAUGES:
        if key in rep:
            yield GaugeMetricFamily(name, doc, value=rep[key])
    for name, key, doc in _OFFLOAD_COUNTERS:
        if key in rep:
            yield CounterMetricFamily(name, doc, value=rep[key])


class ServerMetrics:
    def __init__(self, stats: Callable[[], dict]):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("sparsa_requests", "HTTP requests by endpoint and status",
                                ["endpoint", "status"], registry=r)
        # how long the server took to start answering: for a rejection its whole cost
        self.response_start = Histogram(
            "sparsa_http_response_start_seconds",
            "Request arrival to response start, by endpoint and status class",
            ["endpoint", "status"], buckets=_HTTP_BUCKETS, registry=r)
        self.finished = Counter("sparsa_request_success", "Finished generations by reason",
                                ["finish_reason"], registry=r)
        self.prompt_tokens = Counter("sparsa_prompt_tokens", "Prompt tokens processed",
                                     registry=r)
        self.generation_tokens = Counter("sparsa_generation_tokens", "Tokens generated",
                                         registry=r)
        self.ttft = Histogram("sparsa_time_to_first_token_seconds", "Time to first token",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("sparsa_time_per_output_token_seconds",
                              "(e2e - ttft) / (output tokens - 1), per request",
                              buckets=_TPOT_BUCKETS, registry=r)
        self.e2e = Histogram("sparsa_e2e_request_latency_seconds", "End-to-end latency",
                             buckets=_LATENCY_BUCKETS, registry=r)
        r.register(_EngineCollector(stats))

    def observe_request(self, ttft: float | None, e2e: float, prompt_tokens: int,
                        output_tokens: int, finish_reasons: Iterable[str | None]) -> None:
        if ttft is not None:
            self.ttft.observe(ttft)
            if output_tokens > 1:
                self.tpot.observe((e2e - ttft) / (output_tokens - 1))
        self.e2e.observe(e2e)
        self.prompt_tokens.inc(prompt_tokens)
        self.generation_tokens.inc(output_tokens)
        for r in finish_reasons:
            self.finished.labels(r or "unknown").inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
