"""Every setting from one source: the config dataclasses' fields.

A setting's name is its keyword in `LLM(...)`, its flag on every command (`--` + the name
with dashes) and its `sparsa serve` option: the field name, prefixed by its section
(`offload_`) or renamed where the field metadata says so. `engine_config()` routes keywords
to their configs; `add_engine_arguments()` makes the flags; `engine_kwargs()` reads them
back. Adding a field to a config adds its keyword and flag everywhere."""

from __future__ import annotations

import argparse
import difflib
import json
import types
import typing
from dataclasses import MISSING, dataclass, fields, replace
from functools import cache
from typing import Any, Literal, get_args, get_origin

from sparsa.config.engine import (
    BF16_PREFILL_CHOICES,
    CacheConfig,
    DeviceConfig,
    EngineConfig,
    ModelConfig,
    SchedulerConfig,
)
from sparsa.config.offload import OffloadConfig

# section -> (config class, keyword prefix, argparse group title)
SECTIONS: dict[str, tuple[type, str, str]] = {
    "model": (ModelConfig, "", "model and weight form"),
    "offload": (OffloadConfig, "offload_", "expert offloading (MoE models)"),
    "cache": (CacheConfig, "", "KV cache"),
    "scheduler": (SchedulerConfig, "", "scheduler"),
    "device": (DeviceConfig, "", "device"),
    "engine": (EngineConfig, "", "engine"),
}


# keywords that take a whole section (a config object or a dict of its fields); "device"
# and "model" name a setting and the model, so those sections go by their *_config name
SECTION_KEYWORDS = {"offload": "offload", "offload_config": "offload", "cache": "cache",
                    "cache_config": "cache", "scheduler": "scheduler",
                    "scheduler_config": "scheduler", "device_config": "device",
                    "model_config": "model"}


@dataclass(frozen=True)
class Setting:
    """One setting: a config field under the name its keyword and flag use."""

    name: str  # keyword == flag (dashes) == server option
    section: str
    field: str
    type: Any
    default: Any
    help: str
    aliases: tuple[str, ...] = ()
    # command-line values that stand for several settings ({"int8": {setting: value}})
    shorthands: dict[str, dict[str, Any]] | None = None

    @property
    def flag(self) -> str:
        """The command-line flag: `--` and the name with dashes."""
        return "--" + self.name.replace("_", "-")


def dataclass_settings(cls: type, section: str = "", prefix: str = "") -> list[Setting]:
    """The settings of one config dataclass: its fields that carry a doc."""
    out = []
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        if "help" not in f.metadata:  # a sub-config or the positional model
            continue
        default = f.default if f.default is not MISSING else f.default_factory()  # type: ignore[misc]
        out.append(Setting(f.metadata.get("name", prefix + f.name), section or cls.__name__,
                           f.name, hints[f.name], default, f.metadata["help"],
                           tuple(f.metadata.get("aliases", ())), f.metadata.get("shorthands")))
    return out


@cache
def settings() -> tuple[Setting, ...]:
    """All settings, in section order."""
    out = []
    for section, (cls, prefix, _) in SECTIONS.items():
        out += dataclass_settings(cls, section, prefix)
    names = [s.name for s in out]
    dup = {n for n in names if names.count(n) > 1}
    assert not dup, f"settings with the same name: {dup}"
    return tuple(out)


def _by_name() -> dict[str, Setting]:
    return {s.name: s for s in settings()}


