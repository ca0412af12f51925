"""What makes a config field a setting: a one-line doc, and its name where that differs."""

from __future__ import annotations

from dataclasses import field
from typing import Any


def setting(default: Any = None, doc: str = "", **meta: Any) -> Any:
    """A config field that is also a setting (keyword, flag, server option).

    `doc` is its one-line help. Optional metadata: `name`, the keyword and flag when it is
    not the section's prefix + the field name; `aliases`, extra option strings the command
    line keeps; `cli=False` for a field set only through the API (documented why)."""
    meta = {"help": doc, **meta}
    if isinstance(default, (dict, list)):
        empty = type(default)
        return field(default_factory=lambda: empty(default), metadata=meta)
    return field(default=default, metadata=meta)


def check_choice(name: str, value: Any, choices: tuple) -> None:
    """Raise ValueError naming `name` unless `value` is one of `choices`."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(str, choices))}; got {value!r}")


def from_json_dict(cls: Any, d: Any, name: str, known: set[str] | None = None,
                   **extra: Any) -> Any:
    """`cls(**d, **extra)` for a setting given as a dict (a JSON object on the command
    line): anything else, or a key outside `known` (default: cls's fields), is a ValueError
    naming the setting `name`."""
    from dataclasses import fields

    if not isinstance(d, dict):
        raise ValueError(f"{name} must be a dict (JSON object)")
    known = {f.name for f in fields(cls)} if known is None else known
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"{name} has unknown key(s) {unknown} (known: "
                         f"{', '.join(sorted(known))})")
    return cls(**d, **extra)
