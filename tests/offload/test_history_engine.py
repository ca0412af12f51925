"""History prefetch in the engine: predictors fit on a trace recorded from the same model."""

from __future__ import annotations

import json

import pytest

from sparsa import LLM, SamplingParams
from sparsa.cli import main
from sparsa.config import OffloadConfig
from sparsa.offload.lab.trace_cli import read_prompts
from sparsa.tokenizer import shared_dir

from .helpers import moe_checkpoint
from .test_offload_engine import GREEDY, PROMPTS

TRAIN_PROMPTS = [[1, 5, 9, 33, 7, 8], [1, 100, 3, 3], list(range(40, 80)), [1, 9, 9, 9]]


@pytest.fixture(scope="module", params=["mixtral", "deepseek_v2"])
def traced(request, tmp_path_factory):
    """A tiny checkpoint, its all-resident greedy outputs, and a routing trace recorded
    from other prompts."""
    root = tmp_path_factory.mktemp(request.param)
    path = moe_checkpoint(request.param, root)
    ref = [o.outputs[0].token_ids for o in LLM(str(path)).generate(PROMPTS, GREEDY)]
    trace = root / "train.csv.gz"
    llm = LLM(str(path), trace_experts=str(trace))
    llm.generate(TRAIN_PROMPTS, GREEDY)
    llm.save_expert_trace()
    return path, ref, trace


@pytest.mark.parametrize("prefetch", ["history", "lookahead+history"])
def test_history_prefetch_keeps_greedy_outputs(traced, prefetch):
    path, ref, trace = traced
    llm = LLM(str(path), expert_memory="30%", offload_prefetch=prefetch,
              offload_predictor_trace=str(trace))
    assert [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY)] == ref
    assert llm.generate([PROMPTS[0]], GREEDY)[0].outputs[0].token_ids == ref[0]
    rep = llm.engine.model.offload.report()
    assert rep["peak_bytes"] <= rep["budget_bytes"] and rep["prefetches"] > 0
    assert 0 < rep["history_recall"] <= 1 and 0 < rep["history_precision"] <= 1
    # the union with the gate's guesses recalls at least what history alone does
    assert rep["lookahead_recall"] >= rep["history_recall"]


def test_history_prefetch_errors(traced, tmp_path):
    path = traced[0]
    with pytest.raises(ValueError, match="predictor_trace"):
        OffloadConfig(expert_memory="25%", prefetch="history")
    with pytest.raises(ValueError, match="prefetch must be one of"):
        OffloadConfig(expert_memory="25%", prefetch="oracle")
    with pytest.raises(ValueError, match="history_topk"):
        OffloadConfig(expert_memory="25%", history_topk=0)
    with pytest.raises(FileNotFoundError, match="predictor trace"):
        LLM(str(path), expert_memory="25%", offload_prefetch="history",
            offload_predictor_trace=str(tmp_path / "none.csv"))
    bad = tmp_path / "bad.csv"
    bad.write_text("prompt,layer,pos,token,experts\n0,77,0,1,0 1\n")
    with pytest.raises(ValueError, match="MoE layers"):
        LLM(str(path), expert_memory="25%", offload_prefetch="history",
            offload_predictor_trace=str(bad))
    bad.write_text("not a trace\n")
    with pytest.raises(ValueError, match="predictor trace"):
        LLM(str(path), expert_memory="25%", offload_prefetch="history",
            offload_predictor_trace=str(bad))


def test_cli_offload_options(traced, capsys):
    path, ref, trace = traced
    prompt = ",".join(map(str, PROMPTS[0]))
    assert main(["generate", str(path), "--prompt-ids", prompt, "--temperature", "0",
                 "--max-tokens", "24", "--ignore-eos", "--json", "--expert-memory", "30%",
                 "--offload-prefetch", "lookahead+history",
                 "--offload-predictor-trace", str(trace)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["results"][0]["outputs"][0]["token_ids"] == ref[0]


def test_tinymoe_history_recall():
    """On the real trained MoE, history prefetch fit on other stories' routing: its recall,
    and lookahead + history (3 per token) past 90%."""
    model = shared_dir() / "models" / "tinymoe-stories"
    corpus = shared_dir() / "corpora" / "tinystories_val.txt"
    if not model.exists() or not corpus.exists():
        pytest.skip(f"{model} not found (set SPARSA_SHARED)")
    import tempfile
    from pathlib import Path

    sp = SamplingParams(temperature=0, max_tokens=48)
    texts = read_prompts(corpus, True, 50, 0)
    with tempfile.TemporaryDirectory() as tmp:
        trace = Path(tmp) / "train.csv.gz"
        rec = LLM(str(model), trace_experts=str(trace))
        rec.generate(texts[10:], sp)
        rec.save_expert_trace()
        ref = [o.outputs[0].token_ids for o in LLM(str(model)).generate(texts[:10], sp)]
        llm = LLM(str(model), expert_memory="25%", offload_prefetch="lookahead+history",
                  offload_predictor_trace=str(trace), offload_history_topk=3)
        outs = [llm.generate([t], sp)[0].outputs[0].token_ids for t in texts[:10]]
    assert outs == ref
    rep = llm.engine.model.offload.report()
    assert rep["history_recall"] > 0.7
    assert rep["lookahead_recall"] > 0.85


def test_activation_policy_in_the_engine(traced):
    """MoE-Infinity's activation-aware eviction, its library the trace's prompts: outputs
    unchanged, budget kept, and the policy's activation matrix restarts per request."""
    path, ref, trace = traced
    llm = LLM(str(path), expert_memory="30%", offload_policy="activation",
              offload_predictor_trace=str(trace))
    state = llm.engine.model.offload
    policy = state.cache.policy
    assert type(policy).__name__ == "ActivationAware"
    starts = []
    real = state.cache.begin_request
    state.cache.begin_request = lambda: (starts.append(1), real())[1]
    for p, want in zip(PROMPTS, ref):  # one request at a time: each one starts afresh
        before = state.cache.stats.requests
        assert llm.generate([p], GREEDY)[0].outputs[0].token_ids == want
        # the EAM holds this request's expert uses only
        assert policy.eam.sum() == state.cache.stats.requests - before > 0
    assert len(starts) == len(PROMPTS)
    assert [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY)] == ref
    rep = state.report()
    assert rep["peak_bytes"] <= rep["budget_bytes"] and rep["evictions"] > 0


def test_activation_policy_errors(traced, tmp_path):
    path = traced[0]
    with pytest.raises(ValueError, match="predictor_trace"):
        OffloadConfig(expert_memory="25%", policy="activation")
    with pytest.raises(FileNotFoundError, match="predictor trace"):
        LLM(str(path), expert_memory="25%", offload_policy="activation",
            offload_predictor_trace=str(tmp_path / "none.csv"))
