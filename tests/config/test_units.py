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
