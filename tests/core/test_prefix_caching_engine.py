"""Prefix caching through the real engine on a tiny random checkpoint: greedy outputs are
identical with caching on and off (with chunked prefill, and under preemption), cached
prefixes are really skipped, and no KV block leaks."""

from __future__ import annotations

import random

import pytest

from sparsa import LLM, SamplingParams
from tests.tiny_models import build_tiny_checkpoint

MAX_TOKENS = 12


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    _, path = build_tiny_checkpoint("llama", tmp_path_factory.mktemp("llama-pc"))
    return str(path)


def _prompts(n: int = 12) -> list[list[int]]:
    rng = random.Random(0)
    system = [1] + [rng.randrange(3, 256) for _ in range(40)]
    other = [1] + [rng.randrange(3, 256) for _ in range(23)]
    out = []
    for i in range(n):
        prefix = system if i % 3 else other
        out.append(prefix + [rng.randrange(3, 256) for _ in range(rng.randrange(1, 20))])
    return out


def _greedy(llm: LLM, prompts, one_by_one: bool = False):
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    if one_by_one:
        return [llm.generate([p], params)[0].outputs[0].token_ids for p in prompts]
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params)]


@pytest.fixture(scope="module")
def reference(ckpt):
    llm = LLM(ckpt, dtype="float32", num_kv_blocks=128, block_size=8)
    return _greedy(llm, _prompts(), one_by_one=True)


def _all_free(llm: LLM) -> bool:
    bm = llm.engine.block_manager
    return bm.num_free_blocks == bm.num_blocks and not any(bm._ref_counts)


@pytest.mark.parametrize("kw", [
    dict(num_kv_blocks=128, block_size=8),
    dict(num_kv_blocks=128, block_size=8, max_num_batched_tokens=16),  # chunked prefill
    dict(num_kv_blocks=128, block_size=8, max_num_batched_tokens=64,
         enable_chunked_prefill=False),
    dict(num_kv_blocks=14, block_size=8, max_num_batched_tokens=32),  # forces preemption
], ids=["plain", "chunked", "no-chunking", "preemption"])
def test_greedy_outputs_identical_with_caching_on(ckpt, reference, kw):
    llm = LLM(ckpt, dtype="float32", enable_prefix_caching=True, **kw)
    # all at once, cold: later chunks and readmissions after preemption find cached blocks
    assert _greedy(llm, _prompts()) == reference
    assert _all_free(llm)
    # again, with the cache warm
    assert _greedy(llm, _prompts()) == reference
    assert _all_free(llm)
    assert llm.engine.block_manager.prefix_hit_tokens > 0


def test_one_by_one_hits_the_shared_system_prompt(ckpt, reference):
    llm = LLM(ckpt, dtype="float32", enable_prefix_caching=True, num_kv_blocks=128,
              block_size=8, max_num_batched_tokens=16)
    assert _greedy(llm, _prompts(), one_by_one=True) == reference
    assert _all_free(llm)
    # all but the first of each prefix group hit its full blocks
    assert llm.engine.block_manager.prefix_hit_rate() > 0.5


def test_cached_prefix_is_not_recomputed(ckpt):
    llm = LLM(ckpt, dtype="float32", enable_prefix_caching=True, num_kv_blocks=64,
              block_size=8)
    prompt = _prompts()[1]
    first = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=4))[0]
    assert first.metrics["num_cached_tokens"] == 0
    second = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=4))[0]
    assert second.metrics["num_cached_tokens"] == (len(prompt) - 1) // 8 * 8
    assert second.outputs[0].token_ids == first.outputs[0].token_ids
    stats = llm.engine.stats()
    assert stats["prefix_cache_hit_rate"] > 0 and stats["cached_blocks"] > 0


def test_abort_mid_generation_frees_shared_blocks(ckpt):
    llm = LLM(ckpt, dtype="float32", enable_prefix_caching=True, num_kv_blocks=64,
              block_size=8)
    eng = llm.engine
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    ids = [eng.add_request(p, params) for p in _prompts(6)]
    for _ in range(4):
        eng.step()
    for rid in ids[::2]:
        eng.abort_request(rid)
    while eng.has_unfinished_requests():
        eng.step()
    assert _all_free(llm)


def test_off_by_default_for_the_offline_api(ckpt):
    llm = LLM(ckpt, dtype="float32", num_kv_blocks=32, block_size=8)
    assert not llm.engine.block_manager.enable_prefix_caching
