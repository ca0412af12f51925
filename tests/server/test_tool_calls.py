"""Tool calling on /v1/chat/completions (issue 19): the Hermes parser alone, the prompt and
the constraint, request validation, and tool calls round-tripping through the official
`openai` client — on the tiny random model (the constraint makes its output a call) and on
the real SmolLM2-135M-Instruct from ../shared (skipped without it)."""

from __future__ import annotations

import json

import httpx
import pytest

from sparsa.outputs import CompletionOutput
from sparsa.server.tool_parser import HermesToolParser, get_tool_parser
from tests.server.conftest import API_KEY, MODEL, make_server, smollm2_gguf

openai = pytest.importorskip("openai")
pytest.importorskip("llguidance")

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city.",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 20},
        "unit": {"enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"], "additionalProperties": False}}}
ADD = {"type": "function", "function": {
    "name": "add", "description": "Add two integers.",
    "parameters": {"type": "object", "properties": {
        "a": {"type": "integer", "minimum": 0, "maximum": 999},
        "b": {"type": "integer", "minimum": 0, "maximum": 999}},
        "required": ["a", "b"], "additionalProperties": False}}}
# what the tiny random model can finish quickly: one enum argument
UNIT = {"type": "function", "function": {
    "name": "set_unit", "parameters": {"type": "object", "properties": {
        "unit": {"enum": ["c", "f"]}}, "required": ["unit"], "additionalProperties": False}}}
TOOLS = [WEATHER, ADD]
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}' \
       '\n</tool_call>'


def _parse(text: str):
    return HermesToolParser().parse(text)


# ---- the Hermes parser ----------------------------------------------------------------
def test_plain_text_is_content():
    p = _parse("The capital of France is Paris.")
    assert p.content == "The capital of France is Paris." and p.tool_calls == []
    assert _parse("").content == ""


def test_one_call():
    p = _parse(CALL)
    assert p.content is None and len(p.tool_calls) == 1
    c = p.tool_calls[0]
    assert c.name == "get_weather" and json.loads(c.arguments) == {"city": "Paris",
                                                                   "unit": "celsius"}
    assert c.id.startswith("call_")


def test_several_calls_and_text_around_them():
    text = ("Let me check.\n" + CALL + "\n<tool_call>\n"
            '{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>\nDone.')
    p = _parse(text)
    assert [c.name for c in p.tool_calls] == ["get_weather", "add"]
    assert p.content == "Let me check.Done."
    assert len({c.id for c in p.tool_calls}) == 2


@pytest.mark.parametrize("text", [
    "<tool_call>\n{not json}\n</tool_call>",
    '<tool_call>\n{"arguments": {}}\n</tool_call>',  # no name
    '<tool_call>\n{"name": "f", "arguments": [1]}\n</tool_call>',  # arguments not an object
    "Sure <tool_call>\n{\"name\": \"f\", ",  # cut off
    "<tool_call>",
])
def test_malformed_calls_stay_content_verbatim(text):
    p = _parse(text)
    assert p.tool_calls == [] and p.content == text


def test_lenient_forms():
    # an unclosed final block whose JSON is whole; arguments as JSON text; no arguments
    p = _parse('<tool_call>\n{"name": "f", "arguments": "{\\"x\\": 1}"}\n')
    assert [(c.name, json.loads(c.arguments)) for c in p.tool_calls] == [("f", {"x": 1})]
    p = _parse('<tool_call>{"name": "now"}</tool_call>')
    assert [(c.name, c.arguments) for c in p.tool_calls] == [("now", "{}")]


@pytest.mark.parametrize("step", [1, 2, 3, 7])
def test_streaming_feed_matches_the_whole_parse(step):
    text = "Hi <tool\nthere.\n" + CALL + "\n<tool_call>oops</tool_call> end <tool_ca"
    whole = _parse(text)
    parser, content, calls = HermesToolParser(), "", []
    for i in range(0, len(text), step):
        c, found = parser.feed(text[i:i + step])
        content += c
        calls += found
        # a call is released whole, and nothing of a block leaks out as content first
        assert "<tool_call>\n{" not in content
    c, found = parser.finish()
    content, calls = content + c, calls + found
    assert content == whole.content == "Hi <tool\nthere.<tool_call>oops</tool_call> end <tool_ca"
    assert [(c.name, c.arguments) for c in calls] == \
        [(c.name, c.arguments) for c in whole.tool_calls]


