"""Greedy outputs must not depend on what else is in the batch: alone vs together, with
chunked prefill, and under a KV budget small enough to force preemption."""

from __future__ import annotations

import random

import pytest

from sparsa import LLM, SamplingParams
from tests.tiny_models import build_tiny_checkpoint

MAX_TOKENS = 24


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    _, path = build_tiny_checkpoint("mixtral", tmp_path_factory.mktemp("mixtral"))
    return str(path)


def _prompts(n: int = 16) -> list[list[int]]:
    rng = random.Random(0)
    lengths = [rng.choice([3, 9, 17, 31, 64, 100]) for _ in range(n)]
    return [[1] + [rng.randrange(3, 256) for _ in range(L - 1)] for L in lengths]


def _greedy(llm: LLM, prompts):
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params)]


@pytest.fixture(scope="module")
def alone(ckpt):
    llm = LLM(ckpt, dtype="float32", num_kv_blocks=64, block_size=16)
    return [_greedy(llm, [p])[0] for p in _prompts()]


def test_together_equals_alone(ckpt, alone):
    llm = LLM(ckpt, dtype="float32", num_kv_blocks=256, block_size=16)
    assert _greedy(llm, _prompts()) == alone


def test_chunked_prefill_equals_alone(ckpt, alone):
    llm = LLM(ckpt, dtype="float32", num_kv_blocks=256, block_size=8,
              max_num_batched_tokens=24, enable_chunked_prefill=True)
    assert _greedy(llm, _prompts()) == alone


def test_preemption_equals_alone(ckpt, alone):
    # 20 blocks x 8 tokens = 160 slots: 16 requests of up to 124 tokens cannot all fit
    llm = LLM(ckpt, dtype="float32", num_kv_blocks=20, block_size=8,
              max_num_batched_tokens=64)
    engine = llm.engine
    outs = _greedy(llm, _prompts())
    assert outs == alone
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_preemption_actually_happens(ckpt):
    llm = LLM(ckpt, dtype="float32", num_kv_blocks=20, block_size=8,
              max_num_batched_tokens=64)
    engine = llm.engine
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    ids = [engine.add_request(p, params) for p in _prompts()]
    preempted = 0
    while engine.has_unfinished_requests():
        engine.step()
        preempted = max(preempted, sum(s.num_preemptions for r in engine.requests.values()
                                       for s in r.seqs))
    assert ids and preempted > 0
