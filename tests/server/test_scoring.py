"""Scoring prompts through /v1/completions, as lm-evaluation-harness's local-completions
model does: `echo` with `logprobs` (and `max_tokens` 0 or 1) returns each prompt token's
log-probability, and vLLM's `prompt_logprobs` the same in its own shape; all within 1e-4
of transformers on the same weights."""

from __future__ import annotations

import json

import httpx
import pytest
import torch

from tests.server.conftest import API_KEY, MODEL

HEADERS = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="module")
def reference(model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)

    def logprobs(ids: list[int]) -> torch.Tensor:
        with torch.no_grad():
            return torch.log_softmax(hf(torch.tensor([ids])).logits[0].float(), dim=-1)
    return tok, logprobs


def post(server, body: dict) -> dict:
    r = httpx.post(server.url + "/v1/completions", headers=HEADERS, timeout=60,
                   json={"model": MODEL, "temperature": 0, **body})
    assert r.status_code == 200, r.text
    return r.json()


def _check_prompt(lp: dict, ids: list[int], ref: torch.Tensor, n: int) -> None:
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    for pos in range(1, n):
        want = ref[pos - 1, ids[pos]].item()
        assert lp["token_logprobs"][pos] == pytest.approx(want, abs=1e-4)


@pytest.mark.parametrize("max_tokens", [0, 1])
def test_echo_logprobs_score_the_prompt(server, reference, max_tokens):
    tok, logprobs = reference
    text = "The cat sat on the mat."
    ids = tok(text)["input_ids"]
    body = post(server, {"prompt": text, "echo": True, "logprobs": 1,
                         "max_tokens": max_tokens})
    choice = body["choices"][0]
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == len(ids) + max_tokens
    assert lp["tokens"][1:len(ids)] == list(text)  # one character per token, BOS first
    _check_prompt(lp, ids, logprobs(ids), len(ids))
    # offsets index the echoed text: BOS adds no text, then one character each
    assert lp["text_offset"][:len(ids)] == [0, *range(len(text))]
    assert choice["text"].startswith(text)
    assert body["usage"]["completion_tokens"] == max_tokens
    if max_tokens == 0:
        assert choice["text"] == text and choice["finish_reason"] == "length"
    else:  # the generated token is scored too, and is the greedy one
        ref = logprobs(ids)
        assert lp["token_logprobs"][-1] == pytest.approx(ref[-1].max().item(), abs=1e-4)
        assert lp["text_offset"][-1] == len(text)


def test_token_id_prompts_in_a_batch_as_lm_eval_sends_them(server, reference):
    """lm-eval sends token ids (tokenized_requests), several prompts per request, and
    reads token_logprobs[ctxlen:-1] with max_tokens=1; a repeat must not come back from
    the prefix cache without its logprobs."""
    _, logprobs = reference
    prompts = [[1] + [40 + i % 50 for i in range(37)], [1, 50, 51, 52, 53, 54]]
    for _ in range(2):
        body = post(server, {"prompt": prompts, "echo": True, "logprobs": 1,
                             "max_tokens": 1})
        assert [c["index"] for c in body["choices"]] == [0, 1]
        for c, ids in zip(body["choices"], prompts):
            _check_prompt(c["logprobs"], ids, logprobs(ids), len(ids))
            top = c["logprobs"]["top_logprobs"]
            assert all(len(t) in (1, 2) for t in top[1:])


def test_vllm_prompt_logprobs_field(server, reference):
    tok, logprobs = reference
    ids = tok("Hello there")["input_ids"]
    body = post(server, {"prompt": ids, "prompt_logprobs": 2, "max_tokens": 2})
    pl = body["choices"][0]["prompt_logprobs"]
    ref = logprobs(ids)
    assert pl[0] is None and len(pl) == len(ids)
    for pos in range(1, len(ids)):
        entry = pl[pos]
        mine = entry[str(ids[pos])]
        assert mine["logprob"] == pytest.approx(ref[pos - 1, ids[pos]].item(), abs=1e-4)
        assert mine["rank"] == int((ref[pos - 1] > ref[pos - 1, ids[pos]]).sum()) + 1
        assert mine["decoded_token"] == tok.convert_ids_to_tokens(ids[pos])
        assert len(entry) in (2, 3)
    assert body["choices"][0]["logprobs"] is None  # the completion's were not asked for


def test_streamed_echo_with_logprobs(server, reference):
    tok, logprobs = reference
    text = "Once upon a time"
    ids = tok(text)["input_ids"]
    events = []
    with httpx.stream("POST", server.url + "/v1/completions", headers=HEADERS, timeout=60,
                      json={"model": MODEL, "prompt": text, "echo": True, "logprobs": 1,
                            "max_tokens": 3, "temperature": 0, "stream": True}) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                events.append(json.loads(line[6:]))
    first = events[0]["choices"][0]
    assert first["text"] == text
    _check_prompt(first["logprobs"], ids, logprobs(ids), len(ids))
    rest = [e["choices"][0] for e in events[1:]]
    offsets = [o for c in rest if c["logprobs"] for o in c["logprobs"]["text_offset"]]
    assert offsets[0] == len(text)  # the completion's offsets continue after the echo
    assert rest[-1]["finish_reason"] == "length"
    full = post(server, {"prompt": text, "echo": True, "logprobs": 1, "max_tokens": 3})
    assert text + "".join(c["text"] for c in rest) == full["choices"][0]["text"]


def test_max_tokens_zero_without_echo_and_bad_values(server):
    body = post(server, {"prompt": "Hi", "max_tokens": 0})
    c = body["choices"][0]
    assert c["text"] == "" and c["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 0
    for bad in ({"max_tokens": -1}, {"prompt_logprobs": 21}, {"prompt_logprobs": "2"}):
        r = httpx.post(server.url + "/v1/completions", headers=HEADERS, timeout=60,
                       json={"model": MODEL, "prompt": "Hi", **bad})
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] == next(iter(bad))
