"""EAGLE heads: `sparsa train-draft --method eagle` trains one on a model's own answers
and writes it where `speculative_config={"method": "eagle", "model": DIR}` reads it; its
proposals are verified like any other (greedy output equals plain decoding, batched,
chunked, preempted, as a tree); the features it drafts on are the target's; bad head
files fail at construction."""

from __future__ import annotations

import json

import pytest
import torch

from sparsa import LLM, SamplingParams
from sparsa.cli import main
from sparsa.config.speculative import SpeculativeConfig
from sparsa.engine.scoring import prompt_hidden
from sparsa.spec.eagle import EagleHead, EagleProposer
from tests.server.conftest import build_tiny_chat_model

WORDS = ["cat", "dog", "bird", "fish", "tree", "house", "river", "ball"]
ASK = "Tell me more about this: {}"
SENT = "Sentence number {} tells of a {} and a {} at play."


def _sentence(i: int) -> str:
    return SENT.format(i, WORDS[i % 8], WORDS[(3 * i + 1) % 8])


def _chats(ids) -> list[list[dict]]:
    # different lengths: every other one asks twice
    return [[{"role": "user", "content": ASK.format(_sentence(i)) * (1 + i % 2)}]
            for i in ids]


@pytest.fixture(scope="module", params=["llama", "mixtral"])
def trained(request, tmp_path_factory):
    """(tiny chat model, its trained EAGLE head's folder)."""
    d = tmp_path_factory.mktemp(request.param)
    model = build_tiny_chat_model(d / "model", request.param)
    corpus = d / "text.txt"
    corpus.write_text(" ".join(_sentence(i) for i in range(60)))
    out = d / "eagle"
    rc = main(["train-draft", str(model), "--method", "eagle", "--out", str(out),
               "--corpus", str(corpus), "--prompts", "16", "--answer-tokens", "32",
               "--epochs", "40", "--lr", "3e-3", "--dtype", "float32"])
    assert rc == 0
    return model, out


def _spec(head, k: int = 3, **kw) -> dict:
    return {"method": "eagle", "model": str(head), "num_speculative_tokens": k,
            "adaptive": False, **kw}


@pytest.fixture(scope="module")
def plain(trained):
    llm = LLM(str(trained[0]), dtype="float32")
    p = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    return [o.outputs[0].token_ids for o in llm.chat(_chats(range(100, 105)), p)]


def test_train_draft_writes_a_head(trained):
    cfg = json.loads((trained[1] / "eagle_config.json").read_text())
    assert cfg["hidden_size"] == 64 and cfg["num_kv_heads"] == 2
    assert (trained[1] / "eagle_head.safetensors").is_file()


def test_greedy_equal_batched(trained, plain):
    llm = LLM(str(trained[0]), dtype="float32", num_kv_blocks=128,
              speculative_config=_spec(trained[1]))
    p = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    got = [o.outputs[0].token_ids for o in llm.chat(_chats(range(100, 105)), p)]
    assert got == plain
    stats = llm.engine.stats()["speculative"]
    assert 0 < stats["accepted"] < stats["proposed"]
    bm = llm.engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks


def test_greedy_equal_as_a_tree(trained, plain):
    tree = [[0], [1], [0, 0], [0, 1], [1, 0], [0, 0, 0]]
    llm = LLM(str(trained[0]), dtype="float32", num_kv_blocks=128,
              speculative_config=_spec(trained[1], k=6, token_tree=tree))
    p = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    assert [o.outputs[0].token_ids for o in llm.chat(_chats(range(100, 105)), p)] == plain
    assert llm.engine.stats()["speculative"]["accepted"] > 0