def engine_config(model: str, **kwargs: Any) -> EngineConfig:
    """An EngineConfig from settings by name (`dtype="bfloat16"`, `offload_policy="lfu"`),
    and/or whole sections as config objects or dicts of their fields (`offload=
    OffloadConfig(...)`, `cache={"block_size": 32}`, `device_config=DeviceConfig(...)`;
    SECTION_KEYWORDS), keywords overriding sections."""
    by_name = _by_name()
    base: dict[str, Any] = {}
    per: dict[str, dict[str, Any]] = {s: {} for s in SECTIONS}
    for key, value in kwargs.items():
        if key in SECTION_KEYWORDS:
            section = SECTION_KEYWORDS[key]
            cls = SECTIONS[section][0]
            if isinstance(value, dict):
                base[section] = value
            elif isinstance(value, cls):
                base[section] = {f.name: getattr(value, f.name) for f in fields(cls)}
            else:
                raise TypeError(f"{key}= takes a {cls.__name__} or a dict of its fields; got "
                                f"{type(value).__name__}")
            continue
        s = by_name.get(key)
        if s is None:
            close = difflib.get_close_matches(key, list(by_name) + list(SECTION_KEYWORDS), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise TypeError(f"unknown setting {key!r}{hint} (every setting: "
                            "sparsa.config.settings())")
        per[s.section][s.field] = value
    for section, values in base.items():
        unknown = set(values) - {f.name for f in fields(SECTIONS[section][0])}
        if unknown:
            raise TypeError(f"{section}= has no field(s) {sorted(unknown)}")
    model_kw = {**base.get("model", {}), **per["model"]}
    model_kw.pop("model", None)
    offload_base = base.get("offload")
    inner = model_kw.pop("offload", None)  # model={"offload": ...} works too
    if offload_base is None and inner is not None:
        offload_base = inner if isinstance(inner, dict) else \
            {f.name: getattr(inner, f.name) for f in fields(OffloadConfig)}
    built = {section: SECTIONS[section][0](**{**base.get(section, {}), **per[section]})
             for section in ("cache", "scheduler", "device")}
    offload = OffloadConfig(**{**(offload_base or {}), **per["offload"]})
    return EngineConfig(model=ModelConfig(model, offload=offload, **model_kw),
                        cache=built["cache"], scheduler=built["scheduler"],
                        device=built["device"], **per["engine"])


def with_settings(config: EngineConfig, **kwargs: Any) -> EngineConfig:
    """A copy of `config` with some settings changed (validated again)."""
    by_name = _by_name()
    out = config
    for key, value in kwargs.items():
        s = by_name[key]
        if s.section == "engine":
            out = replace(out, **{s.field: value})
        elif s.section == "offload":
            off = replace(out.model.offload, **{s.field: value})
            out = replace(out, model=replace(out.model, offload=off))
        else:
            sub = getattr(out, s.section)
            out = replace(out, **{s.section: replace(sub, **{s.field: value})})
    return out


# ---- the command line ----------------------------------------------------------------
def _optional(tp: Any) -> tuple[Any, bool]:
    """(the type without None, whether None was allowed)."""
    if get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) < len(get_args(tp)):
            return (args[0] if len(args) == 1 else typing.Union[tuple(args)]), True  # noqa: UP007
    return tp, False


def _json_dict(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not JSON: {e}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("expected a JSON object")
    return value


def _show(value: Any) -> str:
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value) if not isinstance(value, dict) else json.dumps(value)


def _argument(group: Any, s: Setting, default: Any) -> None:
    inner, optional = _optional(s.type)
    names = [s.flag, *s.aliases]
    text = f"{s.help} (default: {_show(default)})".replace("%", "%%")  # argparse formats it
    kw: dict[str, Any] = dict(dest=s.name, default=None, help=text)
    if inner is bool and not optional:
        kw["action"] = argparse.BooleanOptionalAction
        group.add_argument(*[n for n in names if n.startswith("--")], **kw)
        return
    if inner is bool:  # bool or auto
        kw.update(choices=list(BF16_PREFILL_CHOICES), metavar="{auto,on,off}")
    elif get_origin(inner) is Literal:
        kw["choices"] = [str(c) for c in get_args(inner)] + list(s.shorthands or ())
    elif inner is int:
        kw["type"] = int
        kw["metavar"] = "N"
    elif inner is float:
        kw["type"] = float
        kw["metavar"] = "X"
    elif get_origin(inner) is dict:
        kw["type"] = _json_dict
        kw["metavar"] = "JSON"
    else:  # str, or a size given as text
        kw["metavar"] = "SIZE" if "memory" in s.name else "VALUE"
    group.add_argument(*names, **kw)


def add_engine_arguments(parser: argparse.ArgumentParser, defaults: dict[str, Any] | None = None,
                         exclude: tuple[str, ...] = ()) -> None:
    """One flag per setting, in a group per section. Flags not given read None, so only
    what was given reaches the configs (their defaults stay the one source); `defaults`
    changes what a command shows and uses as default (serve: prefix caching on)."""
    defaults = defaults or {}
    groups: dict[str, Any] = {}
    for s in settings():
        if s.name in exclude:
            continue
        if s.section not in groups:
            groups[s.section] = parser.add_argument_group(SECTIONS[s.section][2])
        _argument(groups[s.section], s, defaults.get(s.name, s.default))
    parser.set_defaults(_engine_defaults=dict(defaults), _engine_excluded=tuple(exclude))


