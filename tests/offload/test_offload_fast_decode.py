"""The batch-1 decode fast paths of offloaded experts compute what the slow paths compute.

Two of them: `OffloadedExperts` taking every resident expert of a layer in one
`ExpertCache.acquire_resident` call (and, quantized, one fused-kernel call per expert with
its routing weight), and the native decode plan covering layers whose experts are offloaded.
Checked: greedy tokens and their log-probabilities are bit-identical with each fast path on
and off, and equal to the all-resident model's tokens; the cache's accounting (hits,
requests, useful prefetches, evictions) and the policy's state end the same.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sparsa import LLM, SamplingParams, kernels
from sparsa.layers.moe import moe_blocks
from sparsa.offload.expert_cache import ExpertCache
from sparsa.offload.quantized_store import STORE_ENV
from tests.offload.helpers import moe_checkpoint

PROMPTS = [[1, 5, 9, 33, 7], list(range(1, 30))]
GREEDY = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, logprobs=3)


@pytest.fixture(autouse=True)
def _store_dir(tmp_path_factory, monkeypatch):
    monkeypatch.setenv(STORE_ENV, str(tmp_path_factory.getbasetemp() / "expert-stores"))


@pytest.fixture(autouse=True)
def _loads_finish_at_once(monkeypatch):
    """Each background read done before the cache goes on: what counts as a hit or an
    in-flight hit, and what a prefetch may evict (only finished loads), otherwise depends on
    the I/O threads' timing, which would make the two paths' accounting differ by chance."""
    start = ExpertCache._start_load

    def start_and_finish(self, key, prefetched):
        entry = start(self, key, prefetched)
        entry.future.exception()  # waits
        return entry

    monkeypatch.setattr(ExpertCache, "_start_load", start_and_finish)


@pytest.fixture(scope="module", params=["mixtral", "deepseek_v2"])
def checkpoint(request, tmp_path_factory):
    name = request.param
    return name, moe_checkpoint(name, tmp_path_factory.mktemp(name))


def _run(path, quantization, memory, native: bool = True):
    llm = LLM(str(path), quantization=quantization, expert_memory=memory,
              native_decode=native, num_threads=1)
    outs = [llm.generate([p], GREEDY)[0].outputs[0] for p in PROMPTS]  # batch 1
    return [(o.token_ids, o.logprobs) for o in outs], llm


def _accounting(llm):
    cache = llm.engine.model.offload.cache
    keys = ("requests", "hits", "inflight_hits", "misses", "prefetches",
            "useful_prefetches", "evictions")
    return ({k: getattr(cache.stats, k) for k in keys}, cache._t,
            sorted(cache.resident()), np.array(cache.policy.priority(cache._t)).tolist())


@pytest.mark.parametrize("quantization", [None, "int8", "int4"])
@pytest.mark.parametrize("memory", ["100%", "50%"])
def test_resident_fast_path_equals_per_expert_path(checkpoint, quantization, memory,
                                                   monkeypatch):
    _, checkpoint = checkpoint
    ref = [LLM(str(checkpoint), quantization=quantization, num_threads=1)
           .generate([p], GREEDY)[0].outputs[0].token_ids for p in PROMPTS]
    calls = []
    orig = ExpertCache.acquire_resident

    def counted(self, layer, experts):
        got = orig(self, layer, experts)
        calls.append(got is not None)
        return got

    monkeypatch.setattr(ExpertCache, "acquire_resident", counted)
    fast, fast_llm = _run(checkpoint, quantization, memory)
    assert any(calls)  # the fast path ran
    monkeypatch.setattr(ExpertCache, "acquire_resident", lambda self, layer, experts: None)
    slow, slow_llm = _run(checkpoint, quantization, memory)
    assert fast == slow  # tokens and log-probabilities, bit for bit
    assert [t for t, _ in fast] == ref
    assert _accounting(fast_llm) == _accounting(slow_llm)


@pytest.mark.parametrize("quantization", [None, "int8"])
def test_native_plan_covers_offloaded_layers(checkpoint, quantization):
    name, checkpoint = checkpoint
    on, on_llm = _run(checkpoint, quantization, "50%")
    off, off_llm = _run(checkpoint, quantization, "50%", native=False)
    decoder = on_llm.engine.model.model
    if kernels.available() and name == "mixtral":  # (DeepSeek-V2's MLA keeps the module path)
        assert decoder._plan  # the plan was built and ran with offloaded experts
    assert on == off
    assert _accounting(on_llm) == _accounting(off_llm)


def test_resident_decode_is_bitwise_the_grouped_sum(checkpoint):
    """One block, one token: the fast path's output equals GroupedExperts' per-expert path."""
    _, checkpoint = checkpoint
    llm = LLM(str(checkpoint), quantization="int8", expert_memory="100%", num_threads=1)
    llm.generate(PROMPTS, GREEDY)  # every expert loaded
    llm.engine.model.offload.cache.settle()
    _, _, block = moe_blocks(llm.engine.model)[0]
    torch.manual_seed(0)
    x = torch.randn(1, block.experts.hidden_size)
    weights, ids = block.route(x)
    fast = block.experts(x, weights, ids)
    cache = llm.engine.model.offload.cache
    cache.acquire_resident = lambda layer, experts: None  # this instance only
    slow = block.experts(x, weights, ids)
    assert torch.equal(fast, slow)
