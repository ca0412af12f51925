"""One client cannot hurt the others: bounded work per request, clean 400s for text that
cannot be encoded, strict types and bounds, fast rejections, timed-out uploads, and what
/metrics and the OpenAPI document declare."""

from __future__ import annotations

import http.client
import json
import socket
import time

import httpx
import pytest

from tests.server.conftest import API_KEY, MODEL

H = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}


def post(server, path: str, body: dict | str, **kw) -> httpx.Response:
    content = body if isinstance(body, str) else json.dumps(body)
    return httpx.post(server.url + path, content=content, headers=H, timeout=60, **kw)


def read_reply(s: socket.socket) -> str:
    """One whole HTTP/1.1 response (headers and a Content-Length body) off a socket."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(65536)
        if not chunk:
            return data.decode()
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                   if line.lower().startswith(b"content-length:")), 0)
    while len(body) < length:
        chunk = s.recv(65536)
        if not chunk:
            break
        body += chunk
    return (head + b"\r\n\r\n" + body).decode()


# ---- 1. every sequence a request makes counts -----------------------------------------
def test_prompts_times_n_over_the_per_request_cap_is_refused_before_tokenizing(
        server, monkeypatch):
    ae = server.app.state.async_engine
    monkeypatch.setattr(ae.admission, "max_seqs_per_request", 16)

    def no_tokenizing(*a, **k):
        raise AssertionError("tokenized a request that was refused anyway")

    monkeypatch.setattr(server.engine, "encode", no_tokenizing)
    r = post(server, "/v1/completions", {"model": MODEL, "prompt": ["a", "b", "c"], "n": 6,
                                         "max_tokens": 1})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["code"] == "too_many_sequences" and "18 sequences" in err["message"]
    assert "--max-seqs-per-request" in err["message"]


def test_waiting_queue_counts_sequences_not_requests(server, monkeypatch):
    ae = server.app.state.async_engine
    monkeypatch.setattr(ae.admission, "max_waiting", 10)
    monkeypatch.setattr(ae, "num_waiting", lambda: 7)  # 7 sequences already queued
    body = {"model": MODEL, "prompt": [[5, 6], [7, 8]], "n": 2, "max_tokens": 1}
    r = post(server, "/v1/completions", body)  # 4 more would make 11 > 10
    assert r.status_code == 503 and "--max-waiting" in r.json()["error"]["message"]
    assert r.headers["retry-after"] == "1"
    body["n"] = 1  # 2 more: 9 <= 10
    assert post(server, "/v1/completions", body).status_code == 200
    server.wait_idle()


def test_a_request_that_can_never_fit_the_token_cap_is_a_400_even_when_idle(
        server, monkeypatch):
    ae = server.app.state.async_engine
    server.wait_idle()
    monkeypatch.setattr(ae.admission, "max_tokens_in_flight", 100)
    body = {"model": MODEL, "prompt": [[5, 6, 7]] * 4, "max_tokens": 30}  # 4 x 33 > 100
    r = post(server, "/v1/completions", body)
    assert r.status_code == 400 and "--max-tokens-in-flight" in r.json()["error"]["message"]
    body["max_tokens"] = 20  # 4 x 23 fits
    assert post(server, "/v1/completions", body).status_code == 200


def test_admitted_prompts_times_n_add_up_in_tokens_in_flight(server, monkeypatch):
    ae = server.app.state.async_engine
    seen = []
    original = ae.admit

    def admit(cost, num_seqs=1):
        seen.append((cost, num_seqs))
        return original(cost, num_seqs)

    monkeypatch.setattr(ae, "admit", admit)
    r = post(server, "/v1/completions", {"model": MODEL, "prompt": [[5, 6], [7, 8, 9]],
                                         "n": 3, "max_tokens": 2})
    assert r.status_code == 200 and len(r.json()["choices"]) == 6
    assert seen == [(3 * (2 + 2) + 3 * (3 + 2), 6)]
    server.wait_idle()
    assert ae.tokens_in_flight == 0 and ae.num_waiting() == 0


# ---- 2. text that cannot be encoded -----------------------------------------------------
M = '{"model": "' + MODEL + '", '
SURROGATE_BODIES = [
    ("/v1/completions", M + '"prompt": "a\\ud800b", "max_tokens": 1}'),
    ("/v1/completions", M + '"prompt": ["ok", "\\udfff"], "max_tokens": 1}'),
    ("/v1/completions", '{"model": "\\ud800", "prompt": "x", "max_tokens": 1}'),
    ("/v1/completions", M + '"prompt": "x", "stop": ["\\ud800"]}'),
    ("/v1/chat/completions", M + '"messages": [{"role": "user", '
                             '"content": "hi \\ud83d"}]}'),
    ("/v1/chat/completions", M + '"messages": [{"role": "user", "content": '
                             '[{"type": "text", "text": "\\ud800"}]}]}'),
]


@pytest.mark.parametrize("path,body", SURROGATE_BODIES)
def test_lone_surrogates_are_a_clean_400_and_the_connection_lives_on(server, path, body):
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    try:
        conn.request("POST", path, body=body.encode(), headers=H)
        r = conn.getresponse()
        err = json.loads(r.read())["error"]
        assert r.status == 400, err
        assert "not valid Unicode" in err["message"] and "tokeniz" not in err["message"]
        assert r.getheader("connection") != "close"
        conn.request("GET", "/health")  # same keep-alive connection
        r = conn.getresponse()
        assert r.status == 200 and json.loads(r.read()) == {"status": "ok"}
    finally:
        conn.close()


def test_a_valid_surrogate_pair_is_text(server):
    r = post(server, "/v1/completions",
             M + '"prompt": "\\ud83d\\ude00 hi", "max_tokens": 1}')
    assert r.status_code == 200, r.text


def test_an_unexpected_error_is_a_500_that_keeps_the_connection(server, monkeypatch):
    def broken():
        raise RuntimeError("boom")

    monkeypatch.setattr(server.engine, "stats", broken)  # /metrics reads it
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    try:
        conn.request("GET", "/metrics")
        r = conn.getresponse()
        body = json.loads(r.read())
        assert r.status == 500 and body["error"]["type"] == "server_error"
        conn.request("GET", "/health")
        r = conn.getresponse()
        assert r.status == 200
        r.read()
    finally:
        conn.close()


# ---- 5. rejections cost next to nothing -------------------------------------------------
def test_a_huge_prompt_is_refused_by_length_before_tokenizing(server, monkeypatch):
    def no_tokenizing(*a, **k):
        raise AssertionError("tokenized a prompt that cannot fit")

    monkeypatch.setattr(server.engine, "encode", no_tokenizing)
    r = post(server, "/v1/completions", {"model": MODEL, "prompt": "x" * 3_000_000})
    assert r.status_code == 400 and "maximum context length" in r.json()["error"]["message"]
    r = post(server, "/v1/chat/completions", {"model": MODEL, "messages": [
        {"role": "user", "content": "y" * 3_000_000}]})
    assert r.status_code == 400 and "maximum context length" in r.json()["error"]["message"]


def test_an_overloaded_server_refuses_before_reading_the_body(server, monkeypatch):
    ae = server.app.state.async_engine
    monkeypatch.setattr(ae, "num_waiting", lambda: ae.admission.max_waiting)

    def parsed(*a, **k):
        raise AssertionError("parsed a request while overloaded")

    monkeypatch.setattr(server.app.state.async_engine, "check_size", parsed)
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        # headers only: the answer must not wait for a body that never comes
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                  b"Authorization: Bearer " + API_KEY.encode() + b"\r\n"
                  b"Content-Type: application/json\r\nContent-Length: 100000\r\n\r\n")
        reply = read_reply(s)
    assert reply.startswith("HTTP/1.1 503"), reply[:200]
    assert "--max-waiting" in reply
    assert httpx.get(server.url + "/health").status_code == 200


# ---- 6. uploads are timed out -----------------------------------------------------------
def test_a_half_sent_body_times_out_with_408_and_the_connection_closes(server, monkeypatch):
    monkeypatch.setattr(server.app.state.settings, "body_timeout", 0.5)
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                  b"Authorization: Bearer " + API_KEY.encode() + b"\r\n"
                  b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
                  b'{"model": "tiny')
        t0 = time.monotonic()
        reply = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break  # closed by the server
            reply += chunk
        waited = time.monotonic() - t0
    assert reply.startswith(b"HTTP/1.1 408"), reply[:200]
    assert b"--body-timeout" in reply and waited < 8


# ---- 7/8. strict types, bounds, priority ------------------------------------------------
@pytest.mark.parametrize("field,value", [
    ("stream", "yes"), ("max_tokens", "5"), ("n", 2.0), ("temperature", "0.5"),
    ("echo", 1), ("top_k", 1 << 21), ("priority", 2**40), ("stop_token_ids", [1] * 65),
    ("stop_token_ids", [2**40]), ("logprobs", True),
])
def test_strict_types_and_bounds(server, field, value):
    r = post(server, "/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 1,
                                         field: value})
    assert r.status_code == 400, (field, value, r.text)
    assert r.json()["error"]["param"] == field


def test_an_int_is_a_valid_float_and_a_tiny_top_p_is_positive(server):
    # written by hand: this process may flush denormals and would serialize 0.0
    r = post(server, "/v1/completions", M + '"prompt": "x", "max_tokens": 1, '
                                            '"temperature": 1, "top_p": 5e-324}')
    assert r.status_code == 200, r.text


def test_stop_token_ids_outside_the_vocabulary(server):
    r = post(server, "/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 1,
                                         "stop_token_ids": [10**6]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "stop_token_ids"


def test_priority_is_refused_under_fcfs(server):
    r = post(server, "/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 1,
                                         "priority": 3})
    assert r.status_code == 400 and "--scheduling-policy priority" in r.text
    assert post(server, "/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 1,
                                            "priority": 0}).status_code == 200


def test_metrics_count_preemptions(server, client):
    text = httpx.get(server.url + "/metrics").text
    assert "sparsa_num_preemptions_total" in text


def test_openapi_declares_metrics_as_text_and_streams_as_sse(server):
    doc = httpx.get(server.url + "/openapi.json").json()
    metrics = doc["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
    assert list(metrics) == ["text/plain"]
    for path in ("/v1/completions", "/v1/chat/completions"):
        content = doc["paths"][path]["post"]["responses"]["200"]["content"]
        assert {"application/json", "text/event-stream"} <= set(content)


def test_allowed_hosts():
    from sparsa.server.cli import allowed_hosts
    from sparsa.server.settings import ServerSettings

    s = ServerSettings(model_name="m", allowed_hosts=allowed_hosts(None, "127.0.0.1"))
    assert s.host_allowed("127.0.0.1:8000") and s.host_allowed("localhost")
    assert s.host_allowed("[::1]:8000") and not s.host_allowed("evil.example")
    assert not s.host_allowed("")
    assert allowed_hosts(None, "0.0.0.0") == ["*"]
    s = ServerSettings(model_name="m", allowed_hosts=allowed_hosts("api.example.org,*.corp",
                                                                   "0.0.0.0"))
    assert s.host_allowed("api.example.org:443") and s.host_allowed("a.b.corp")
    assert not s.host_allowed("example.org")
