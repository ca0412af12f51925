"""vLLM's /tokenize and /detokenize on the live test server."""

from __future__ import annotations

import httpx

from tests.server.conftest import API_KEY, MODEL


def _post(server, path, body):
    return httpx.post(server.url + path, json=body, timeout=30,
                      headers={"Authorization": f"Bearer {API_KEY}"})


def test_tokenize_and_detokenize_round_trip(server):
    r = _post(server, "/tokenize", {"model": MODEL, "prompt": "Hello!",
                                    "return_token_strs": True})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["count"] == len(body["tokens"]) == len("Hello!") + 1  # + BOS, one per char
    assert body["max_model_len"] == server.engine.max_model_len
    assert body["token_strs"][1:] == list("Hello!")
    r = _post(server, "/tokenize", {"model": MODEL, "prompt": "Hello!",
                                    "add_special_tokens": False})
    assert r.json()["tokens"] == body["tokens"][1:]
    r = _post(server, "/detokenize", {"model": MODEL, "tokens": body["tokens"][1:]})
    assert r.status_code == 200 and r.json()["prompt"] == "Hello!"


def test_tokenize_messages_uses_the_chat_template(server):
    r = _post(server, "/tokenize", {"model": MODEL, "messages": [{"role": "user",
                                                                  "content": "hi"}]})
    assert r.status_code == 200
    text = _post(server, "/detokenize", {"model": MODEL, "tokens": r.json()["tokens"]})
    assert "<user>hi" in text.json()["prompt"] and text.json()["prompt"].endswith(
        "<assistant>")


def test_bad_tokenize_requests_are_400s(server):
    for body, param in (({"model": MODEL}, "prompt"),
                        ({"model": MODEL, "prompt": "a", "messages": [
                            {"role": "user", "content": "b"}]}, "prompt")):
        r = _post(server, "/tokenize", body)
        assert r.status_code == 400 and r.json()["error"]["param"] == param
    r = _post(server, "/detokenize", {"model": MODEL, "tokens": [10**6]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "tokens"
    assert _post(server, "/tokenize", {"model": "nope", "prompt": "a"}).status_code == 404
