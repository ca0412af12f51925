"""llama2.c-style golden test: the real stories260K model, greedy from BOS, in our engine."""

from __future__ import annotations

import pytest

from sparsa import LLM, SamplingParams
from sparsa.tokenizer import shared_dir

GOLDEN = ("Once upon a time, there was a little girl named Lily. She loved to play outside "
          "in the park.")


def _model(rel: str):
    p = shared_dir() / rel
    if not p.exists():
        pytest.skip(f"shared model {p} not found (set SPARSA_SHARED)")
    return str(p)


def test_stories260k_greedy_from_bos():
    llm = LLM(_model("models/stories260K/stories260K.bin"), dtype="float32")
    out = llm.generate([[1]], SamplingParams(temperature=0, max_tokens=40))[0]
    assert out.outputs[0].text.startswith(GOLDEN), out.outputs[0].text


def test_tinymoe_stories_greedy_and_batch():
    llm = LLM(_model("models/tinymoe-stories"), dtype="float32")
    params = SamplingParams(temperature=0, max_tokens=48)
    prompts = ["Once upon a time", "The dog", "Tom and Sue went to"]
    together = [o.outputs[0].text for o in llm.generate(prompts, params)]
    alone = [llm.generate(p, params)[0].outputs[0].text for p in prompts]
    assert together == alone
    assert together[0].startswith(", there was a little girl named Lily")
