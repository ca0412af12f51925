"""Draft-model speculation: a smaller model with the target's vocabulary proposes greedily
with its own KV cache; outputs equal plain decoding's (greedy) and the draft's KV follows
rejections. Real pairs from ../shared: stories260K drafted by llama2xs, tinymoe-stories by
stories260K."""

from __future__ import annotations

import pytest

from sparsa import LLM, SamplingParams
from sparsa.tokenizer import shared_dir
from tests.spec.test_speculative_engine import _prompts
from tests.tiny_models import TINY_CONFIGS, build_tiny_checkpoint

MODELS = shared_dir() / "models"


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    d = tmp_path_factory.mktemp("pair")
    _, target = build_tiny_checkpoint("mixtral", d / "target")
    # a draft that agrees with the target often: the target with one layer, same weights
    # seed, so proposals are sometimes right and sometimes not
    small = dict(TINY_CONFIGS["llama"], num_hidden_layers=1)
    _, draft = build_tiny_checkpoint("llama", d / "draft", config=small)
    return str(target), str(draft)


def _greedy(llm, prompts, n=30):
    p = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
    return [o.outputs[0].token_ids for o in llm.generate(prompts, p)]


def test_draft_model_is_lossless_batched_and_preempted(pair):
    target, draft = pair
    spec = {"method": "draft_model", "model": draft, "num_speculative_tokens": 3,
            "disable_by_batch_size": None, "adaptive": False}
    prompts = _prompts(6)
    want = _greedy(LLM(target, dtype="float32", num_kv_blocks=256), prompts)
    llm = LLM(target, dtype="float32", num_kv_blocks=256, speculative_config=spec)
    assert _greedy(llm, prompts) == want
    stats = llm.engine.stats()["speculative"]
    assert stats["proposed"] > 0 and stats["verify_steps"] > 0
    # preemption and chunked prefill on the target; the draft mirrors are freed at the end
    tight = LLM(target, dtype="float32", num_kv_blocks=24, block_size=8,
                max_num_batched_tokens=20, speculative_config=spec)
    assert _greedy(tight, prompts) == want
    tight.engine.step()  # an idle step lets the proposer forget finished sequences
    proposer = tight.engine.speculation.proposer
    assert not proposer.mirrors and proposer.blocks.num_free_blocks == proposer.blocks.num_blocks


def test_bad_drafts_fail_at_construction(pair, tmp_path):
    target, _ = pair
    other = dict(TINY_CONFIGS["llama"], vocab_size=300)
    _, wrong = build_tiny_checkpoint("llama", tmp_path / "wrong", config=other)
    with pytest.raises(ValueError, match="vocabulary of 300 tokens and the target 256"):
        LLM(target, speculative_config={"method": "draft_model", "model": str(wrong)})
    with pytest.raises(ValueError, match="needs \"model\""):
        LLM(target, speculative_config={"method": "draft_model"})
    with pytest.raises((ValueError, FileNotFoundError), match="nope"):
        LLM(target, speculative_config={"method": "draft_model", "model": str(tmp_path / "nope")})


@pytest.mark.parametrize("target,draft", [
    ("stories260K/stories260K.bin", "llama2xs/model.bin"),
    ("tinymoe-stories", "stories260K/stories260K.bin"),
])
def test_real_pairs_are_lossless(target, draft):
    if not (MODELS / target).exists() or not (MODELS / draft).exists():
        pytest.skip(f"{MODELS} lacks the pair (set SPARSA_SHARED)")
    prompts = ["Once upon a time", "The little dog", "Lily and Tom went to the park"]
    plain = LLM(str(MODELS / target))
    spec = LLM(str(MODELS / target), speculative_config={
        "method": "draft_model", "model": str(MODELS / draft), "num_speculative_tokens": 3})
    p = SamplingParams(temperature=0, max_tokens=100)
    want = [o.outputs[0].token_ids for o in plain.generate(prompts, p)]
    got = [spec.generate([q], p)[0].outputs[0].token_ids for q in prompts]  # batch 1
    assert got == want
    stats = spec.engine.stats()["speculative"]
    assert stats["accepted"] / stats["proposed"] > 0.3