def test_greedy_equal_chunked_and_preempted(trained, plain):
    # a small KV pool forces preemption; a small budget chunks prompts and drops proposals
    llm = LLM(str(trained[0]), dtype="float32", num_kv_blocks=28, block_size=8,
              max_num_batched_tokens=20, enable_chunked_prefill=True,
              speculative_config=_spec(trained[1]))
    engine = llm.engine
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    ids = [engine.add_request(llm.chat_prompt(c), params) for c in _chats(range(100, 105))]
    outs, preempted = {}, 0
    while engine.has_unfinished_requests():
        for o in engine.step():
            if o.finished:
                outs[o.request_id] = o.outputs[0].token_ids
        preempted = max([preempted] + [s.num_preemptions for r in engine.requests.values()
                                       for s in r.seqs])
    assert [outs[i] for i in ids] == plain
    assert preempted > 0
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_features_are_the_targets(trained):
    """After chunked prefill and some speculative steps, the features the proposer holds
    for a sequence are the target's final hidden states at those positions."""
    llm = LLM(str(trained[0]), dtype="float32", max_num_batched_tokens=16,
              enable_chunked_prefill=True, speculative_config=_spec(trained[1]))
    engine, proposer = llm.engine, llm.engine.speculation.proposer
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    rid = engine.add_request(llm.chat_prompt(_chats([7])[0]), params)
    seq = engine.requests[rid].seqs[0]
    while len(seq.output_token_ids) < 12:
        engine.step()
    st = proposer.states[seq.seq_id]
    assert st.base == 0 and st.n == seq.num_tokens - 1 > 40
    feats = st.feats[:st.n].clone()
    ids = seq.all_token_ids[:st.n]
    engine.abort_request(rid)
    want = prompt_hidden(engine, ids)
    torch.testing.assert_close(feats, want, atol=1e-4, rtol=1e-4)


def test_repeated_positions_replace_and_gaps_restart(trained):
    llm = LLM(str(trained[0]), dtype="float32", speculative_config=_spec(trained[1]))
    proposer = llm.engine.speculation.proposer
    h = torch.randn(10, 64)
    proposer.note_hidden(1, h[:5], 0)
    proposer.states[1].m = 4  # as if the draft had read them
    proposer.note_hidden(1, h[3:8] + 1, 3)  # a recomputation from position 3
    st = proposer.states[1]
    assert (st.base, st.n, st.m) == (0, 8, 3)
    torch.testing.assert_close(st.feats[:8], torch.cat([h[:3], h[3:8] + 1]))
    proposer.note_hidden(1, h[:2], 9)  # a gap: starts over at 9
    assert (proposer.states[1].base, proposer.states[1].n) == (9, 2)
    proposer.retain([2])
    assert not proposer.states


def test_trained_head_beats_an_untrained_one(trained, tmp_path):
    model, head = trained
    untrained = EagleHead.load(head, 64, 99)
    fresh = EagleHead(**untrained.shape, vocab_ids=untrained.vocab_ids)
    fresh.save(tmp_path / "fresh", "x", 99)
    p = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    rates = []
    for h in (head, tmp_path / "fresh"):
        llm = LLM(str(model), dtype="float32", speculative_config=_spec(h))
        llm.chat(_chats(range(100, 106)), p)
        s = llm.engine.stats()["speculative"]
        rates.append(s["accepted"] / s["proposed"])
    assert rates[0] > 0.05 and rates[0] > rates[1] + 0.05, rates


def test_bad_heads_fail_at_construction(trained, tmp_path):
    model = trained[0]
    with pytest.raises(ValueError, match="holds no EAGLE head"):
        LLM(str(model), speculative_config=_spec(tmp_path))
    ids = torch.arange(10)
    EagleHead(32, 4, 2, 8, 48, ids).save(tmp_path / "hidden", "x", 99)
    with pytest.raises(ValueError, match="trained for hidden size 32"):
        LLM(str(model), speculative_config=_spec(tmp_path / "hidden"))
    EagleHead(64, 4, 2, 16, 96, ids).save(tmp_path / "vocab", "x", 500)
    with pytest.raises(ValueError, match="a vocabulary of 500"):
        LLM(str(model), speculative_config=_spec(tmp_path / "vocab"))
    bad = tmp_path / "mismatch"
    EagleHead(64, 4, 2, 16, 96, ids).save(bad, "x", 99)
    cfg = json.loads((bad / "eagle_config.json").read_text())
    (bad / "eagle_config.json").write_text(json.dumps({**cfg, "intermediate_size": 80}))
    with pytest.raises(ValueError, match="does not match its config"):
        LLM(str(model), speculative_config=_spec(bad))
    with pytest.raises(ValueError, match="needs \"model\""):
        SpeculativeConfig(method="eagle")
    with pytest.raises(ValueError, match="token ids outside"):
        EagleHead(64, 4, 2, 16, 96, torch.tensor([3, 120])).save(tmp_path / "ids", "x", 99)
        EagleProposer(str(tmp_path / "ids"), None, 64, 99, torch.float32)
