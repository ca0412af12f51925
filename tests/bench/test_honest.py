"""The pieces of an honest `sparsa bench --vs`: CPU facts, the read probe, alternating tg
rounds and their statistics, llama.cpp's bytes per token from a GGUF, the real-model suite."""

from __future__ import annotations

from pathlib import Path

import pytest

from sparsa.bench.env import ReadProbe, env_line, environment, parse_cpu, roofline_share, spread
from sparsa.bench.pairs import alternate_tg, sequential_tg, summarize
from sparsa.bench.real import SUITES, SuiteEntry, entry_needs, format_suite, skip_reason

LSCPU = """Architecture:             x86_64
Model name:               Intel(R) Xeon(R) Platinum 8480+
Flags:                    fpu sse2 avx avx2 fma avx512f avx512bw avx512_vnni avx512_bf16 \
amx_bf16 amx_tile amx_int8
"""
CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 7B13
flags\t\t: fpu sse2 avx avx2 fma
"""


def test_parse_cpu_from_lscpu_and_cpuinfo():
    assert parse_cpu(LSCPU) == {"model": "Intel(R) Xeon(R) Platinum 8480+",
                                "flags": ["avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx"]}
    assert parse_cpu("", CPUINFO) == {"model": "AMD EPYC 7B13", "flags": ["avx2"]}
    assert parse_cpu("Architecture: x86_64\n", CPUINFO)["model"] == "AMD EPYC 7B13"
    assert parse_cpu("", "") == {"model": "unknown", "flags": []}


def test_environment_names_cpu_threads_versions():
    env = environment(3, llamacpp="0.3.36")
    assert env["threads"] == 3 and env["llama.cpp"] == "0.3.36" and env["torch"]
    assert env["date"].endswith("UTC")
    line = env_line(env)
    assert "3 threads" in line and "llama.cpp 0.3.36" in line and env["cpu"]["model"] in line


def test_spread_and_roofline_share():
    assert spread([3.0, 1.0, 2.0, 10.0]) == {"median": 2.5, "min": 1.0, "max": 10.0, "n": 4}
    with pytest.raises(ValueError):
        spread([])
    assert roofline_share(10.0, 2e9, 40e9) == 0.5


def test_read_probe_points_and_summary():
    times = iter([1.0, 0.5, 0.25, 0.5, 9.0, 0.125, 0.25, 1.0])  # warm-up, then 3 readings
    probe = ReadProbe(1, nbytes=1 << 20, readings=3, reader=lambda buf, t: next(times))
    p = probe.point("before")
    mb = 1 << 20
    assert (p["median"], p["min"], p["max"]) == (2 * mb, 2 * mb, 4 * mb)
    probe.point("after")
    s = probe.summary()
    assert s["n"] == 6 and s["min"] == mb and s["max"] == 8 * mb
    assert [q["at"] for q in s["points"]] == ["before", "after"]
    assert s["threads"] == 1 and s["buffer_bytes"] == mb


def test_torch_read_probe_measures_something():
    probe = ReadProbe(1, nbytes=1 << 22, readings=2, use_native=False)
    assert probe.kind == "torch int64 sum"
    assert probe.point("x")["median"] > 1e8  # > 0.1 GB/s on anything


def test_alternate_tg_order_and_paired_ratios():
    log: list[str] = []
    s = iter([10.0, 12.0, 8.0])
    a = iter([5.0, 4.0, 8.0])
    b = iter([20.0, 24.0, 16.0])

    def run(name, it):
        def f():
            log.append(name)
            return next(it)
        return f

    res = alternate_tg(run("s", s), {"a": run("a", a), "b": run("b", b)}, 3,
                       lambda label: log.append(f"probe {label}"))
    assert log == ["probe before", "s", "a", "b", "probe after round 1", "s", "a", "b",
                   "probe after round 2", "s", "a", "b", "probe after"]
    assert res["order"] == ["sparsa", "a", "b"] * 3 and res["mode"] == "alternating"
    assert res["ratio"]["a"] == {"median": 2.0, "min": 1.0, "max": 3.0, "n": 3}
    assert res["ratio"]["b"] == {"median": 0.5, "min": 0.5, "max": 0.5, "n": 3}
    assert res["tok_s"]["sparsa"] == {"median": 10.0, "min": 8.0, "max": 12.0, "n": 3}
    with pytest.raises(ValueError):
        alternate_tg(lambda: 1.0, {}, 0)


def test_sequential_tg_frees_sparsa_before_the_peers():
    log: list[str] = []
    res = sequential_tg(lambda: log.append("s") or 10.0, lambda: log.append("free"),
                        {"a": lambda: log.append("a") or 4.0}, 2, lambda lab: log.append(lab))
    assert log == ["before", "s", "s", "free", "after sparsa", "a", "a", "after a"]
    assert res["mode"] == "sequential" and res["ratio"]["a"]["median"] == 2.5


def test_summarize_needs_equal_rounds():
    with pytest.raises(ValueError):
        summarize({"sparsa": [1.0, 2.0], "a": [1.0]})
    assert summarize({"sparsa": [1.0]})["ratio"] == {}


def _write_gguf(path: Path, tied: bool) -> None:
    from sparsa.bench.peers.gguf_bytes import _gguf_module

    try:
        gguf = _gguf_module()
    except ImportError:
        pytest.skip("no gguf package")
    import numpy as np

    w = gguf.GGUFWriter(str(path), "qwen3moe")
    w.add_expert_count(8)
    w.add_expert_used_count(2)
    w.add_tensor("token_embd.weight", np.zeros((100, 16), np.float32))  # 100 rows of 64 B
    if not tied:
        w.add_tensor("output.weight", np.zeros((100, 16), np.float16))
    w.add_tensor("blk.0.attn_q.weight", np.zeros((16, 16), np.float32))
    w.add_tensor("blk.0.ffn_gate_exps.weight", np.zeros((8, 4, 16), np.float32))
    w.add_tensor("blk.0.ffn_down_exps.weight", np.zeros((8, 16, 4), np.float16))
    w.add_tensor("blk.0.ffn_up_shexp.weight", np.zeros((4, 16), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_gguf_bytes_per_token(tmp_path):
    from sparsa.bench.peers.gguf_bytes import gguf_bytes_per_token

    g = tmp_path / "m.gguf"
    _write_gguf(g, tied=False)
    b = gguf_bytes_per_token(g)
    expert = 8 * 4 * 16 * 4 + 8 * 16 * 4 * 2  # gate f32 + down f16, all 8 experts
    non_expert = 100 * 16 * 2 + 16 * 16 * 4 + 4 * 16 * 4  # output, q, shared expert
    assert b["expert_bytes"] == expert and b["non_expert_bytes"] == non_expert
    assert (b["experts"], b["top_k"]) == (8, 2) and b["embedding_row_bytes"] == 64
    assert b["bytes_per_token"] == non_expert + expert * 2 // 8 + 64
    assert b["types"]["f16"] == 100 * 16 * 2 + 8 * 16 * 4 * 2 and b["file_bytes"] > 0
    t = tmp_path / "tied.gguf"
    _write_gguf(t, tied=True)  # no output.weight: the embedding is the LM head, read in full
    bt = gguf_bytes_per_token(t)
    assert bt["tied_embeddings"]
    assert bt["bytes_per_token"] == non_expert - 100 * 16 * 2 + expert * 2 // 8 + 100 * 64


def test_bytes_per_token_counts_offloaded_experts(tmp_path):
    from sparsa import LLM
    from sparsa.bench.weights import bytes_per_token
    from tests.tiny_models import build_tiny_checkpoint

    _, path = build_tiny_checkpoint("mixtral", tmp_path / "m")
    resident = bytes_per_token(LLM(str(path), kv_cache_memory="16MiB").engine.model)
    llm = LLM(str(path), kv_cache_memory="16MiB", expert_memory="50%",
              offload_store_dir=str(tmp_path / "store"))
    try:
        assert bytes_per_token(llm.engine.model) == resident
    finally:
        llm.close()


def test_suite_lists():
    real = {(e.model, e.quantization): e.vs_types for e in SUITES["real"]}
    assert real[("olmoe-1b-7b", "int8")] == ("q8_0",)
    assert real[("olmoe-1b-7b", "int4")] == ("q4_k_m", "q4_0")
    assert real[("deepseek-v2-lite", "int4")] == ("q4_k_m", "q4_0")
    assert real[("qwen3-30b-a3b", "int4")] == ("q4_k_m", "q4_0")
    assert {"mixtral-mini", "qwen3moe-mini"} <= {m for m, _ in real}
    assert SUITES["minis"] == [e for e in SUITES["real"] if e.model.endswith("-mini")]
    from sparsa.models.builtin_configs import builtin_config

    for e in SUITES["real"]:
        builtin_config(e.model)  # every entry is a built-in config


def test_qwen3_30b_a3b_shape():
    from sparsa.models.builtin_configs import builtin_config

    c = builtin_config("qwen3-30b-a3b")
    assert (c["hidden_size"], c["num_hidden_layers"], c["num_experts"],
            c["num_experts_per_tok"], c["moe_intermediate_size"], c["num_attention_heads"],
            c["num_key_value_heads"], c["head_dim"], c["vocab_size"]) == (
        2048, 48, 128, 8, 768, 32, 4, 128, 151936)


def test_entry_needs_and_skip_reason(tmp_path):
    gib = 1 << 30
    e = SuiteEntry("x", "int4", ("q4_k_m", "q4_0"))
    info = {"total_params": 10 * gib, "weight_bytes": 6 * gib, "buffer_bytes": 0}
    ckpt = tmp_path / "x-seed0"
    n = entry_needs(e, ckpt, tmp_path / "gguf", info)
    assert n["disk_checkpoint"] == 20 * gib  # bf16 dummy
    # both q4 types plus the bf16 GGUF llama-quantize starts from
    assert n["disk_gguf"] == int(10 * gib * (4.85 / 8 + 18 / 32 + 2))
    assert n["ram"] == int(10 * gib * 4.85 / 8)  # the Q4_K_M file beats Sparsa's 6 GiB
    ckpt.mkdir()
    (ckpt / "config.json").write_text("{}")
    (tmp_path / "gguf").mkdir()
    for t in ("q4_k_m", "q4_0"):
        (tmp_path / "gguf" / f"x-seed0-{t}.gguf").write_bytes(b"")
    done = entry_needs(e, ckpt, tmp_path / "gguf", info)
    assert done["disk_checkpoint"] == done["disk_gguf"] == 0
    assert skip_reason(done, 0, 0, True, 100 * gib) is None
    why = skip_reason(n, 50 * gib, 50 * gib, True, 100 * gib)
    assert why and "disk" in why and "50.0 GiB free" in why
    assert skip_reason(n, 50 * gib, 50 * gib, False, 100 * gib) is None  # two disks
    why = skip_reason(done, 0, 0, True, 7 * gib)
    assert why and "RAM" in why


def test_format_suite():
    rows = [{"model": "m", "quantization": "int8", "skipped": "needs disk"},
            {"model": "n", "quantization": "int4", "tg_tok_s": {"sparsa": 30.0, "lc": 20.0},
             "tg_ratio": {"lc": 1.5}, "roofline_share": {"sparsa": 0.6, "lc": 0.5}}]
    out = format_suite(rows)
    assert "| m | int8 | skipped: needs disk |" in out
    assert "| n | int4 | 30.0 | lc | 20.0 | 1.50x | 60% / 50% |" in out


def test_run_suite_skips_what_does_not_fit_and_runs_the_rest(tmp_path, monkeypatch, capsys):
    import argparse

    import sparsa.bench.real as br
    import sparsa.bench.vs
    import sparsa.bench.weights

    gib = 1 << 30
    monkeypatch.setattr(br, "SUITES", {"t": [SuiteEntry("small", "int4", ("q4_k_m", "q4_0")),
                                             SuiteEntry("huge", "int4", ("q4_k_m",))]})
    monkeypatch.setattr(br, "entry_needs", lambda e, ck, gd: {
        "disk_checkpoint": 0, "disk_gguf": 0, "ram": (1 if e.model == "small" else 1000) * gib})
    monkeypatch.setattr(br, "mem_available", lambda: 20 * gib)
    monkeypatch.setenv("SPARSA_LLAMACPP_DIR", str(tmp_path / "lc"))
    monkeypatch.setattr(sparsa.bench.weights, "ensure_checkpoint",
                        lambda name, cache: tmp_path / name)
    calls = []

    def fake_run_vs(sub, path, results, probe=None):
        calls.append((sub.model, sub.quantization, sub.vs_types, sub.vs, path.name))
        results["tg"] = {"mode": "alternating",
                         "tok_s": {"sparsa": {"median": 30.0}, "llama.cpp:q4_0": {"median": 20.0}},
                         "ratio": {"llama.cpp:q4_0": {"median": 1.5}}}
        results["sparsa"] = {"roofline_share": 0.5}
        return 0

    monkeypatch.setattr(sparsa.bench.vs, "run_vs", fake_run_vs)
    args = argparse.Namespace(suite="t", vs=None, cache_dir=str(tmp_path / "c"),
                              json_out=str(tmp_path / "out"), model="x", quantization="none",
                              vs_types=None)
    assert br.run_suite(args) == 0
    assert calls == [("small", "int4", "q4_k_m,q4_0", "llama.cpp", "small")]
    out = capsys.readouterr().out
    assert "=== huge int4: skipped: needs 1000.0 GiB of RAM" in out
    assert "| small | int4 | 30.0 | llama.cpp:q4_0 | 20.0 | 1.50x | 50% / 0% |" in out
    import json

    summary = json.loads((tmp_path / "out" / "suite.json").read_text())
    assert [r.get("skipped", "ran")[:5] for r in summary] == ["ran", "needs"]


def test_bytes_per_token_tied_head(tmp_path):
    """A tied model reads its embedding table as the output projection; once the head is
    quantized, the step reads the quantized head and the table is only a lookup."""
    from sparsa import LLM
    from sparsa.bench.weights import bytes_per_token
    from tests.tiny_models import build_tiny_checkpoint

    _, path = build_tiny_checkpoint("llama-tied-rope-llama3", tmp_path / "m")
    full = LLM(str(path), kv_cache_memory="16MiB").engine.model
    q8 = LLM(str(path), kv_cache_memory="16MiB", quantization="int8").engine.model
    table = q8.model.embed_tokens.weight
    assert full.lm_head.weight is full.model.embed_tokens.weight
    everything = sum(t.numel() * t.element_size()
                     for t in list(full.parameters()) + list(full.buffers()))
    assert bytes_per_token(full) == everything  # the table counted once, as the head
    assert type(q8.lm_head).__name__ == "Int8Linear"  # the tied head quantized on its own
    q8_all = {id(t): t for t in list(q8.parameters()) + list(q8.buffers()) if t is not None}
    q8_total = sum(t.numel() * t.element_size() for t in q8_all.values())
    assert bytes_per_token(q8) == q8_total - table.numel() * table.element_size()
