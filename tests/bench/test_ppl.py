"""Perplexity evaluation: reproduces the reference figures of the shared real models."""

from __future__ import annotations

import math

import pytest

from sparsa import LLM
from sparsa.bench.ppl import evaluate_perplexity, parse_slice, read_documents
from sparsa.config import ModelConfig
from sparsa.tokenizer import shared_dir

CORPUS = shared_dir() / "corpora" / "tinystories_val.txt"
STORIES = shared_dir() / "models" / "stories260K" / "stories260K.bin"
needs_shared = pytest.mark.skipif(
    not (CORPUS.exists() and STORIES.exists()),
    reason=f"{STORIES} / {CORPUS} not found (set SPARSA_SHARED to the shared/ dir)")


def test_parse_slice():
    assert parse_slice("0.9:1") == (0.9, 1.0)
    assert parse_slice(":0.5") == (0.0, 0.5)
    for bad in ("1:0.5", "x", "0:2", "0.5"):
        with pytest.raises(ValueError):
            parse_slice(bad)


def test_read_documents_blocks_and_stream(tmp_path):
    p = tmp_path / "t.txt"
    p.write_text("a b\n\n\nc d\n\n e \n\nf\n")
    assert read_documents(p, "0:1") == ["a b", "c d", "e", "f"]
    assert read_documents(p, "0.5:1") == ["e", "f"]
    assert read_documents(p, "0:1", mode="stream") == [p.read_text()]
    with pytest.raises(FileNotFoundError):
        read_documents(tmp_path / "missing.txt")
    with pytest.raises(ValueError):
        read_documents(p, mode="lines")


def test_quantization_option_is_validated():
    with pytest.raises(ValueError, match="quantization method"):
        ModelConfig("x", quantization="int3")
    with pytest.raises(ValueError, match="group_size"):
        ModelConfig("x", quantization="int4", quantization_group_size=48)


@needs_shared
def test_stories260k_heldout_perplexity_matches_reference():
    # ../shared/models/tinymoe-stories/README.md: stories260K scores 6.093 on the last 10% of
    # blocks (40,565 predicted tokens), each block scored on its own after BOS.
    llm = LLM(str(STORIES), dtype="float32")
    r = evaluate_perplexity(llm, read_documents(CORPUS, "0.9:1"))
    assert r.tokens == 40565
    assert r.perplexity == pytest.approx(6.093, abs=0.001)


@needs_shared
@pytest.mark.parametrize("method, max_rel_increase", [("int8", 0.01), ("int4", 0.25)])
def test_quantized_perplexity_stays_close(method, max_rel_increase):
    docs = read_documents(CORPUS, "0.9:1")[:60]
    base = evaluate_perplexity(LLM(str(STORIES), dtype="float32"), docs)
    q = evaluate_perplexity(LLM(str(STORIES), dtype="float32", quantization=method,
                                quantization_group_size=32), docs)
    assert q.tokens == base.tokens
    assert math.isfinite(q.perplexity)
    assert q.weight_bytes < base.weight_bytes
    assert q.perplexity <= base.perplexity * (1 + max_rel_increase)
