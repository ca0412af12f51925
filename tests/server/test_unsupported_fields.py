"""Nothing silently ignored (issue 19): every field of OpenAI's request schemas is either
implemented, refused with a 400 that names it, or one of the few that change nothing about
the answer. The test walks the `openai` package's own request types, so a field OpenAI adds
is held to the same line."""

from __future__ import annotations

import httpx
import pytest
from openai.types import completion_create_params as completions
from openai.types.chat import completion_create_params as chat

from sparsa.server.protocol import IGNORED, ChatCompletionRequest, CompletionRequest
from tests.server.conftest import API_KEY, MODEL

# a value of a plausible type for each field that the test sends on its own
_VALUES = {"audio": {"voice": "alloy", "format": "wav"}, "function_call": "auto",
           "functions": [{"name": "f", "parameters": {"type": "object"}}],
           "modalities": ["text", "audio"], "moderation": {"type": "auto"},
           "prediction": {"type": "content", "content": "x"}, "reasoning_effort": "low",
           "response_format": {"type": "json_object"},
           "verbosity": "low", "web_search_options": {}, "prompt_cache_options": {"x": 1}}


def _post(server, path: str, body: dict) -> httpx.Response:
    return httpx.post(server.url + path, json=body, timeout=60,
                      headers={"Authorization": f"Bearer {API_KEY}"})


def _fields(params) -> list[str]:
    return sorted(params.CompletionCreateParamsBase.__annotations__)


@pytest.mark.parametrize("name", [f for f in _fields(chat)
                                  if f not in ChatCompletionRequest.model_fields])
def test_chat_fields_sparsa_lacks_are_refused_by_name(server, name):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
            name: _VALUES.get(name, "x")}
    r = _post(server, "/v1/chat/completions", body)
    if name in IGNORED:
        assert r.status_code == 200, r.text
        return
    assert r.status_code == 400, (name, r.text)
    err = r.json()["error"]
    assert err["param"] == name and name in err["message"]


def test_completion_fields_sparsa_lacks_are_refused_by_name(server):
    lacking = [f for f in _fields(completions) if f not in CompletionRequest.model_fields]
    for name in lacking + ["guided_json", "response_format"]:  # + vLLM's, OpenAI's chat's
        r = _post(server, "/v1/completions", {"model": MODEL, "prompt": "hi",
                                              "max_tokens": 2, name: _VALUES.get(name, "x")})
        assert r.status_code == (200 if name in IGNORED else 400), (name, r.text)


@pytest.mark.parametrize("extra,param", [
    ({"structured_outputs": {"json": {}}}, "structured_outputs"),
    ({"guided_json": "{not json"}, "guided_json"),
    ({"guided_regex": "("}, "guided_regex"),
    ({"response_format": {"type": "xml"}}, "response_format"),
    ({"guided_regex": "a", "guided_choice": ["b"]}, "guided_regex"),
])
def test_bad_or_unknown_constraints_are_400s_naming_them(server, extra, param):
    r = _post(server, "/v1/chat/completions", {
        "model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
        **extra})
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


@pytest.mark.parametrize("extra", [{"tool_choice": "none"}, {"response_format": {"type":
                                                                                 "text"}},
                                   {"store": False, "metadata": {"a": "b"}}])
def test_off_values_and_bookkeeping_are_accepted(server, extra):
    r = _post(server, "/v1/chat/completions", {
        "model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
        **extra})
    assert r.status_code == 200, r.text
