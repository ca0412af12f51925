"""Serving an MoE model with offloaded experts: requests work and /metrics reports the
expert cache (hit rates, bytes, loads) next to the engine's other gauges; `--trace-experts`
records the served tokens' routing, written at shutdown."""

from __future__ import annotations

import re

import httpx

from sparsa.config import OffloadConfig
from sparsa.offload.lab.trace import load_trace

from .conftest import API_KEY, MODEL, build_tiny_chat_model, make_server


def _value(text: str, name: str) -> float:
    m = re.search(rf"^{name} (\S+)$", text, re.M)
    assert m, f"{name} not in /metrics"
    return float(m.group(1))


def test_offloaded_moe_serves_and_reports_its_expert_cache(tmp_path):
    path = build_tiny_chat_model(tmp_path / "moe", arch="mixtral")
    trace = tmp_path / "served.csv.gz"
    with make_server(path, model={"offload": OffloadConfig(expert_memory="25%")},
                     engine={"trace_experts": str(trace)}) as srv:
        headers = {"Authorization": f"Bearer {API_KEY}"}
        r = httpx.post(srv.url + "/v1/completions", headers=headers, timeout=60, json={
            "model": MODEL, "prompt": "Hello there", "max_tokens": 8, "temperature": 0,
            "ignore_eos": True})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 8
        text = httpx.get(srv.url + "/metrics").text
        requests = _value(text, "sparsa_expert_cache_requests_total")
        assert requests > 0
        assert _value(text, "sparsa_expert_cache_hits_total") <= requests
        assert 0 <= _value(text, "sparsa_expert_cache_hit_rate") <= 1
        assert 0 <= _value(text, "sparsa_expert_cache_layer_start_hit_rate") <= 1
        assert _value(text, "sparsa_expert_disk_read_bytes_total") > 0
        assert 0 < _value(text, "sparsa_expert_cache_peak_bytes") \
            <= _value(text, "sparsa_expert_cache_budget_bytes")
        assert "sparsa_expert_host_tier_hit_rate" not in text  # no host tier configured
        assert not trace.exists()  # written at shutdown
    rec = load_trace(trace)
    # one prompt: its prompt tokens and 7 of its 8 outputs (the last is never computed),
    # at each of the model's MoE layers
    assert rec.num_tokens >= 7 and rec.num_layers == 2
    # a model without offloading has none of them
    dense = build_tiny_chat_model(tmp_path / "dense")
    with make_server(dense) as srv:
        assert "sparsa_expert_cache" not in httpx.get(srv.url + "/metrics").text
