"""The beyond-RAM benchmark's pure parts: engine names, budgets, prompt, result maths and
formatting, the timeout-safe child runner (no 31 GB model needed)."""

from __future__ import annotations

import json
import time

import pytest
import torch
from safetensors.torch import save_file

from sparsa.bench import beyond_ram as br


def test_parse_engines_aliases_order_and_errors():
    assert br.parse_engines("llama.cpp,hf") == ["llama.cpp", "hf"]
    assert br.parse_engines("transformers, LlamaCpp ,sparsa,hf") == ["hf", "llama.cpp", "sparsa"]
    with pytest.raises(ValueError, match="unknown engine 'vllm'"):
        br.parse_engines("sparsa,vllm")


def test_parser_defaults_and_peers_alias():
    from sparsa.config import resolve_engine_args

    a = resolve_engine_args(br.build_parser().parse_args(["/m", "--peers", "llama.cpp"]))
    assert a.engines == "llama.cpp" and a.budgets == "25%,50%"
    assert (a.prompt_len, a.max_tokens, a.hf_max_tokens, a.num_threads) == (16, 8, 4, 2)


def test_budget_bytes_matches_sparsa():
    assert br.budget_bytes("25%", 1000) == 250
    assert br.budget_bytes("1KiB", 10**6) == 1024
    with pytest.raises(ValueError):
        br.budget_bytes("0%", 1000)


def test_prompt_is_bench_offloads():
    g = torch.Generator().manual_seed(0)
    assert br.prompt_ids(1000, 16) == torch.randint(3, 1000, (16,), generator=g).tolist()
    assert br.prompt_ids(1000, 16) != br.prompt_ids(1000, 16, seed=1)
    assert min(br.prompt_ids(50, 200)) >= 3


def test_decode_tok_s():
    assert br.decode_tok_s(8, 10.0, 3.0) == pytest.approx(1.0)
    assert br.decode_tok_s(1, 10.0, 3.0) is None
    assert br.decode_tok_s(4, 3.0, 3.0) is None


def test_checkpoint_split_counts_routed_experts_only(tmp_path):
    save_file({"model.layers.1.mlp.experts.0.up_proj.weight": torch.zeros(4, 8),
               "model.layers.1.mlp.shared_experts.up_proj.weight": torch.zeros(2, 8),
               "model.embed_tokens.weight": torch.zeros(3, 8, dtype=torch.bfloat16)},
              str(tmp_path / "a.safetensors"))
    assert br.checkpoint_split(tmp_path) == (4 * 8 * 4, 2 * 8 * 4 + 3 * 8 * 2)
    with pytest.raises(FileNotFoundError):
        br.checkpoint_split(tmp_path / "none")


def test_hf_cpu_memory_and_ratios():
    assert br.hf_cpu_memory(100, 50, 7) == 157
    res = [{"engine": "sparsa", "budget": "25%", "decode_tok_s": 3.0, "ttft_s": 2.0},
           {"engine": "llama.cpp", "budget": "mmap", "decode_tok_s": 1.0, "ttft_s": 8.0},
           {"engine": "hf", "budget": "25%", "decode_tok_s": None, "ttft_s": 100.0},
           {"engine": "hf", "budget": "50%", "decode_tok_s": 0.5, "ttft_s": 1.0}]
    lines = br.ratio_lines(res)
    assert lines == ["budget 25%: Sparsa / llama.cpp (mmap): decode 3.00x, TTFT 4.00x faster",
                     "budget 25%: Sparsa / hf (25%): decode n/ax, TTFT 50.00x faster"]
    table = br.format_results(res).splitlines()
    assert len(table) == 2 + len(res)
    assert table[3].startswith("| llama.cpp | mmap |") and "| 1.000 |" in table[3]
    assert "| - |" in table[4]  # no decode rate


def test_same_tokens_reports_divergence():
    res = [{"engine": "sparsa", "budget": "25%", "tokens": [1, 2, 3]},
           {"engine": "hf", "budget": "25%", "tokens": [1, 2]},
           {"engine": "llama.cpp", "budget": "mmap", "tokens": [1, 5, 3]}]
    out = br.same_tokens(res)
    assert len(out) == 1 and out[0].startswith("llama.cpp mmap")


def _sleepy(path: str, seconds: float) -> None:
    rec = br._Recorder(path, {"engine": "x", "budget": "b"})
    rec.token([0.5, 1.5], [7, 8])
    time.sleep(seconds)
    rec.save(note="finished")


def _failing(path: str) -> None:
    br._Recorder(path, {"engine": "x", "budget": "b"}).save(note="loading")
    raise RuntimeError("boom")


def test_run_isolated_keeps_partial_results():
    r = br.run_isolated(_sleepy, (60,), timeout=10)
    assert r["timed_out"] and r["n_tokens"] == 2 and r["decode_tok_s"] == pytest.approx(1.0)
    assert "timeout" in r["note"] and r["peak_rss_bytes"] > 0
    r = br.run_isolated(_sleepy, (0,), timeout=60)
    assert "timed_out" not in r and r["note"] == "finished"
    r = br.run_isolated(_failing, (), timeout=60)
    assert r["exitcode"] == 1 and r["note"].startswith("loading; exited")
    json.dumps(r)


def test_parse_caps_one_per_budget():
    assert br.parse_caps(None, ["25%"]) == {}
    assert br.parse_caps("12GiB, 1e9B", ["25%", "50%"]) == {"25%": 12 << 30, "50%": 10**9}
    with pytest.raises(ValueError, match="one size per budget"):
        br.parse_caps("12GiB", ["25%", "50%"])
    a = br.build_parser().parse_args(["/m", "--llamacpp-caps", "1GiB,2GiB",
                                      "--no-llamacpp-uncapped"])
    assert a.llamacpp_caps == "1GiB,2GiB" and a.no_llamacpp_uncapped


def test_join_memory_cgroup_writes_limit_and_pid(tmp_path):
    cg = br.join_memory_cgroup(123, root=tmp_path)
    assert (cg / "memory.limit_in_bytes").read_text() == "123"
    assert (cg / "cgroup.procs").read_text().isdigit()
    for f in cg.iterdir():
        f.unlink()
    br._remove_cgroups(root=tmp_path)
    assert not cg.exists()


def test_from_json_reports_without_running(tmp_path, capsys):
    f = tmp_path / "r.json"
    f.write_text(json.dumps([{"engine": "sparsa", "budget": "25%", "decode_tok_s": 2.0,
                              "ttft_s": 1.0},
                             {"engine": "llama.cpp", "budget": "25%", "decode_tok_s": 1.0,
                              "ttft_s": 3.0}]))
    assert br.main(["/nonexistent", "--from-json", str(f)]) == 0
    out = capsys.readouterr().out
    assert "Sparsa / llama.cpp (25%): decode 2.00x, TTFT 3.00x faster" in out


def test_hf_offload_copy_estimate():
    assert br.hf_offload_copy_bytes(100, 20, 50) == 70
    assert br.hf_offload_copy_bytes(100, 20, 500) == 0