MODEL_HELP = "HF model directory, hub id, llama2.c .bin file, or built-in config name"


def add_model_argument(parser: argparse.ArgumentParser, help: str = MODEL_HELP) -> None:
    """The model as the positional MODEL or as `--model M` (vLLM's habit); read it back
    with `model_from_args`."""
    parser.add_argument("model", metavar="MODEL", nargs="?", default=None, help=help)
    parser.add_argument("--model", dest="model_flag", metavar="M", default=None,
                        help="the model, instead of the positional MODEL")


def model_from_args(args: argparse.Namespace) -> None:
    """Settle args.model from MODEL or --model; ValueError when neither or both differ."""
    flag = getattr(args, "model_flag", None)
    if flag is not None:
        if args.model is not None and args.model != flag:
            raise ValueError(f"two models given: {args.model!r} and --model {flag!r}")
        args.model = flag
    if args.model is None:
        raise ValueError("no model given: pass MODEL or --model M")


def _from_cli(s: Setting, value: Any) -> Any:
    """A flag's value as its field takes it ("auto"/"on"/"off" of a bool-or-unset field)."""
    inner, optional = _optional(s.type)
    if inner is bool and optional and isinstance(value, str):
        return BF16_PREFILL_CHOICES[value]
    return value


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls: type, title: str) -> None:
    """One flag per documented field of `cls` (a command's own options, made as the
    engine's are); `dataclass_from_args` builds `cls` back from them."""
    group = parser.add_argument_group(title)
    for s in dataclass_settings(cls):
        _argument(group, s, s.default)


def dataclass_from_args(cls: type, args: argparse.Namespace) -> Any:
    """`cls` from the flags `add_dataclass_arguments` made (unset flags: its defaults)."""
    values = {}
    for s in dataclass_settings(cls):
        value = getattr(args, s.name, None)
        if value is not None:
            values[s.field] = _from_cli(s, value)
    return cls(**values)


def engine_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The settings given on the command line (plus the command's own defaults)."""
    out = dict(getattr(args, "_engine_defaults", {}))
    excluded = getattr(args, "_engine_excluded", ())
    for s in settings():
        if s.name in excluded:  # the command's own flag of that name, not the setting
            continue
        value = getattr(args, s.name, None)
        if value is None:
            continue
        value = _from_cli(s, value)
        if s.shorthands and value in s.shorthands:
            out.update(s.shorthands[value])
            continue
        out[s.name] = value
    return out


def engine_argv(kwargs: dict[str, Any]) -> list[str]:
    """The command-line flags that give an engine command these settings (for tools that
    start `sparsa serve` or another engine command as a child process)."""
    by_name = _by_name()
    argv: list[str] = []
    for key, value in kwargs.items():
        s = by_name[key]
        inner, optional = _optional(s.type)
        if value is None:
            continue
        if inner is bool and not optional:
            argv.append(s.flag if value else "--no-" + s.flag[2:])
        elif inner is bool:
            argv += [s.flag, {True: "on", False: "off"}[value]]
        elif isinstance(value, dict):
            argv += [s.flag, json.dumps(value)]
        else:
            argv += [s.flag, str(value)]
    return argv


def resolve_engine_args(args: argparse.Namespace) -> argparse.Namespace:
    """Set every setting's attribute of `args` to its effective value (given, the
    command's default, else the config's): for tools that read `args.quantization` etc.
    and hand the same values to peers. Returns `args`."""
    given = engine_kwargs(args)
    excluded = getattr(args, "_engine_excluded", ())
    for s in settings():
        if s.name not in excluded:
            setattr(args, s.name, given.get(s.name, s.default))
    return args


def config_from_args(model: str, args: argparse.Namespace, **overrides: Any) -> EngineConfig:
    """The EngineConfig of parsed command-line flags (and a command's own overrides)."""
    return engine_config(model, **{**engine_kwargs(args), **overrides})
