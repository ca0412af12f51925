"""Tool-call parsers: a model's raw output -> OpenAI `tool_calls` and the text around them,
whole or as it streams.

Each model family writes tool calls its own way, so a parser knows one format (vLLM splits
its tool parsers the same way). Hermes — `<tool_call>{"name": ..., "arguments": {...}}
</tool_call>` blocks, written by Hermes 2 Pro, Qwen 2.5/3, SmolLM3 and others — is the
default, and the format that constrained generation (`tool_choice` "required" or a named
function) produces. Another format is a ToolParser subclass added to TOOL_PARSERS, after
which `sparsa serve --tool-call-parser NAME` picks it.

A parser never raises on what the model wrote: a block that does not parse is returned
as content, verbatim.
"""

from __future__ import annotations

import json
import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str  # JSON text of an object, as OpenAI sends it
    id: str = field(default_factory=new_call_id)

    def to_openai(self, index: int | None = None) -> dict[str, Any]:
        """The call as OpenAI's message.tool_calls item (with `index`: a stream delta's)."""
        out: dict[str, Any] = {"index": index} if index is not None else {}
        out.update(id=self.id, type="function",
                   function={"name": self.name, "arguments": self.arguments})
        return out


@dataclass
class Parsed:
    """A whole output: content is None when the output was tool calls alone."""

    content: str | None
    tool_calls: list[ToolCall]


class ToolParser(ABC):
    """The parse of one output, fed its text as it comes. feed() and finish() return the
    content text that is now certain and the tool calls now complete; text that may still
    belong to a tool call is held until it is known."""

    name: ClassVar[str]

    @abstractmethod
    def feed(self, text: str) -> tuple[str, list[ToolCall]]:
        """Take the next piece of output text."""

    @abstractmethod
    def finish(self) -> tuple[str, list[ToolCall]]:
        """The output has ended: release everything still held."""

    def parse(self, text: str) -> Parsed:
        """A whole output at once (on a fresh parser), the same split as streaming gives."""
        c1, calls = self.feed(text)
        c2, more = self.finish()
        calls = calls + more
        content = c1 + c2
        return Parsed(None if calls and not content else content, calls)


def call_from_json(body: str) -> list[ToolCall] | None:
    """The calls in one block's JSON — an object {"name", "arguments"} (or "parameters"),
    or a list of them — or None when it is not that. Arguments given as JSON text (some
    models write them so) are read; a call without arguments gets {}."""
    try:
        value = json.loads(body)
    except ValueError:
        return None
    items = value if isinstance(value, list) and value else [value]
    calls = []
    for item in items:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str) \
                or not item["name"]:
            return None
        args = item.get("arguments", item.get("parameters", {}))
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except ValueError:
                return None
        if not isinstance(args, dict):
            return None
        calls.append(ToolCall(item["name"], json.dumps(args, ensure_ascii=False)))
    return calls


class HermesToolParser(ToolParser):
    """`<tool_call>\\n{json}\\n</tool_call>` blocks; the text outside them is content.

    Whitespace next to a block (the newlines between calls, or between a sentence and the
    call after it) belongs to the block's layout, not to the content, so it is dropped;
    to know that, trailing whitespace is held like a possible start of the tag. A final
    block that the model ended without its closing tag still counts when its JSON is
    whole."""

    name = "hermes"
    OPEN, CLOSE = "<tool_call>", "</tool_call>"

    def __init__(self) -> None:
        self._buf = ""  # text not yet released
        self._in_call = False
        self._after_call = False  # content right after a block drops its leading space
        self._gap = ""  # whitespace dropped before the open block, back if it is no call

    def _content(self, text: str) -> str:
        if self._after_call:
            text = text.lstrip()
            if text:
                self._after_call = False
        return text

    def _block(self, body: str, closed: bool) -> tuple[str, list[ToolCall]]:
        calls = call_from_json(body.strip())
        if calls is None:  # not a call after all: the model's text, as written
            return self._content(self._gap + self.OPEN + body
                                 + (self.CLOSE if closed else "")), []
        self._after_call = True
        return "", calls

    def feed(self, text: str) -> tuple[str, list[ToolCall]]:
        self._buf += text
        content, calls = "", []
        while True:
            if self._in_call:
                end = self._buf.find(self.CLOSE)
                if end < 0:
                    break
                c, found = self._block(self._buf[:end], closed=True)
                content += c
                calls += found
                self._buf = self._buf[end + len(self.CLOSE):]
                self._in_call = False
                continue
            start = self._buf.find(self.OPEN)
            if start >= 0:
                # the whitespace before a block is dropped with it
                before = self._buf[:start]
                kept = before.rstrip()
                content += self._content(kept)
                self._gap = before[len(kept):]
                self._buf = self._buf[start + len(self.OPEN):]
                self._in_call = True
                continue
            keep = _partial_suffix(self._buf, self.OPEN)
            head = self._buf[:len(self._buf) - keep]
            ready = head.rstrip()
            content += self._content(ready)
            self._buf = self._buf[len(ready):]
            break
        return content, calls

    def finish(self) -> tuple[str, list[ToolCall]]:
        buf, self._buf = self._buf, ""
        if self._in_call:
            self._in_call = False
            return self._block(buf, closed=False)
        return self._content(buf), []


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest end of `text` that is a proper start of `tag`."""
    for k in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:k]):
            return k
    return 0


TOOL_PARSERS: dict[str, type[ToolParser]] = {HermesToolParser.name: HermesToolParser}


def get_tool_parser(name: str) -> type[ToolParser]:
    try:
        return TOOL_PARSERS[name]
    except KeyError:
        raise ValueError(f"unknown tool call parser {name!r}; known: "
                         f"{', '.join(sorted(TOOL_PARSERS))}") from None
