"""Structured output through the server with a real chat model (SmolLM2-135M-Instruct's
GGUF from ../shared): 50 requests with varied JSON schemas through the official `openai`
client, streaming and not, every answer parses and validates; guided_choice / regex too."""

from __future__ import annotations

import json
import re

import pytest

from tests.server.conftest import API_KEY, MODEL, make_server, smollm2_gguf

openai = pytest.importorskip("openai")
jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("llguidance")

_STR = {"type": "string", "maxLength": 12}
SCHEMAS = [
    {"type": "object", "properties": {"name": _STR, "age": {"type": "integer"}},
     "required": ["name", "age"], "additionalProperties": False},
    {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome", "Oslo"]},
                                      "population": {"type": "integer", "minimum": 0}},
     "required": ["city", "population"], "additionalProperties": False},
    {"type": "object", "properties": {"tags": {"type": "array", "items": _STR,
                                               "minItems": 1, "maxItems": 3}},
     "required": ["tags"], "additionalProperties": False},
    {"type": "object", "properties": {"person": {"type": "object", "properties": {
        "first": _STR, "last": _STR}, "required": ["first", "last"],
        "additionalProperties": False}, "score": {"type": "number"}},
     "required": ["person"], "additionalProperties": False},
    {"type": "object", "properties": {"nickname": {"type": ["string", "null"],
                                                   "maxLength": 10},
                                      "active": {"type": "boolean"}},
     "required": ["nickname", "active"], "additionalProperties": False},
    {"type": "object", "properties": {"code": {"type": "string",
                                               "pattern": "^[A-Z]{3}-[0-9]{2}$"}},
     "required": ["code"], "additionalProperties": False},
    {"type": "object", "properties": {"items": {"type": "array", "maxItems": 2, "items": {
        "type": "object", "properties": {"sku": _STR, "qty": {"type": "integer",
                                                               "minimum": 1, "maximum": 9}},
        "required": ["sku", "qty"], "additionalProperties": False}}},
     "required": ["items"], "additionalProperties": False},
    {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]},
                                      "hex": {"type": "string", "pattern": "^#[0-9a-f]{6}$"},
                                      "note": _STR},
     "required": ["color", "hex"], "additionalProperties": False},
    {"type": "array", "items": {"type": "integer", "minimum": 1, "maximum": 100},
     "minItems": 2, "maxItems": 4},
    {"type": "object", "properties": {"answer": {"enum": ["yes", "no"]},
                                      "confidence": {"type": "number", "minimum": 0,
                                                     "maximum": 1}},
     "required": ["answer", "confidence"], "additionalProperties": False},
]
QUESTIONS = ["Describe a person.", "Tell me about a city.", "Give some tags for a photo.",
             "Who wrote a famous book?", "Describe a user account.", "Make up a code.",
             "List an order.", "Pick a color.", "Give me some numbers.", "Is water wet?"]


@pytest.fixture(scope="module")
def smol():
    path = smollm2_gguf()
    with make_server(path, model={"quantization": None, "max_model_len": 1024},
                     cache={"num_blocks": 512}) as s:
        yield openai.OpenAI(base_url=s.url + "/v1", api_key=API_KEY, max_retries=0,
                            timeout=300)


def _ask(client, schema, question, stream: bool, seed: int) -> str:
    kw = dict(model=MODEL, messages=[{"role": "user", "content": question}],
              max_tokens=160, temperature=0.7, seed=seed,
              response_format={"type": "json_schema",
                               "json_schema": {"name": "answer", "schema": schema,
                                               "strict": True}})
    if not stream:
        r = client.chat.completions.create(**kw)
        assert r.choices[0].finish_reason == "stop", r.choices[0].message.content
        return r.choices[0].message.content
    text, reason = "", None
    for chunk in client.chat.completions.create(stream=True, **kw):
        for c in chunk.choices:
            text += c.delta.content or ""
            reason = c.finish_reason or reason
    assert reason == "stop", text
    return text


def test_fifty_schemas_parse_and_validate(smol):
    from concurrent.futures import ThreadPoolExecutor

    jobs = [(SCHEMAS[i % 10], QUESTIONS[i % 10], i % 2 == 1, i) for i in range(50)]
    with ThreadPoolExecutor(8) as pool:  # constrained requests batched together
        texts = list(pool.map(lambda j: _ask(smol, *j), jobs))
    for (schema, _, _, _), text in zip(jobs, texts):
        jsonschema.validate(json.loads(text), schema)


def test_guided_choice_and_regex_through_extra_body(smol):
    r = smol.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Is the sky blue?"}],
        max_tokens=8, temperature=0, extra_body={"guided_choice": ["yes", "no"]})
    assert r.choices[0].message.content in ("yes", "no")
    r = smol.completions.create(model=MODEL, prompt="The year was ", max_tokens=8,
                                temperature=0, extra_body={"guided_regex": r"1[0-9]{3}"})
    assert re.fullmatch(r"1[0-9]{3}", r.choices[0].text)
