"""The server through the official `openai` client on a live loopback server."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.server.conftest import API_KEY, MODEL, SPECIALS

GREEDY = dict(temperature=0, max_tokens=24, extra_body={"ignore_eos": True})
MSGS = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi!"}]


def _stream_text(stream) -> tuple[dict[int, str], dict[int, str | None], object]:
    texts: dict[int, str] = {}
    reasons: dict[int, str | None] = {}
    usage = None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            piece = c.text if hasattr(c, "text") else (c.delta.content or "")
            texts[c.index] = texts.get(c.index, "") + piece
            if c.finish_reason:
                reasons[c.index] = c.finish_reason
    return texts, reasons, usage


def test_completion_and_usage(client):
    r = client.completions.create(model=MODEL, prompt="Once upon a time", **GREEDY)
    c = r.choices[0]
    assert r.object == "text_completion" and c.finish_reason == "length"
    # one character per token with this tokenizer, except special tokens, which the random
    # model sometimes samples and the text leaves out
    assert 0 < len(c.text) <= 24
    assert r.usage.prompt_tokens == len("Once upon a time") + 1  # + BOS
    assert r.usage.completion_tokens == 24
    assert r.usage.total_tokens == r.usage.prompt_tokens + 24


def test_streamed_completion_equals_non_streamed(client):
    ref = client.completions.create(model=MODEL, prompt="The cat", **GREEDY).choices[0].text
    stream = client.completions.create(model=MODEL, prompt="The cat", stream=True,
                                       stream_options={"include_usage": True}, **GREEDY)
    texts, reasons, usage = _stream_text(stream)
    assert texts == {0: ref} and reasons == {0: "length"}
    assert usage.completion_tokens == 24 and usage.prompt_tokens == 8


def test_chat_streamed_and_not(client):
    r = client.chat.completions.create(model=MODEL, messages=MSGS, **GREEDY)
    msg = r.choices[0].message
    assert msg.role == "assistant" and 0 < len(msg.content) <= 24
    assert r.object == "chat.completion"
    stream = client.chat.completions.create(model=MODEL, messages=MSGS, stream=True,
                                            stream_options={"include_usage": True}, **GREEDY)
    texts, reasons, usage = _stream_text(stream)
    assert texts == {0: msg.content} and reasons == {0: "length"}
    assert usage.prompt_tokens == r.usage.prompt_tokens
    assert usage.completion_tokens == 24


def test_n_choices(client):
    r = client.completions.create(model=MODEL, prompt=["A", "B"], n=3, temperature=1.0,
                                  max_tokens=8, seed=1)
    assert sorted(c.index for c in r.choices) == list(range(6))
    assert r.usage.completion_tokens == sum(len(c.text) for c in r.choices) or \
        r.usage.completion_tokens <= 48
    stream = client.chat.completions.create(model=MODEL, messages=MSGS, n=2, temperature=1.0,
                                            max_tokens=8, seed=3, stream=True)
    texts, reasons, _ = _stream_text(stream)
    assert set(texts) == {0, 1} and set(reasons) == {0, 1}


@pytest.mark.parametrize("stream", [False, True])
def test_stop_strings(client, stream):
    full = client.completions.create(model=MODEL, prompt="Stop here", **GREEDY).choices[0].text
    stop = full[6:9]
    cut = full.index(stop)
    kw = dict(GREEDY, stop=[stop])
    if stream:
        texts, reasons, _ = _stream_text(client.completions.create(
            model=MODEL, prompt="Stop here", stream=True, **kw))
        text, reason = texts[0], reasons[0]
    else:
        c = client.completions.create(model=MODEL, prompt="Stop here", **kw).choices[0]
        text, reason = c.text, c.finish_reason
    assert text == full[:cut] and reason == "stop"


def test_completion_logprobs(client):
    r = client.completions.create(model=MODEL, prompt="Hello", logprobs=3, **GREEDY)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == 24
    assert "".join(t for t in lp.tokens if t not in SPECIALS) == r.choices[0].text
    for tok, val, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert len(top) == 3 and val <= 0
        assert max(top.values()) == pytest.approx(val)  # greedy picks the top token
        assert tok in top


def test_chat_logprobs(client):
    r = client.chat.completions.create(model=MODEL, messages=MSGS, logprobs=True,
                                       top_logprobs=2, **GREEDY)
    content = r.choices[0].logprobs.content
    assert len(content) == 24
    assert "".join(t.token for t in content if t.token not in SPECIALS) == \
        r.choices[0].message.content
    assert all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in content)


def test_seed_reproducible(client):
    kw = dict(model=MODEL, prompt="Seeded", temperature=1.0, max_tokens=16,
              extra_body={"ignore_eos": True})
    a = client.completions.create(seed=42, **kw).choices[0].text
    b = client.completions.create(seed=42, **kw).choices[0].text
    c = client.completions.create(seed=43, **kw).choices[0].text
    assert a == b and a != c


def test_models_health_metrics(server, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    text = httpx.get(server.url + "/metrics").text
    for name in ("sparsa_time_to_first_token_seconds_bucket", "sparsa_num_requests_waiting",
                 "sparsa_num_requests_running", "sparsa_kv_cache_usage_perc",
                 "sparsa_prefix_cache_hit_rate", "sparsa_e2e_request_latency_seconds",
                 "sparsa_time_per_output_token_seconds", 'sparsa_requests_total{'):
        assert name in text


def test_prefix_cache_reports_cached_tokens(client):
    long = "You are a helpful assistant that answers briefly. " * 2
    client.completions.create(model=MODEL, prompt=long + "A", max_tokens=2)
    r = client.completions.create(model=MODEL, prompt=long + "B", max_tokens=2)
    assert r.usage.prompt_tokens_details.cached_tokens >= 96


# ---- errors -------------------------------------------------------------------------


def test_unknown_model(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="nope", prompt="x", max_tokens=2)
    assert e.value.status_code == 404 and e.value.code == "model_not_found"


@pytest.mark.parametrize("kw", [
    dict(temperature=5.0), dict(top_p=0.0), dict(n=0), dict(max_tokens=-1),
    dict(presence_penalty=3.0), dict(logprobs=50), dict(stop=[""]),
    dict(n=2, temperature=0.0), dict(extra_body={"top_k": -5}), dict(seed="abc"),
    dict(extra_body={"logit_bias": {"5": 1.0}}),
])
def test_bad_params(client, kw):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="x", **{"max_tokens": 2, **kw})
    assert e.value.status_code == 400
    assert e.value.body["message"]


def test_bad_chat_params(client):
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=[], max_tokens=2)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=[{"role": "wizard",
                                                               "content": "x"}])


def test_prompt_too_long(client):
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        client.completions.create(model=MODEL, prompt="x" * 300, max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        client.completions.create(model=MODEL, prompt="x" * 100, max_tokens=200)
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user",
                                                               "content": "y" * 400}])


def test_api_key(server):
    for key in ("wrong", ""):
        c = openai.OpenAI(base_url=server.url + "/v1", api_key=key or "x", max_retries=0)
        if not key:
            r = httpx.post(server.url + "/v1/completions", json={"model": MODEL, "prompt": "x"})
            assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
            continue
        with pytest.raises(openai.AuthenticationError):
            c.completions.create(model=MODEL, prompt="x", max_tokens=2)
    # the health check stays open for load balancers
    assert httpx.get(server.url + "/health").status_code == 200


def test_body_too_large_and_malformed_json(server):
    h = {"Authorization": f"Bearer {API_KEY}"}
    r = httpx.post(server.url + "/v1/completions", headers=h,
                   json={"model": MODEL, "prompt": "x" * (5 << 20)})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    r = httpx.post(server.url + "/v1/completions", headers={**h, "Content-Type":
                                                             "application/json"},
                   content=b"{not json")
    assert r.status_code == 400 and "error" in r.json()


def test_overload_answers_429_and_503(server, client, monkeypatch):
    ae = server.app.state.async_engine
    adm = ae.admission
    old = (adm.max_waiting, adm.max_tokens_in_flight)
    try:
        with monkeypatch.context() as m:
            m.setattr(ae, "num_waiting", lambda: adm.max_waiting)  # a full queue
            with pytest.raises(openai.InternalServerError) as e:  # openai maps 503 here
                client.completions.create(model=MODEL, prompt="x", max_tokens=2)
        assert e.value.status_code == 503
        adm.max_tokens_in_flight = 40
        stream = client.completions.create(model=MODEL, prompt="long one", max_tokens=200,
                                           stream=True, extra_body={"ignore_eos": True})
        next(iter(stream))  # it is in flight now
        with pytest.raises(openai.RateLimitError) as e:
            client.completions.create(model=MODEL, prompt="x", max_tokens=10)
        assert e.value.status_code == 429
        stream.close()
    finally:
        adm.max_waiting, adm.max_tokens_in_flight = old
    server.wait_idle()
    assert server.all_blocks_free()


def test_request_timeout(server, client):
    adm = server.app.state.async_engine.admission
    old = adm.request_timeout
    # far below the time of 230 decode steps, however fast a step gets
    adm.request_timeout = 0.005
    try:
        with pytest.raises(openai.APIStatusError) as e:
            client.completions.create(model=MODEL, prompt="slow", max_tokens=230,
                                      extra_body={"ignore_eos": True})
        assert e.value.status_code == 504
    finally:
        adm.request_timeout = old
    server.wait_idle()
    assert server.all_blocks_free()


def test_disconnect_aborts_and_frees_blocks(server):
    h = {"Authorization": f"Bearer {API_KEY}"}
    body = {"model": MODEL, "prompt": "Tell me a long story", "max_tokens": 230,
            "ignore_eos": True, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, headers=h) as r:
        for line in r.iter_lines():
            if line.startswith("data:"):
                break
        assert server.engine.has_unfinished_requests()
    server.wait_idle(timeout=10)
    assert server.all_blocks_free()
