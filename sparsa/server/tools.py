"""Tool calling for /v1/chat/completions: the request's tools into the prompt, the
constraint for `tool_choice` "required" or a named function, and the model's output back
into OpenAI `tool_calls` (parsers in tool_parser.py).

The prompt: a chat template that takes `tools` (it names the variable) gets them as
transformers passes them, with the history's tool calls and results in transformers' form.
A template without tool support (SmolLM2's) gets a Hermes-style description of the tools
appended to the system message (one is added when there is none), assistant tool calls
written into their content as `<tool_call>` blocks and tool results sent as a user turn of
`<tool_response>` blocks, as Qwen 2.5's and Hermes' templates render them; a user turn
because a template may refuse a role it does not know.

`tool_choice`: "none" leaves the tools out of the prompt (the answer is plain text);
"auto" (the default with tools) generates freely and parses the output; "required" and a
named function hold the output to Hermes `<tool_call>` blocks with arguments valid under
the function's `parameters` schema: "required" one call of any of the tools, or one or
more when `parallel_tool_calls` is true (the default); a named function one call of it.
Under "auto", `parallel_tool_calls: false` stops the generation after the first call. A
call cut off by max_tokens comes back as content (finish_reason "length").
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from sparsa.outputs import CompletionOutput
from sparsa.sampling_params import SamplingParams
from sparsa.server.errors import bad_request
from sparsa.server.tool_parser import HermesToolParser, ToolCall, ToolParser
from sparsa.structured.guided import GuidedDecoding

if TYPE_CHECKING:
    from sparsa.server.protocol import ChatCompletionRequest, ChatTool

_CLOSE = HermesToolParser.CLOSE
# Compact JSON in the constrained calls, with json.dumps' separators, which is how tool
# calls look in the models' training data
_JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
_NO_PARAMETERS = {"type": "object", "properties": {}, "additionalProperties": False}


def _forced(req: ChatCompletionRequest) -> bool:
    return req.tool_choice is not None and req.tool_choice not in ("none", "auto")


def tools_active(req: ChatCompletionRequest) -> bool:
    """Whether the tools go into the prompt and the output is parsed for calls."""
    return bool(req.tools) and req.tool_choice != "none"


def check_tool_request(req: ChatCompletionRequest) -> None:
    """The 400s that pydantic's shapes cannot say: unknown or repeated names, a forced
    choice without tools or beside another constraint, a parameters schema the grammar
    engine refuses, tool calls on a turn that is not the assistant's."""
    for i, m in enumerate(req.messages):
        if m.tool_calls and m.role != "assistant":
            raise bad_request(f"messages.{i}.tool_calls: only assistant messages have "
                              "tool_calls", "messages")
    names = [t.function.name for t in req.tools or []]
    if len(set(names)) != len(names):
        raise bad_request("tools: function names must be unique", "tools")
    choice = req.tool_choice
    if _forced(req):
        if not names:
            raise bad_request("tool_choice other than none or auto needs tools", "tool_choice")
        if choice != "required" and choice.function.name not in names:  # type: ignore[union-attr]
            raise bad_request(f"tool_choice names function {choice.function.name!r}, "  # type: ignore[union-attr]
                              "which is not among the tools", "tool_choice")
        given = [k for k in ("response_format", "guided_json", "guided_regex",
                             "guided_choice", "guided_grammar") if getattr(req, k) is not None]
        if given and not (given == ["response_format"]
                          and (req.response_format or {}).get("type") == "text"):
            raise bad_request(f"{given[0]} cannot be combined with tool_choice "
                              f"{_choice_name(req)!r}: both constrain the output", given[0])
    for i, tool in enumerate(req.tools or []):
        schema = tool.function.parameters
        if schema is None:
            continue
        if schema.get("type", "object") != "object":
            raise bad_request(f"tools.{i}.function.parameters must be an object schema "
                              "(the arguments are a JSON object)", "tools")
        try:
            GuidedDecoding(json=schema)  # compiled once per schema (cached)
        except ValueError as e:
            raise bad_request(f"tools.{i}.function.parameters: {e}", "tools") from None


def _choice_name(req: ChatCompletionRequest) -> str:
    c = req.tool_choice
    return c if isinstance(c, str) else f"function {c.function.name}"  # type: ignore[union-attr]


# ---- the prompt --------------------------------------------------------------------------
@lru_cache(maxsize=16)
def template_supports_tools(template: str) -> bool:
    """Whether a Jinja chat template reads a `tools` variable (the sign transformers and
    vLLM go by: a template that never reads it would drop the tools silently)."""
    import jinja2
    from jinja2 import meta

    env = jinja2.Environment(extensions=["jinja2.ext.loopcontrols", "jinja2.ext.do"])
    try:
        return "tools" in meta.find_undeclared_variables(env.parse(template))
    except jinja2.TemplateError:
        return False


