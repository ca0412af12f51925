"""Sizes as users type them: a unit is required for a string (issue 19: `--kv-cache-memory 2`
was read as two bytes and cut every answer to a few tokens without a word)."""

from __future__ import annotations

import pytest

from sparsa.config.units import parse_size


@pytest.mark.parametrize("text,want", [("4GiB", 4 << 30), ("512MB", 512 * 10**6),
                                       ("1.5e3B", 1500), ("64 MiB", 64 << 20)])
def test_sizes_with_units(text, want):
    assert parse_size(text) == want


def test_a_number_without_unit_names_the_units():
    with pytest.raises(ValueError, match=r"'2' needs a unit: e\.g\. '2GiB'"):
        parse_size("2")
    assert parse_size(2) == 2  # a Python int is bytes


def test_garbage_is_a_clear_error():
    with pytest.raises(ValueError, match="cannot parse size 'lots'"):
        parse_size("lots")


def test_an_unknown_model_name_is_one_line_naming_the_builtins():
    from sparsa.models.builtin_configs import builtin_config

    with pytest.raises(ValueError, match=r"'nonexistent' is not a built-in model config "
                                         r"\(one of mixtral-mini"):
        builtin_config("nonexistent")


def test_a_kv_cache_too_small_for_an_asked_context_is_an_error():
    """An explicit max_model_len the KV budget cannot hold: an error saying how much is
    needed, not answers cut at a few tokens."""
    from sparsa import LLM

    with pytest.raises(ValueError, match=r"max_model_len is 512: one sequence needs "
                                         r"kv_cache_memory >= \d+MiB"):
        LLM("mixtral-mini", load_format="dummy", max_model_len=512, kv_cache_memory="64KiB",
            hf_overrides={"num_hidden_layers": 1})


def test_max_tokens_past_the_context_is_said(caplog):
    from sparsa import LLM, SamplingParams

    llm = LLM("mixtral-mini", load_format="dummy", max_model_len=64,
              hf_overrides={"num_hidden_layers": 1})
    with caplog.at_level("WARNING"):
        out = llm.generate([[1, 2, 3]], SamplingParams(max_tokens=100000, ignore_eos=True))
    assert "does not fit the context window of 64" in caplog.text
    assert len(out[0].outputs[0].token_ids) == 61
