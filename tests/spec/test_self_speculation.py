"""MoE self-speculation: the target drafts for itself with narrower routing and/or fewer
layers, sharing its weights; lossless, and refused where it cannot be cheaper."""

from __future__ import annotations

import pytest

from sparsa import LLM, SamplingParams
from sparsa.tokenizer import shared_dir
from tests.spec.test_speculative_engine import _prompts
from tests.tiny_models import build_tiny_checkpoint

TINYMOE = shared_dir() / "models" / "tinymoe-stories"


def _greedy(llm, prompts):
    p = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    return [o.outputs[0].token_ids for o in llm.generate(prompts, p)]


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe", "deepseek_v2"])
@pytest.mark.parametrize("extra", [{}, {"draft_layers": 1}])
def test_self_speculation_is_lossless(arch, extra, tmp_path):
    _, path = build_tiny_checkpoint(arch, tmp_path / arch)
    want = _greedy(LLM(str(path), dtype="float32", num_kv_blocks=256), _prompts(6))
    llm = LLM(str(path), dtype="float32", num_kv_blocks=256, speculative_config={
        "method": "self", "num_speculative_tokens": 3, "adaptive": False, **extra})
    assert _greedy(llm, _prompts(6)) == want
    stats = llm.engine.stats()["speculative"]
    assert stats["accepted"] > 0
    # the draft shares the target's weights (no second copy) and has its own KV pools
    draft = llm.engine.speculation.proposer.model
    target = llm.engine.model
    assert draft.model.embed_tokens.weight is target.model.embed_tokens.weight
    kv = [a.kv_cache.k for a in draft.attention_layers()]
    assert all(k is not a.kv_cache.k for k, a in zip(kv, target.attention_layers()))
    assert all(m.top_k == 1 for m in draft.modules() if hasattr(m, "experts")
               and hasattr(m, "top_k"))


def test_self_speculation_refused_where_it_cannot_help(tmp_path):
    _, dense = build_tiny_checkpoint("llama", tmp_path / "dense")
    with pytest.raises(ValueError, match="needs an MoE model"):
        LLM(str(dense), speculative_config={"method": "self"})
    _, moe = build_tiny_checkpoint("mixtral", tmp_path / "moe")
    with pytest.raises(ValueError, match="draft_layers=2 is not fewer"):
        LLM(str(moe), speculative_config={"method": "self", "draft_layers": 2})
    with pytest.raises(ValueError, match="draft_top_k must be"):
        LLM(str(moe), speculative_config={"method": "self", "draft_top_k": 0})
    # a dense model can still self-draft with fewer layers
    llm = LLM(str(dense), dtype="float32", num_kv_blocks=64,
              speculative_config={"method": "self", "draft_layers": 1})
    assert _greedy(llm, _prompts(2)) == _greedy(
        LLM(str(dense), dtype="float32", num_kv_blocks=64), _prompts(2))


def test_tinymoe_self_speculation_is_lossless():
    if not TINYMOE.exists():
        pytest.skip(f"{TINYMOE} not found (set SPARSA_SHARED)")
    p = SamplingParams(temperature=0, max_tokens=100)
    prompts = ["Once upon a time", "The little dog"]
    want = [o.outputs[0].token_ids for o in LLM(str(TINYMOE)).generate(prompts, p)]
    llm = LLM(str(TINYMOE), speculative_config={"method": "self", "num_speculative_tokens": 3})
    got = [llm.generate([q], p)[0].outputs[0].token_ids for q in prompts]
    assert got == want
