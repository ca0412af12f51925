"""Recording routing traces in the engine (`LLM(trace_experts=...)`, `sparsa trace`)."""

from __future__ import annotations

import csv
import gzip
import json

import numpy as np
import pytest
import torch

from sparsa import LLM, SamplingParams
from sparsa.cli import main
from sparsa.offload.lab.cache_sim import simulate
from sparsa.offload.lab.trace import load_trace
from sparsa.offload.policies import make_policy
from sparsa.tokenizer import shared_dir
from tests.tiny_models import TINY_CONFIGS, build_tiny_checkpoint

from .helpers import DEEPSEEK_V2

PROMPTS = [[1, 5, 9, 33, 7], [1, 100, 3], list(range(1, 30)), [1, 250, 4, 4, 4, 8]]
GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
CONFIGS = {
    "mixtral": None,
    # layers 0 and 2 are MoE, layer 1 dense: the trace must name the model's layer numbers
    "qwen2_moe": dict(TINY_CONFIGS["qwen2_moe"], mlp_only_layers=[1], num_hidden_layers=3),
    "deepseek_v2": DEEPSEEK_V2,  # layer 0 dense, 1 and 2 MoE
}
MOE_LAYERS = {"mixtral": [0, 1], "qwen2_moe": [0, 2], "deepseek_v2": [1, 2]}


@pytest.fixture(scope="module")
def build(tmp_path_factory):
    """name -> (name, HF model, checkpoint dir), each built once per module."""
    built: dict[str, tuple] = {}

    def get(name: str):
        if name not in built:
            hf, path = build_tiny_checkpoint(name, tmp_path_factory.mktemp(name),
                                             config=CONFIGS[name])
            built[name] = (name, hf, path)
        return built[name]

    return get


@pytest.fixture(scope="module", params=list(CONFIGS))
def checkpoint(request, build):
    return build(request.param)


def _rows(path) -> list[list[str]]:
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["prompt", "layer", "pos", "token", "experts"]
    return rows[1:]


def _hf_topk(hf, ids: list[int], k: int) -> list[np.ndarray]:
    """transformers' routing of a full sequence: per MoE layer, (T, k) sorted expert ids."""
    with torch.no_grad():
        out = hf(torch.tensor([ids]), output_router_logits=True)
    return [np.sort(torch.topk(r.float(), k, dim=-1).indices.numpy(), axis=1)
            for r in out.router_logits]


def test_trace_has_every_computed_token_and_matches_hf_routing(checkpoint, tmp_path):
    name, hf, path = checkpoint
    ref = [o.outputs[0].token_ids for o in LLM(str(path)).generate(PROMPTS, GREEDY)]
    out = tmp_path / "run.csv.gz"
    # small token budget: chunked prefills share steps with decodes of other requests
    llm = LLM(str(path), trace_experts=str(out), max_num_batched_tokens=16)
    res = llm.generate(PROMPTS, GREEDY)
    assert [o.outputs[0].token_ids for o in res] == ref  # tracing changes nothing
    llm.close()

    rows = _rows(out)
    layers = MOE_LAYERS[name]
    # every token the model processed (the last sampled token never is) at every MoE layer
    assert len(rows) == sum(len(p) + len(r) - 1 for p, r in zip(PROMPTS, ref)) * len(layers)
    assert len({(r[0], r[1], r[2]) for r in rows}) == len(rows)

    tr = load_trace(out)
    assert tr.layers == layers and tr.top_k == 2
    k = tr.top_k
    for o, prompt, gen in zip(res, PROMPTS, ref):
        seq = prompt + gen[:-1]
        mine = tr.subset([o.request_id])
        assert mine.pos.tolist() == list(range(len(seq)))
        assert [int(t) for t in mine.tokens] == seq  # no tokenizer: token ids as text
        want = _hf_topk(hf, seq, k)
        assert len(want) == len(layers)
        for j in range(len(layers)):
            np.testing.assert_array_equal(np.sort(mine.experts[:, j], axis=1), want[j])

    # the trace replays in the cache simulator
    rs = simulate(tr, make_policy("lru"), [2, 3])
    assert [r.requests for r in rs] == [tr.num_tokens * len(layers) * k] * 2
    assert 0 < rs[0].hit_rate <= rs[1].hit_rate <= 1


