"""`sparsa bench greedy`: Sparsa's and llama.cpp's greedy tokens on the same GGUF file."""

from __future__ import annotations

import pytest

from sparsa.bench.greedy import common_prefix


def test_common_prefix_counts_tokens_until_the_first_difference():
    assert common_prefix([1, 2, 3], [1, 2, 4, 5]) == 2
    assert common_prefix([], [1]) == 0
    assert common_prefix([7, 8], [7, 8]) == 2


def test_smollm2_file_form_matches_llamacpp_on_a_clear_prompt():
    """On a prompt without near ties the two engines agree token for token (where they part
    on other prompts is reported by the tool, not demanded)."""
    pytest.importorskip("llama_cpp")
    from sparsa.bench.greedy import compare
    from sparsa.tokenizer import shared_dir

    path = shared_dir() / "models" / "smollm2-135m-instruct" / \
        "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        pytest.skip(f"{path} not found (set SPARSA_SHARED)")
    (row,) = compare(path, ["The capital of France is"], 8, 2)
    assert row.same_prompt_tokens
    assert row.agree == 8, (row.sparsa, row.llamacpp)
