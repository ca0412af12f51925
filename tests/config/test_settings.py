"""One vocabulary for every setting: each config field is one keyword of `LLM(...)`, one
flag of every engine command and one `sparsa serve` option, and all three build the same
config."""

from __future__ import annotations

import argparse
from dataclasses import fields

import pytest

from sparsa.cli import build_parser
from sparsa.config import (
    SchedulerConfig,
    engine_config,
    settings,
)
from sparsa.config.settings import SECTIONS
from sparsa.server.cli import SERVE_DEFAULTS
from sparsa.server.cli import engine_config as serve_config

ENGINE_COMMANDS = ["generate", "serve", "trace", "info", "eval-ppl"]


def _subparser(command: str) -> argparse.ArgumentParser:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[command]


def test_every_config_field_is_a_setting():
    named = {(s.section, s.field) for s in settings()}
    for section, (cls, _, _) in SECTIONS.items():
        for f in fields(cls):
            if section == "model" and f.name in ("model", "offload"):
                continue  # the positional argument and the offload section
            if section == "engine" and f.name in SECTIONS:
                continue  # the sections themselves
            assert (section, f.name) in named, f"{cls.__name__}.{f.name} has no setting"
            assert f.metadata.get("help"), f"{cls.__name__}.{f.name} has no one-line doc"


@pytest.mark.parametrize("command", ENGINE_COMMANDS)
def test_every_setting_has_exactly_one_flag(command):
    actions = _subparser(command)._actions
    for s in settings():
        mine = [a for a in actions if a.dest == s.name]
        assert len(mine) == 1, f"{command}: {s.name} has {len(mine)} flags"
        assert s.flag in mine[0].option_strings
        others = [a for a in actions if a.dest != s.name and s.flag in a.option_strings]
        assert not others


def _argv(kwargs: dict) -> list[str]:
    from sparsa.config import engine_argv

    return engine_argv(kwargs)


CASES = [
    {"quantization": "none"},  # reached ModelConfig as "none" one way and None the other
    {"quantization": "int4", "quantization_group_size": 32, "int8_activations": "none",
     "bf16_prefill": False, "dtype": "float32", "max_model_len": 256, "seed": 3},
    {"expert_memory": "25%", "offload_policy": "lfu", "offload_on_miss": "low_precision",
     "offload_low_precision": "int8",
     "offload_io_threads": 3, "offload_capacity": "per_layer",
     "offload_prefetch_when_idle": True, "offload_direct_io": False},
    {"block_size": 32, "kv_cache_memory": "64MiB", "num_kv_blocks": 40,
     "enable_prefix_caching": False, "max_num_seqs": 8, "max_num_batched_tokens": 256,
     "enable_chunked_prefill": False, "scheduling_policy": "priority",
     "device": "cpu", "num_threads": 1, "native_decode": False,
     "trace_experts": "t.csv.gz", "hf_overrides": {"num_hidden_layers": 2}},
]


@pytest.mark.parametrize("kwargs", CASES)
def test_api_cli_and_server_build_equal_configs(kwargs):
    from sparsa.cli import engine_kwargs

    api = engine_config("m", **kwargs)
    args = build_parser().parse_args(["generate", "m", *_argv(kwargs)])
    cli = engine_config("m", **engine_kwargs(args))
    served = serve_config(build_parser().parse_args(["serve", "m", *_argv(kwargs)]))
    assert cli == api
    # the server's own defaults differ where SERVE_DEFAULTS says, and only there
    assert served == engine_config("m", **{**SERVE_DEFAULTS, **kwargs})


def test_quantization_none_is_one_value_everywhere():
    args = build_parser().parse_args(["serve", "m", "-q", "none"])
    assert serve_config(args).model.quantization == "none"
    assert engine_config("m", quantization="none").model.quantization == "none"


def test_sections_as_objects_or_dicts_and_keywords_over_them():
    a = engine_config("m", scheduler=SchedulerConfig(max_num_seqs=4), cache={"block_size": 8},
                      offload={"expert_memory": "10%", "policy": "arc"},
                      offload_policy="lfu")
    assert a.scheduler.max_num_seqs == 4 and a.cache.block_size == 8
    assert (a.model.offload.expert_memory, a.model.offload.policy) == ("10%", "lfu")
    b = engine_config("m", max_num_seqs=4, block_size=8, expert_memory="10%",
                      offload_policy="lfu")
    assert a == b


def test_unknown_keyword_names_the_closest():
    with pytest.raises(TypeError, match=r"'offload_polcy'.*'offload_policy'"):
        engine_config("m", offload_polcy="lfu")
    with pytest.raises(TypeError, match="cache= has no field"):
        engine_config("m", cache={"blok_size": 8})
    with pytest.raises(TypeError, match="OffloadConfig"):
        engine_config("m", offload=3)


def test_llm_takes_the_same_keywords(monkeypatch):
    import sparsa.llm as llm_mod

    seen = {}

    class FakeEngine:
        def __init__(self, config):
            seen["config"] = config

    monkeypatch.setattr(llm_mod, "LLMEngine", FakeEngine)
    llm_mod.LLM("m", **CASES[2])
    assert seen["config"] == engine_config("m", **CASES[2])
    with pytest.raises(TypeError, match="did you mean"):
        llm_mod.LLM("m", max_num_seq=3)


def test_values_are_validated_where_they_are_defined():
    with pytest.raises(ValueError, match="offload policy"):
        engine_config("m", expert_memory="25%", offload_policy="random")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["generate", "m", "--offload-policy", "random"])


def test_a_command_line_shorthand_stands_for_its_settings():
    from sparsa.cli import engine_kwargs

    args = build_parser().parse_args(["generate", "m", "--expert-memory", "25%",
                                      "--offload-on-miss", "int8"])
    assert engine_config("m", **engine_kwargs(args)) == engine_config(
        "m", expert_memory="25%", offload_on_miss="low_precision", offload_low_precision="int8")


def test_serve_options_are_one_flag_each_and_build_back():
    from sparsa.config.settings import dataclass_settings
    from sparsa.server.cli import serve_options
    from sparsa.server.settings import ServeOptions

    actions = _subparser("serve")._actions
    for s in dataclass_settings(ServeOptions):
        mine = [a for a in actions if a.dest == s.name]
        assert len(mine) == 1 and s.flag in mine[0].option_strings, s.name
    args = build_parser().parse_args(["serve", "m", "--port", "9000", "--max-waiting", "7",
                                      "--request-timeout", "0", "--log-level", "debug"])
    opts = serve_options(args)
    assert (opts.port, opts.max_waiting, opts.request_timeout, opts.log_level) == \
        (9000, 7, 0.0, "debug")
    assert opts.body_timeout == ServeOptions().body_timeout  # unset: the field's default
    with pytest.raises(ValueError, match="max_waiting"):
        serve_options(build_parser().parse_args(["serve", "m", "--max-waiting", "0"]))


@pytest.mark.parametrize("command", ENGINE_COMMANDS)
def test_the_model_as_positional_or_flag(command):
    from sparsa.config.settings import model_from_args

    required = {"trace": ["--out", "t.csv"], "eval-ppl": ["--text", "t.txt"]}.get(command, [])

    def parse(*argv: str) -> argparse.Namespace:
        return build_parser().parse_args([command, *argv, *required])

    for argv in (["m"], ["--model", "m"], ["m", "--model", "m"]):
        args = parse(*argv)
        model_from_args(args)
        assert args.model == "m"
    with pytest.raises(ValueError, match="two models"):
        model_from_args(parse("a", "--model", "b"))
    with pytest.raises(ValueError, match="no model given"):
        model_from_args(parse())
