"""A request's output constraint, in the forms users send it (vLLM's guided_* fields and
OpenAI's response_format), turned into one llguidance grammar."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, fields
from functools import lru_cache
from typing import Any


@dataclass(frozen=True)
class GuidedDecoding:
    """Exactly one of: `json` (a JSON schema, as a dict or its text), `json_object` (any
    JSON object), `regex`, `choice` (one of these strings), `grammar` (Lark, or GBNF when
    it uses `::=`)."""

    json: dict | str | None = None
    json_object: bool = False
    regex: str | None = None
    choice: tuple[str, ...] | None = None
    grammar: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.choice, list):
            object.__setattr__(self, "choice", tuple(self.choice))
        given = [f.name for f in fields(self) if getattr(self, f.name) not in (None, False)]
        if len(given) != 1:
            raise ValueError("guided_decoding takes exactly one of json, json_object, regex, "
                             f"choice, grammar; got {given or 'none'}")
        if self.choice is not None and (not self.choice or not all(
                isinstance(c, str) and c for c in self.choice)):
            raise ValueError("guided_decoding choice must be a non-empty list of non-empty "
                             "strings")
        for name in ("regex", "grammar"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, str) or not v.strip()):
                raise ValueError(f"guided_decoding {name} must be a non-empty string")
        if self.json is not None and not isinstance(self.json, (dict, str)):
            raise ValueError("guided_decoding json must be a JSON schema (a dict or its text)")
        self.grammar_text()  # compiles (cached): a bad schema or grammar fails here

    @classmethod
    def from_value(cls, value: GuidedDecoding | dict | None) -> GuidedDecoding | None:
        if value is None or isinstance(value, GuidedDecoding):
            return value
        if not isinstance(value, dict):
            raise ValueError("guided_decoding must be a GuidedDecoding or a dict of its fields")
        unknown = set(value) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"guided_decoding has no field(s) {sorted(unknown)}")
        return cls(**value)

    def grammar_text(self) -> str:
        """The constraint as an llguidance grammar (validated)."""
        if self.json is not None:
            # key order kept: the schema's property order is the order generated
            text = self.json if isinstance(self.json, str) else json.dumps(self.json)
            return _compile("json", text)
        if self.json_object:
            return _compile("json", '{"type": "object"}')
        if self.regex is not None:
            return _compile("regex", self.regex)
        if self.choice is not None:
            return _compile("regex", "|".join(re.escape(c) for c in self.choice))
        return _compile("gbnf" if "::=" in str(self.grammar) else "lark", str(self.grammar))


@lru_cache(maxsize=256)
def _compile(kind: str, text: str) -> str:
    """The grammar for (kind, text), checked once: schemas repeat across requests."""
    import llguidance

    try:
        if kind == "json":
            json.loads(text)
            grammar = llguidance.LLMatcher.grammar_from_json_schema(
                text, defaults={"whitespace_flexible": False})
        elif kind == "regex":
            grammar = llguidance.grammar_from("regex", text)
        elif kind == "gbnf":
            from llguidance.gbnf_to_lark import gbnf_to_lark

            grammar = llguidance.grammar_from("lark", gbnf_to_lark(text))
        else:
            grammar = llguidance.grammar_from("lark", text)
        error = llguidance.LLMatcher.validate_grammar(grammar)  # "" when valid
    except Exception as e:  # the engine's parse errors, GbnfToLarkError, JSON errors
        raise ValueError(f"guided_decoding {kind}: {e}") from None
    if error:
        raise ValueError(f"guided_decoding {kind}: {error}")
    return grammar


def from_request(fields_: dict[str, Any]) -> GuidedDecoding | None:
    """The constraint of an API request: vLLM's guided_json / guided_regex / guided_choice /
    guided_grammar, or OpenAI's response_format (json_object; json_schema with its
    schema). None when the request has none."""
    given = {k: v for k, v in fields_.items() if v is not None}
    rf = given.pop("response_format", None)
    if rf is not None:
        if not isinstance(rf, dict) or rf.get("type") not in ("text", "json_object",
                                                               "json_schema"):
            raise ValueError("response_format type must be text, json_object or json_schema")
        if rf["type"] == "json_object":
            given["json_object"] = True
        elif rf["type"] == "json_schema":
            spec = rf.get("json_schema")
            if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
                raise ValueError("response_format json_schema needs {'name': ..., "
                                 "'schema': {...}}")
            given["json"] = spec.get("schema") or {"type": "object"}
    names = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice",
             "guided_grammar": "grammar"}
    spec = {names.get(k, k): v for k, v in given.items()}
    return GuidedDecoding(**spec) if spec else None
