"""Speculation where users meet it: a real chat model (SmolLM2 from ../shared) copies a
passage with n-gram speculation and gives the same greedy tokens as without; the server
takes --speculative-config like every setting and reports acceptance in /metrics."""

from __future__ import annotations

import httpx
import pytest

from sparsa import LLM, SamplingParams
from sparsa.tokenizer import shared_dir
from tests.server.conftest import API_KEY, MODEL, build_tiny_chat_model, make_server

SMOL = shared_dir() / "models" / "smollm2-135m-instruct"
NGRAM = {"method": "ngram", "num_speculative_tokens": 3}


def test_smollm2_copy_is_lossless():
    if not SMOL.exists():
        pytest.skip(f"{SMOL} not found (set SPARSA_SHARED)")
    from sparsa.bench.speculative import copy_prompts

    msgs = [[{"role": "user", "content": p}] for p in copy_prompts(2, words=60)]
    params = SamplingParams(temperature=0, max_tokens=80)
    plain = LLM(str(SMOL))
    spec = LLM(str(SMOL), speculative_config=NGRAM)
    for m in msgs:  # batch 1, as a chat user runs it
        want = plain.chat([m], params)[0].outputs[0].token_ids
        assert spec.chat([m], params)[0].outputs[0].token_ids == want
    stats = spec.engine.stats()["speculative"]
    assert stats["accepted"] > 20


def test_server_speculates_and_reports_it(tmp_path):
    path = build_tiny_chat_model(tmp_path / "m")
    with make_server(path, engine={"speculative_config": NGRAM}) as server:
        headers = {"Authorization": f"Bearer {API_KEY}"}
        r = httpx.post(server.url + "/v1/completions", headers=headers, timeout=60, json={
            "model": MODEL, "prompt": "abcabcabcabcabcabc", "max_tokens": 24,
            "temperature": 0})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 24
        text = httpx.get(server.url + "/metrics", headers=headers, timeout=30).text
        drafts = [line for line in text.splitlines()
                  if line.startswith("sparsa_spec_decode_num_draft_tokens_total")]
        assert drafts and float(drafts[0].split()[-1]) > 0


def test_a_request_can_stay_off_speculation(tmp_path):
    from tests.tiny_models import build_tiny_checkpoint

    _, path = build_tiny_checkpoint("llama", tmp_path / "m")
    llm = LLM(str(path), dtype="float32", num_kv_blocks=64, speculative_config={
        "method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1,
        "adaptive": False})
    prompt = [1] + [5, 6, 7] * 6
    off = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, speculate=False)
    a = llm.generate([prompt], off)[0].outputs[0].token_ids
    assert llm.engine.stats()["speculative"]["proposed"] == 0
    on = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    assert llm.generate([prompt], on)[0].outputs[0].token_ids == a
    assert llm.engine.stats()["speculative"]["proposed"] > 0
    with pytest.raises(ValueError, match="speculate must be a bool"):
        SamplingParams(speculate="no")