def test_offloaded_and_quantized_experts_are_traced(build, tmp_path):
    _, _, path = build("mixtral")
    traces = {}
    for label, kw in [("full", {}), ("offload", dict(expert_memory="50%")),
                      ("int8", dict(quantization="int8"))]:
        out = tmp_path / f"{label}.csv"
        with LLM(str(path), trace_experts=str(out), **kw) as llm:
            rids = [o.request_id for o in llm.generate(PROMPTS[:2], GREEDY)]
        tr = load_trace(out)  # sorted by request id, which is random: back to prompt order
        traces[label] = np.concatenate([tr.subset([r]).experts for r in rids])
    full = traces["full"]
    assert full.shape == (sum(len(p) + 7 for p in PROMPTS[:2]), 2, 2)
    for label in ("offload", "int8"):
        assert traces[label].shape == full.shape and (traces[label] >= 0).all()
    # offloading computes the same thing, and its gate lookahead is not recorded
    np.testing.assert_array_equal(traces["offload"], full)


def test_tracing_off_adds_no_hooks_and_flush_api(build, tmp_path):
    _, _, path = build("qwen2_moe")
    llm = LLM(str(path))
    assert llm.engine.tracer is None and llm.engine.runner.tracer is None
    experts = [m for m in llm.engine.model.modules() if type(m).__name__ == "FusedExperts"]
    assert experts and not any(m._forward_pre_hooks for m in experts)
    with pytest.raises(ValueError, match="tracing is off"):
        llm.save_expert_trace(tmp_path / "x.csv")

    out = tmp_path / "t.csv"
    llm = LLM(str(path), trace_experts=str(out))
    assert llm.save_expert_trace() is None  # nothing recorded yet
    llm.generate(PROMPTS[:1], GREEDY)
    n1 = len(_rows(llm.save_expert_trace(tmp_path / "part1.csv")))
    assert n1 == len(llm.engine.tracer) > 0 and not out.exists()
    # n > 1: each sample is its own prompt in the trace
    llm.generate(PROMPTS[1:2], SamplingParams(n=2, temperature=1.0, seed=0, max_tokens=3,
                                              ignore_eos=True))
    llm.close()
    prompts = {r[0] for r in _rows(out)}
    assert len(prompts) == 3 and sum(p.endswith((".0", ".1")) for p in prompts) == 2
    assert not any(m._forward_pre_hooks for m in llm.engine.model.modules())


def test_trace_and_generate_commands_then_cache_sim(build, tmp_path, capsys, monkeypatch):
    _, _, path = build("deepseek_v2")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(",".join(map(str, p)) for p in PROMPTS) + "\n\n")
    train, test = tmp_path / "train.csv.gz", tmp_path / "test.csv.gz"
    for out, offset, n in [(train, 0, 3), (test, 3, 1)]:
        rc = main(["trace", str(path), "--prompts", str(prompts), "--out", str(out),
                   "--max-tokens", "4", "--ignore-eos", "--offset", str(offset),
                   "--num-prompts", str(n)])
        assert rc == 0
    assert "traced 3 prompts" in capsys.readouterr().err
    tr = load_trace(train)
    assert list(np.unique(tr.prompts)) == ["0", "1", "2"] and tr.layers == [1, 2]
    assert tr.num_tokens == sum(len(p) + 3 for p in PROMPTS[:3])

    rc = main(["cache-sim", "--trace", str(test), "--train", str(train), "--capacity", "2,4",
               "--policy", "lru,lfu,belady", "--json"])
    doc = json.loads(capsys.readouterr().out)
    assert rc == 0 and {r["policy"] for r in doc["results"]} == {"lru", "lfu", "belady"}

    gen = tmp_path / "gen.csv"
    rc = main(["generate", str(path), "--prompt-ids", "1,5,9", "--max-tokens", "3",
               "--temperature", "0", "--trace-experts", str(gen)])
    assert rc == 0 and len(_rows(gen)) == (3 + 2) * 2

    rc = main(["trace", str(path), "--prompts", str(prompts), "--out", str(test),
               "--offset", "10"])
    assert rc == 2 and "no prompts" in capsys.readouterr().err


@pytest.mark.skipif(not (shared_dir() / "models" / "tinymoe-stories" / "config.json").is_file()
                    or not (shared_dir() / "corpora" / "tinystories_val.txt").is_file(),
                    reason="shared tinymoe-stories / corpus not present")
def test_trace_command_on_tinymoe_stories_writes_token_text(tmp_path):
    out = tmp_path / "stories.csv.gz"
    model = shared_dir() / "models" / "tinymoe-stories"
    rc = main(["trace", str(model), "--out", str(out), "--num-prompts", "2",
               "--max-tokens", "4", "--prompt-len", "8", "--kv-cache-memory", "64MiB"])
    assert rc == 0
    tr = load_trace(out)
    assert tr.layers == [0, 1, 2, 3] and tr.num_tokens == 2 * (8 + 3)
    assert tr.tokens[0] == "<s>" and all(not t.isdigit() for t in tr.tokens)
