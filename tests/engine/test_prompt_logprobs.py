"""Prompt log-probabilities (SamplingParams.prompt_logprobs): every prompt token scored by
the logits of the position before it, as transformers computes them, whether the prompt
runs in one step or in chunks, and never from prefix-cache hits that skip its logits."""

from __future__ import annotations

import pytest
import torch

from sparsa import LLM, SamplingParams
from tests.tiny_models import build_tiny_checkpoint


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_checkpoint("llama", tmp_path_factory.mktemp("llama"))


def _reference(hf, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        logits = hf(torch.tensor([ids])).logits[0].float()
    return torch.log_softmax(logits, dim=-1)


PROMPT = [1, 17, 43, 99, 5, 200, 31, 77, 12, 250, 8, 64, 3, 150, 42, 7, 9, 111, 23, 60]


@pytest.mark.parametrize("settings", [
    dict(),
    # a 20-token prompt in chunks of 6: four steps, each scoring its own rows
    dict(max_num_batched_tokens=6, enable_chunked_prefill=True),
])
def test_prompt_logprobs_match_transformers(tiny, settings):
    hf, path = tiny
    llm = LLM(str(path), dtype="float32", num_kv_blocks=32, **settings)
    out = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=2,
                                                prompt_logprobs=3))[0]
    ref = _reference(hf, PROMPT)
    assert out.prompt_logprobs is not None and len(out.prompt_logprobs) == len(PROMPT)
    assert out.prompt_logprobs[0] is None and out.prompt_logprob_ranks[0] is None
    for pos in range(1, len(PROMPT)):
        entry, row = out.prompt_logprobs[pos], ref[pos - 1]
        tok = PROMPT[pos]
        assert entry[tok] == pytest.approx(row[tok].item(), abs=1e-4)
        top = row.topk(3)
        for t, v in zip(top.indices.tolist(), top.values.tolist()):
            assert entry[t] == pytest.approx(v, abs=1e-4)
        assert len(entry) in (3, 4)  # the top 3, plus the prompt token when outside them
        assert out.prompt_logprob_ranks[pos] == int((row > row[tok]).sum()) + 1


def test_prompt_logprobs_zero_and_none(tiny):
    _, path = tiny
    llm = LLM(str(path), dtype="float32", num_kv_blocks=32)
    out = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=1,
                                                prompt_logprobs=0))[0]
    assert all(len(e) == 1 and PROMPT[i] in e for i, e in enumerate(out.prompt_logprobs) if e)
    plain = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=1))[0]
    assert plain.prompt_logprobs is None
    one = llm.generate([[1]], SamplingParams(temperature=0, max_tokens=1,
                                             prompt_logprobs=2))[0]
    assert one.prompt_logprobs == [None]


def test_prompt_logprobs_bypass_the_prefix_cache(tiny):
    hf, path = tiny
    llm = LLM(str(path), dtype="float32", num_kv_blocks=32, block_size=4,
              enable_prefix_caching=True)
    params = SamplingParams(temperature=0, max_tokens=1)
    llm.generate([PROMPT], params)  # the prompt's blocks are now cached
    out = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=1,
                                                prompt_logprobs=0))[0]
    ref = _reference(hf, PROMPT)
    got = [out.prompt_logprobs[p][PROMPT[p]] for p in range(1, len(PROMPT))]
    want = [ref[p - 1, PROMPT[p]].item() for p in range(1, len(PROMPT))]
    assert got == pytest.approx(want, abs=1e-4)
    # an ordinary request after it still gets the cache
    again = llm.generate([PROMPT], params)[0]
    assert again.metrics["num_cached_tokens"] > 0


def test_prompt_logprobs_with_n_samples_and_a_bad_value(tiny):
    _, path = tiny
    llm = LLM(str(path), dtype="float32", num_kv_blocks=32)
    out = llm.generate([PROMPT], SamplingParams(temperature=1.0, n=3, seed=0, max_tokens=2,
                                                prompt_logprobs=1))[0]
    assert len(out.outputs) == 3 and all(e for e in out.prompt_logprobs[1:])
    with pytest.raises(ValueError, match="prompt_logprobs must be in"):
        SamplingParams(prompt_logprobs=21)
