"""Structured output through the Python API: the output always matches its constraint,
constrained and free requests share batches, n > 1 and bad constraints."""

from __future__ import annotations

import json
import re

import pytest

from sparsa import LLM, SamplingParams
from sparsa.structured import GuidedDecoding
from tests.tiny_models import TINY_CONFIGS, build_tiny_checkpoint

pytest.importorskip("llguidance")


def _byte_tokenizer(out_dir) -> int:
    """One token per byte (GPT-2's byte-level alphabet, no merges) plus BOS/EOS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {t: i for i, t in enumerate(["<s>", "</s>", *alphabet])}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<s>", "</s>"])
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>",
                            eos_token="</s>").save_pretrained(out_dir)
    return len(vocab)


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    """A random tiny model with a one-byte-per-token tokenizer: unconstrained, its output
    is noise, so every well-formed output below is the constraint's doing."""
    out = tmp_path_factory.mktemp("tiny")
    vocab = _byte_tokenizer(out)
    cfg = {**TINY_CONFIGS["llama"], "vocab_size": vocab, "bos_token_id": 0,
           "eos_token_id": 1, "max_position_embeddings": 512}
    build_tiny_checkpoint("llama", out, config=cfg, std=0.1)
    return LLM(str(out), dtype="float32", kv_cache_memory="16MiB")


SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 8}, "n": {"type": "integer"},
    "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3}},
    "required": ["name", "n", "tags"], "additionalProperties": False}


def test_json_schema_regex_and_choice_hold_in_one_batch(llm):
    import jsonschema

    params = [SamplingParams(temperature=1.0, seed=i, max_tokens=120,
                             guided_decoding=g) for i, g in enumerate([
                                 {"json": SCHEMA}, {"regex": r"[0-9]{3}-[a-z]{2}"},
                                 {"choice": ["red", "green", "blue"]}, {"json_object": True},
                                 None])]
    outs = llm.generate(["x"] * len(params), params)
    texts = [o.outputs[0].text for o in outs]
    jsonschema.validate(json.loads(texts[0]), SCHEMA)
    assert re.fullmatch(r"[0-9]{3}-[a-z]{2}", texts[1])
    assert texts[2] in ("red", "green", "blue")
    assert all(o.outputs[0].finish_reason == "stop" for o in outs[:3])
    # any JSON object: a random model may write one string until max_tokens; a finished
    # one parses, a cut one is the start of an object
    if outs[3].outputs[0].finish_reason == "stop":
        assert isinstance(json.loads(texts[3]), dict)
    else:
        assert texts[3].startswith("{")


def test_n_samples_each_follow_the_grammar(llm):
    out = llm.generate(["q"], SamplingParams(n=4, temperature=1.0, seed=3, max_tokens=20,
                                             guided_decoding={"choice": ["yes", "no"]}))
    assert len(out[0].outputs) == 4
    assert all(o.text in ("yes", "no") for o in out[0].outputs)


def test_lark_and_gbnf_grammars(llm):
    lark = GuidedDecoding(grammar='start: "(" NUM ("," NUM)* ")"\nNUM: /[0-9]/')
    gbnf = GuidedDecoding(grammar='root ::= "ab" [0-9]')
    for g, pattern in ((lark, r"\([0-9](,[0-9])*\)"), (gbnf, r"ab[0-9]")):
        text = llm.generate(["z"], SamplingParams(temperature=1.0, seed=1, max_tokens=30,
                                                  guided_decoding=g))[0].outputs[0].text
        assert re.fullmatch(pattern, text), text


@pytest.mark.parametrize("bad,match", [
    ({"json": {"type": "object"}, "regex": "a"}, "exactly one"),
    ({"regex": "("}, "regex"),
    ({"json": "{not json"}, "json"),
    ({"choice": []}, "choice"),
    ({"grammar": "start: undefined_rule"}, "lark"),
    ({"schema": {}}, "no field"),
])
def test_bad_constraints_are_clear_errors(bad, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(guided_decoding=bad)


def test_a_model_without_tokenizer_refuses_constraints():
    from sparsa.structured import Guides

    with pytest.raises(ValueError, match="needs the model's tokenizer"):
        Guides(None, 10).add(0, GuidedDecoding(regex="a+"))


def test_a_refused_request_leaves_nothing_behind(llm):
    class Broken:
        def grammar_text(self):
            raise ValueError("guided_decoding: broken")

    params = SamplingParams(max_tokens=4)
    params.guided_decoding = Broken()
    with pytest.raises(ValueError, match="broken"):
        llm.generate(["x"], params)
    assert not llm.engine.guides.matchers and not llm.engine.has_unfinished_requests()