def test_parser_registry():
    assert get_tool_parser("hermes") is HermesToolParser
    with pytest.raises(ValueError, match="hermes"):
        get_tool_parser("nope")


# ---- prompt, constraint and answer shaping (no server) ----------------------------------
def _request(**kw):
    from sparsa.server.protocol import ChatCompletionRequest

    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], **kw}
    return ChatCompletionRequest.model_validate(body)


def test_template_without_tools_gets_a_hermes_system_prompt_and_history():
    from sparsa.server.tools import build_prompt, template_supports_tools

    class Tok:
        chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"

    assert not template_supports_tools(Tok.chat_template)
    req = _request(tools=TOOLS, messages=[
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {
                "name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "22 C"},
        {"role": "tool", "tool_call_id": "call_2", "content": "sunny"}])
    conv, tools = build_prompt(req, Tok())
    assert tools is None
    assert conv[0]["content"].startswith("Be brief.\n\n# Tools")
    assert '"name": "get_weather"' in conv[0]["content"] and "<tool_call>" in conv[0]["content"]
    assert conv[2] == {"role": "assistant", "content": CALL}
    # the results of one turn's calls: one user turn
    assert conv[3] == {"role": "user", "content": "<tool_response>\n22 C\n</tool_response>\n"
                                                  "<tool_response>\nsunny\n</tool_response>"}
    assert len(conv) == 4
    # tool_choice none: no tools in the prompt
    conv, _ = build_prompt(_request(tools=TOOLS, tool_choice="none"), Tok())
    assert conv == [{"role": "user", "content": "hi"}]


def test_template_with_tools_gets_them_natively():
    from sparsa.server.tools import build_prompt

    class Tok:
        chat_template = ("{% if tools %}{% for t in tools %}{{ t.function.name }}{% endfor %}"
                         "{% endif %}{% for m in messages %}{{ m.content }}{% endfor %}")

    req = _request(tools=TOOLS, messages=[
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "tool_calls": [{"id": "c1", "type": "function", "function": {
            "name": "add", "arguments": '{"a": 2, "b": 2}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "4"}])
    conv, tools = build_prompt(req, Tok())
    assert [t["function"]["name"] for t in tools] == ["get_weather", "add"]
    assert tools[0]["function"]["parameters"] == WEATHER["function"]["parameters"]
    # arguments as an object, as templates write them with tojson
    assert conv[1]["tool_calls"][0]["function"]["arguments"] == {"a": 2, "b": 2}
    assert conv[2] == {"role": "tool", "content": "4", "tool_call_id": "c1"}


def test_constraint_grammar_compiles_and_keeps_gbnf_lookalikes_lark():
    from sparsa.server.tools import tool_setup

    tricky = {"type": "function", "function": {"name": "g", "parameters": {
        "type": "object", "properties": {"x": {"type": "string", "description": "a ::= b"}}}}}
    for choice in ("required", {"type": "function", "function": {"name": "g"}}):
        # built (and compiled) as Lark: "::=" would have made it GBNF, and refused
        setup = tool_setup(_request(tools=[*TOOLS, tricky], tool_choice=choice),
                           HermesToolParser)
        assert "::=" not in setup.guided.grammar and setup.guided.grammar_text()
    named = tool_setup(_request(tools=TOOLS, tool_choice={"type": "function", "function": {
        "name": "add"}}), HermesToolParser)
    assert '\\"add\\"' in named.guided.grammar and "get_weather" not in named.guided.grammar


def test_auto_answer_shapes_from_fake_output():
    from sparsa.server.tools import tool_setup

    setup = tool_setup(_request(tools=TOOLS), HermesToolParser)
    assert setup.guided is None and setup.parser is HermesToolParser
    out = setup.answer(CompletionOutput(0, "Checking.\n" + CALL, [1], finish_reason="stop"))
    assert out["finish_reason"] == "tool_calls"
    assert out["message"]["content"] == "Checking."
    [call] = out["message"]["tool_calls"]
    assert call["type"] == "function" and call["function"]["name"] == "get_weather"
    out = setup.answer(CompletionOutput(0, "<tool_call>{bad", [1], finish_reason="length"))
    assert out["message"] == {"role": "assistant", "content": "<tool_call>{bad"}
    assert out["finish_reason"] == "length"
    # streaming: content as it comes, the call whole at its closing tag
    st = setup.stream()
    deltas = [d for piece in ("Check", "ing.\n<tool", CALL[5:30], CALL[30:])
              for d in st.feed(piece, False)] + st.feed("", True)
    assert deltas[0] == {"content": "Check"} and deltas[1] == {"content": "ing."}
    assert deltas[2]["tool_calls"][0]["index"] == 0
    assert st.finish_reason("stop") == "tool_calls"
    # parallel_tool_calls false under auto: generation stops after the first call
    single = tool_setup(_request(tools=TOOLS, parallel_tool_calls=False), HermesToolParser)
    assert single.stops() == ["</tool_call>"]


# ---- request validation (the tiny model's server) ----------------------------------------
def _post(server, body: dict) -> httpx.Response:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 4, **body}
    return httpx.post(server.url + "/v1/chat/completions", json=body, timeout=120,
                      headers={"Authorization": f"Bearer {API_KEY}"})


@pytest.mark.parametrize("extra,param,says", [
    ({"tools": [{"type": "function"}]}, "tools", "tools.0.function"),
    ({"tools": [{"type": "custom", "function": {"name": "f"}}]}, "tools", "tools.0.type"),
    ({"tools": [{"type": "function", "function": {"name": "two words"}}]}, "tools",
     "tools.0.function.name"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": "x"}}]},
     "tools", "tools.0.function.parameters"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "array"}}}]}, "tools", "tools.0.function.parameters"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"x": {"type": "string", "pattern": "("}}}}}]},
     "tools", "tools.0.function.parameters"),
    ({"tools": [WEATHER, WEATHER]}, "tools", "unique"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice", "nope"),
    ({"tool_choice": "required"}, "tool_choice", "needs tools"),
    ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice", "tool_choice"),
    ({"tools": TOOLS, "tool_choice": "required", "guided_regex": "a"}, "guided_regex",
     "tool_choice"),
    ({"tools": TOOLS, "parallel_tool_calls": "yes"}, "parallel_tool_calls",
     "parallel_tool_calls"),
    ({"messages": [{"role": "user", "content": "x", "tool_calls": [{
        "id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}]},
     "messages", "assistant"),
])
def test_bad_tool_requests_are_400s_naming_the_field(server, extra, param, says):
    r = _post(server, extra)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and says in err["message"], err


@pytest.mark.parametrize("extra", [{"tool_choice": "none"}, {"tool_choice": "auto"},
                                   {"tools": TOOLS, "tool_choice": "none"},
                                   {"parallel_tool_calls": False}])
def test_off_and_auto_choices_answer_plain_messages(server, extra):
    r = _post(server, extra)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["role"] == "assistant"


# a template that takes tools (natively, in a few characters: the tiny model's tokens
# are characters and its context 512)
TOOLS_TEMPLATE = ("{{ bos_token }}{% if tools %}<tools>{% for t in tools %}"
                  "{{ t.function.name }};{% endfor %}\n{% endif %}{% for m in messages %}"
                  "<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                  "{% if add_generation_prompt %}<assistant>{% endif %}")


def build_byte_level_tokenizer(out_dir) -> None:
    """conftest's character tokenizer (the same ids) spelled as byte-level BPE, whose
    vocabulary llguidance can read (it cannot read a bare Fuse decoder's): printable ASCII
    stands for itself there, space is "Ġ" and newline "Ċ"."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    from tests.server.conftest import CHARS, SPECIALS

    chars = ["Ġ" if c == " " else "Ċ" if c == "\n" else c for c in CHARS]
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(SPECIALS + chars)},
                               merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIALS)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[
        ("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")
    fast.chat_template = TOOLS_TEMPLATE
    fast.save_pretrained(out_dir)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from tests.server.conftest import build_tiny_chat_model

    path = build_tiny_chat_model(tmp_path_factory.mktemp("tiny-tools"))
    build_byte_level_tokenizer(path)
    with make_server(path, model={"max_model_len": 512}) as s:
        yield openai.OpenAI(base_url=s.url + "/v1", api_key=API_KEY, max_retries=0,
                            timeout=120)


def _stream(client, **kw):
    """(content, tool calls as {index: [id, name, arguments]}, finish reason)."""
    content, calls, reason = "", {}, None
    for chunk in client.chat.completions.create(stream=True, **kw):
        for c in chunk.choices:
            content += c.delta.content or ""
            for tc in c.delta.tool_calls or []:
                slot = calls.setdefault(tc.index, ["", "", ""])
                slot[0] = tc.id or slot[0]
                if tc.function:
                    slot[1] += tc.function.name or ""
                    slot[2] += tc.function.arguments or ""
            reason = c.finish_reason or reason
    return content, calls, reason


@pytest.mark.parametrize("stream", [False, True])
def test_forced_call_from_the_tiny_model(tiny, stream):
    """The constraint alone makes a random model's output a valid call."""
    kw = dict(model=MODEL, messages=[{"role": "user", "content": "Use Fahrenheit."}],
              tools=[UNIT, ADD], tool_choice={"type": "function", "function": {
                  "name": "set_unit"}}, parallel_tool_calls=False, max_tokens=100,
              temperature=0, seed=1)
    if stream:
        content, calls, reason = _stream(tiny, **kw)
        assert content == "" and reason == "tool_calls"
        [(cid, name, args)] = calls.values()
    else:
        r = tiny.chat.completions.create(**kw)
        msg = r.choices[0].message
        assert r.choices[0].finish_reason == "tool_calls" and msg.content is None
        [call] = msg.tool_calls
        cid, name, args = call.id, call.function.name, call.function.arguments
    assert cid.startswith("call_") and name == "set_unit"
    assert json.loads(args)["unit"] in ("c", "f")


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("parallel", [True, False])
def test_auto_parses_calls_end_to_end(tiny, stream, parallel):
    """The auto path through the server, made deterministic: guided_regex (allowed beside
    auto) writes a sentence and calls, which the parser must split. Without parallel
    calls the generation stops at the first call's closing tag."""
    call = r'<tool_call>\n\{"name": "add", "arguments": \{"a": 1, "b": 2\}\}\n</tool_call>'
    regex = r"Sure\.\n" + call + r"\n" + call.replace('"a": 1', '"a": 5')
    kw = dict(model=MODEL, messages=[{"role": "user", "content": "1+2?"}], tools=TOOLS,
              max_tokens=200, temperature=0, parallel_tool_calls=parallel,
              extra_body={"guided_regex": regex})
    if stream:
        content, calls, reason = _stream(tiny, **kw)
        found = list(calls.values())
    else:
        r = tiny.chat.completions.create(**kw)
        msg, reason = r.choices[0].message, r.choices[0].finish_reason
        content = msg.content
        found = [(c.id, c.function.name, c.function.arguments) for c in msg.tool_calls]
        assert r.choices[0].model_extra.get("stop_reason") is None
    assert content == "Sure." and reason == "tool_calls"
    assert [(name, json.loads(args)) for _, name, args in found] == \
        [("add", {"a": 1, "b": 2}), ("add", {"a": 5, "b": 2})][:2 if parallel else 1]
    assert all(cid.startswith("call_") for cid, _, _ in found)


# ---- SmolLM2-135M-Instruct -------------------------------------------------------------
@pytest.fixture(scope="module")
def smol():
    path = smollm2_gguf()
    with make_server(path, model={"quantization": None, "max_model_len": 2048},
                     cache={"num_blocks": 512}) as s:
        yield openai.OpenAI(base_url=s.url + "/v1", api_key=API_KEY, max_retries=0,
                            timeout=300)


def _check_args(name: str, args: str) -> dict:
    import jsonschema

    schema = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}[name]
    value = json.loads(args)
    jsonschema.validate(value, schema)
    return value


@pytest.mark.parametrize("stream", [False, True])
def test_smol_required_round_trip(smol, stream):
    kw = dict(model=MODEL, messages=[{"role": "user", "content":
                                      "What is the weather like in Paris?"}],
              tools=TOOLS, tool_choice="required", max_tokens=120, temperature=0)
    if stream:
        content, calls, reason = _stream(smol, **kw)
        assert content == "" and calls
        found = [(name, args) for _, name, args in calls.values()]
    else:
        r = smol.chat.completions.create(**kw)
        msg, reason = r.choices[0].message, r.choices[0].finish_reason
        assert msg.content is None and msg.tool_calls
        found = [(c.function.name, c.function.arguments) for c in msg.tool_calls]
    assert reason == "tool_calls"
    for name, args in found:
        _check_args(name, args)


@pytest.mark.parametrize("stream", [False, True])
def test_smol_named_function(smol, stream):
    kw = dict(model=MODEL, messages=[{"role": "user", "content": "What is 17 plus 25?"}],
              tools=TOOLS, tool_choice={"type": "function", "function": {"name": "add"}},
              parallel_tool_calls=False, max_tokens=60, temperature=0)
    if stream:
        _, calls, reason = _stream(smol, **kw)
        [(_, name, args)] = calls.values()
    else:
        r = smol.chat.completions.create(**kw)
        reason = r.choices[0].finish_reason
        [call] = r.choices[0].message.tool_calls
        name, args = call.function.name, call.function.arguments
    assert reason == "tool_calls" and name == "add"
    assert set(_check_args(name, args)) == {"a", "b"}


@pytest.mark.parametrize("stream", [False, True])
def test_smol_auto_is_well_formed(smol, stream):
    """A 135M model may or may not call a tool under auto: whatever it does, the answer
    has OpenAI's shape and any call parses."""
    kw = dict(model=MODEL, messages=[{"role": "user", "content":
                                      "What is the weather like in Paris?"}],
              tools=TOOLS, max_tokens=80, temperature=0)
    if stream:
        content, calls, reason = _stream(smol, **kw)
        found = [(name, args) for _, name, args in calls.values()]
    else:
        r = smol.chat.completions.create(**kw)
        msg, reason = r.choices[0].message, r.choices[0].finish_reason
        content = msg.content
        found = [(c.function.name, c.function.arguments) for c in msg.tool_calls or []]
    assert reason in ("stop", "length", "tool_calls")
    assert (reason == "tool_calls") == bool(found) or reason == "length"
    for _, args in found:
        assert isinstance(json.loads(args), dict)
    if not found:
        assert content


def test_smol_second_turn_with_the_tool_result(smol):
    first = smol.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "What is the weather in Paris?"}],
        tools=TOOLS, tool_choice={"type": "function", "function": {"name": "get_weather"}},
        parallel_tool_calls=False, max_tokens=60, temperature=0)
    msg = first.choices[0].message
    [call] = msg.tool_calls
    history = [{"role": "user", "content": "What is the weather in Paris?"},
               msg.model_dump(exclude_none=True),
               {"role": "tool", "tool_call_id": call.id,
                "content": json.dumps({"temperature": 22, "condition": "sunny"})}]
    for stream in (False, True):
        kw = dict(model=MODEL, messages=history, tools=TOOLS, tool_choice="none",
                  max_tokens=40, temperature=0)
        if stream:
            content, calls, reason = _stream(smol, **kw)
            assert not calls
        else:
            r = smol.chat.completions.create(**kw)
            content, reason = r.choices[0].message.content, r.choices[0].finish_reason
            assert r.choices[0].message.tool_calls is None
        assert reason in ("stop", "length") and content.strip()
