"""`sparsa bench serve`: vLLM's metric definitions on synthetic results, a short run
against the live test server, and the prefix-cache A/B mode on the tiny model."""

from __future__ import annotations

import json

import pytest

from sparsa.bench.serve import RequestResult, main, parse_slos, summarize
from tests.server.conftest import API_KEY, MODEL


def test_metric_definitions():
    a = RequestResult(success=True, ttft=0.1, latency=1.1, itl=[0.2, 0.3, 0.5],
                      output_tokens=11, prompt_tokens=5)
    b = RequestResult(success=True, ttft=0.3, latency=0.3, itl=[], output_tokens=1,
                      prompt_tokens=7)
    failed = RequestResult(success=False, error="HTTP 429")
    m = summarize([a, b, failed], duration=2.0, slos=parse_slos(["ttft:200", "tpot:150"]))
    assert m["completed"] == 2 and m["failed"] == 1
    assert m["request_throughput"] == pytest.approx(1.0)
    assert m["output_throughput"] == pytest.approx(6.0)
    assert m["total_token_throughput"] == pytest.approx(12.0)
    # TPOT = (e2e - ttft) / (output_tokens - 1), only for requests with > 1 token
    assert m["mean_tpot_ms"] == pytest.approx(100.0)
    # ITL: every gap between chunks, pooled over requests
    assert m["median_itl_ms"] == pytest.approx(300.0)
    assert m["median_ttft_ms"] == pytest.approx(200.0)
    # goodput: only `a` meets ttft <= 200 ms and tpot <= 150 ms
    assert m["goodput"] == pytest.approx(0.5)
    assert m["errors"] == ["HTTP 429"]
    with pytest.raises(ValueError):
        parse_slos(["latency:5"])


@pytest.mark.parametrize("extra", [
    ["--dataset", "random", "--request-rate", "20"],
    ["--dataset", "shared-prefix", "--prefix-len", "12", "--max-concurrency", "2",
     "--endpoint", "chat"],
])
def test_run_against_live_server(server, tmp_path, capsys, extra):
    out = tmp_path / "r.json"
    rc = main(["--base-url", server.url, "--api-key", API_KEY, "--num-prompts", "6",
               "--input-len", "10", "--output-len", "5", "--goodput", "e2el:60000",
               "--result-json", str(out), *extra])
    assert rc == 0
    m = json.loads(out.read_text())
    assert m["completed"] == 6 and m["failed"] == 0
    assert m["total_output_tokens"] == 30
    assert m["goodput"] > 0 and m["median_ttft_ms"] > 0
    assert m["config"]["model"] == MODEL
    assert "median_tpot_ms" in capsys.readouterr().out


def test_prefix_cache_ab(model_dir, tmp_path):
    out = tmp_path / "ab.json"
    rc = main(["--prefix-cache-ab", str(model_dir), "--prefix-len", "192",
               "--ab-num-prompts", "4", "--ab-suffix-len", "8", "--ab-output-len", "4",
               "--max-model-len", "256", "--threads", "1", "--result-json", str(out)])
    assert rc == 0
    r = json.loads(out.read_text())
    assert r["greedy_outputs_identical"]
    assert r["on"]["prefix_cache_hit_rate"] > 0.9 and r["off"]["prefix_cache_hit_rate"] == 0


def test_vs_llamacpp_sparsa_side(model_dir, tmp_path, capsys):
    """The peer comparison's Sparsa half: `sparsa serve` in a child process, token-id prompts
    at two Poisson rates, every request answered with its full length. (llama.cpp's half
    needs llama-server, built by `sparsa bench --vs llama.cpp`; not available in CI.)"""
    out = tmp_path / "vs.json"
    rc = main(["--vs-llamacpp", str(model_dir), "-q", "int8", "--engines", "sparsa",
               "--request-rates", "8,16", "--num-prompts", "4", "--input-len", "12",
               "--output-len", "5", "--parallel", "2", "--threads", "1",
               "--goodput", "e2el:60000", "--result-json", str(out)])
    assert rc == 0
    r = json.loads(out.read_text())
    runs = r["runs"]["sparsa"]
    assert set(runs) == {"8.0", "16.0"}
    for m in runs.values():
        assert m["completed"] == 4 and m["failed"] == 0
        assert m["total_output_tokens"] == 20
        assert m["total_input_tokens"] == 48
    table = capsys.readouterr().out
    assert "| 8 | goodput |" in table and "| 16 | output_throughput |" in table


def test_vs_llamacpp_rejects_bad_rates(model_dir, capsys):
    rc = main(["--vs-llamacpp", str(model_dir), "--request-rates", "0,abc"])
    assert rc == 2
    assert "--request-rates" in capsys.readouterr().err


def test_comparison_table_ratios():
    from sparsa.bench.serve_peer import format_comparison

    t = format_comparison({"sparsa": {0.5: {"goodput": 0.3, "median_ttft_ms": 100.0}},
                           "llama.cpp": {0.5: {"goodput": 0.2, "median_ttft_ms": 400.0}}})
    assert "| 0.5 | goodput | 0.30 | 0.20 | 1.50x |" in t
    assert "| 0.5 | median_ttft_ms | 100.00 | 400.00 | 0.25x |" in t