def _template_text(tokenizer: Any) -> str:
    t = getattr(tokenizer, "chat_template", None) or ""
    if isinstance(t, dict):  # named templates: transformers uses "tool_use" for tools
        t = t.get("tool_use") or t.get("default") or ""
    return t if isinstance(t, str) else ""


def tool_spec(tool: ChatTool) -> dict[str, Any]:
    """A tool as the chat template and the system prompt show it (OpenAI's shape)."""
    return {"type": "function", "function": tool.function.model_dump(exclude_none=True)}


def hermes_system_prompt(tools: list[dict[str, Any]], parallel: bool = True) -> str:
    """The tools described as Hermes / Qwen 2.5 templates describe them."""
    lines = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
    many = "one or more functions" if parallel else "a function"
    return ("# Tools\n\n"
            f"You may call {many} to assist with the user query.\n\n"
            "You are provided with function signatures within <tools></tools> XML tags:\n"
            f"<tools>\n{lines}\n</tools>\n\n"
            "For each function call, return a json object with function name and arguments "
            "within <tool_call></tool_call> XML tags:\n"
            "<tool_call>\n"
            '{"name": <function-name>, "arguments": <args-json-object>}\n'
            "</tool_call>")


def _arguments(text: str) -> Any:
    """A history call's arguments as an object: templates write them with `tojson`, and
    OpenAI sends them as JSON text (kept as text when it is not JSON)."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def _native_message(m: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"role": m.role, "content": m.text()}
    if m.name is not None:
        out["name"] = m.name
    if m.tool_calls:
        out["tool_calls"] = [{"id": c.id, "type": "function",
                              "function": {"name": c.function.name,
                                           "arguments": _arguments(c.function.arguments)}}
                             for c in m.tool_calls]
    if m.tool_call_id is not None:
        out["tool_call_id"] = m.tool_call_id
    return out


def _fallback_messages(req: ChatCompletionRequest) -> list[dict[str, Any]]:
    """The history in plain role/content turns (see the module doc)."""
    conv: list[dict[str, Any]] = []
    for m in req.messages:
        if m.role == "tool":
            block = f"<tool_response>\n{m.text()}\n</tool_response>"
            if conv and conv[-1].get("_tool"):  # results of one turn's calls go together
                conv[-1]["content"] += "\n" + block
            else:
                conv.append({"role": "user", "content": block, "_tool": True})
            continue
        text = m.text()
        for c in m.tool_calls or []:
            call = json.dumps({"name": c.function.name,
                               "arguments": _arguments(c.function.arguments)},
                              ensure_ascii=False)
            text += ("\n" if text else "") + f"<tool_call>\n{call}\n{_CLOSE}"
        conv.append({"role": m.role, "content": text})
    for turn in conv:
        turn.pop("_tool", None)
    return conv


def build_prompt(req: ChatCompletionRequest, tokenizer: Any
                 ) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """(messages, tools) for apply_chat_template; tools is None when the template does
    not take them (they are then in the system message) or none are in play."""
    native = template_supports_tools(_template_text(tokenizer))
    tools = [tool_spec(t) for t in req.tools or []] if tools_active(req) else []
    if native:
        return [_native_message(m) for m in req.messages], tools or None
    conv = _fallback_messages(req)
    if tools:
        prompt = hermes_system_prompt(tools, req.parallel_tool_calls)
        if conv and conv[0]["role"] in ("system", "developer"):
            conv[0]["content"] = (conv[0]["content"] + "\n\n" + prompt).lstrip()
        else:
            conv.insert(0, {"role": "system", "content": prompt})
    return conv, None


def prompt_chars(conv: list[dict[str, Any]], tools: list[dict[str, Any]] | None) -> int:
    """A cheap upper bound on the rendered text's length, to refuse a huge request before
    the template and the tokenizer run."""
    return sum(len(str(m.get("content", ""))) + len(json.dumps(m.get("tool_calls", [])))
               for m in conv) + (len(json.dumps(tools)) if tools else 0)


# ---- the constraint ----------------------------------------------------------------------
def _lark_literal(text: str) -> str:
    return json.dumps(text)


def _embedded_schema(schema: dict[str, Any] | None) -> str:
    text = json.dumps({**(schema or _NO_PARAMETERS), "x-guidance": _JSON_STYLE})
    # GuidedDecoding reads a grammar holding "::=" as GBNF; outside JSON strings there is
    # no "::", so escaping the colon keeps the same schema and the grammar Lark
    return text.replace("::=", "\\u003a:=")


def tool_grammar(tools: list[ChatTool], parallel: bool) -> GuidedDecoding:
    """Lark for Hermes tool calls: `<tool_call>\\n{"name": NAME, "arguments": ARGS}\\n
    </tool_call>`, NAME one of `tools` and ARGS valid under its parameters schema
    (llguidance's %json), several separated by newlines when `parallel`."""
    rules = []
    for i, t in enumerate(tools):
        head = _lark_literal(f'{{"name": {json.dumps(t.function.name)}, "arguments": ')
        rules.append(f"call_{i}: {head} %json {_embedded_schema(t.function.parameters)} "
                     '"}"')
    calls = " | ".join(f"call_{i}" for i in range(len(tools)))
    start = 'start: tool_call ("\\n" tool_call)*' if parallel else "start: tool_call"
    lark = "\n".join(["%llguidance {}", start,
                      f'tool_call: "<tool_call>\\n" ({calls}) "\\n</tool_call>"', *rules])
    return GuidedDecoding(grammar=lark)


@dataclass
class ToolSetup:
    """What tool calling changes about one request's generation and answer."""

    parser: type[ToolParser] | None = None  # None: the output is plain content
    guided: GuidedDecoding | None = None  # the forced choices' constraint
    stop: str | None = None  # auto without parallel calls: stop after the first

    def apply(self, params: SamplingParams) -> SamplingParams:
        if self.guided is not None:
            params = replace(params, guided_decoding=self.guided)
        if self.stop is not None:
            params = replace(params, stop=[*params.stop, self.stop])
        return params

    def stops(self) -> list[str]:
        return [self.stop] if self.stop else []

    def answer(self, c: CompletionOutput) -> dict[str, Any]:
        """A whole choice's message, finish_reason and stop_reason."""
        if self.parser is None:
            return {"message": {"role": "assistant", "content": c.text},
                    "finish_reason": c.finish_reason, "stop_reason": c.stop_reason}
        parsed = self.parser().parse(c.text)
        msg: dict[str, Any] = {"role": "assistant", "content": parsed.content}
        if parsed.tool_calls:
            msg["tool_calls"] = [t.to_openai() for t in parsed.tool_calls]
        return {"message": msg, "finish_reason": finish_reason(c.finish_reason,
                                                               bool(parsed.tool_calls)),
                "stop_reason": self._stop_reason(c.stop_reason)}

    def _stop_reason(self, reason: Any) -> Any:
        return None if self.stop is not None and reason == self.stop else reason

    def stream(self) -> StreamedChoice:
        return StreamedChoice(self.parser)


def tool_setup(req: ChatCompletionRequest, parser: type[ToolParser]) -> ToolSetup:
    """The request's setup; `parser` is the server's for "auto" (forced choices produce
    Hermes blocks, so they are read with the Hermes parser)."""
    if not tools_active(req):
        return ToolSetup()
    if not _forced(req):
        return ToolSetup(parser, stop=None if req.parallel_tool_calls else
                         (_CLOSE if parser is HermesToolParser else None))
    tools = list(req.tools or [])
    parallel = req.parallel_tool_calls
    if req.tool_choice != "required":  # a named function is called once, as OpenAI does
        name = req.tool_choice.function.name  # type: ignore[union-attr]
        tools = [t for t in tools if t.function.name == name]
        parallel = False
    try:
        guided = tool_grammar(tools, parallel)
    except ValueError as e:
        raise bad_request(f"tools: {e}", "tools") from None
    return ToolSetup(HermesToolParser, guided=guided)


# ---- the answer --------------------------------------------------------------------------
def finish_reason(reason: str | None, calls: bool) -> str | None:
    """OpenAI's: "tool_calls" when the model ended its turn with calls."""
    return "tool_calls" if calls and reason == "stop" else reason


class StreamedChoice:
    """One choice's stream: each text delta -> the delta dicts to send (plain content
    without a parser; content and whole tool calls through one)."""

    def __init__(self, parser: type[ToolParser] | None):
        self.parser = parser() if parser is not None else None
        self.calls = 0

    def _deltas(self, content: str, calls: list[ToolCall]) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = [{"content": content}] if content else []
        for c in calls:
            out.append({"tool_calls": [c.to_openai(self.calls)]})
            self.calls += 1
        return out

    def feed(self, text: str, done: bool) -> list[dict[str, Any]]:
        if self.parser is None:
            return [{"content": text}] if text else []
        out = self._deltas(*self.parser.feed(text)) if text else []
        if done:
            out += self._deltas(*self.parser.finish())
        return out

    def finish_reason(self, reason: str | None) -> str | None:
        return finish_reason(reason, self.calls > 0)
