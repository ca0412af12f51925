"""The request-level cascade: threshold 0 keeps every small answer, 1 sends every request
to the large model, in between the least confident ones escalate; the bench reports it."""

from __future__ import annotations

import pytest

from sparsa import LLM, SamplingParams
from sparsa.bench.cascade import main as bench_main
from sparsa.spec.cascade import Cascade
from tests.server.conftest import build_tiny_chat_model
from tests.spec.test_speculative_engine import _prompts
from tests.tiny_models import TINY_CONFIGS, build_tiny_checkpoint


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    d = tmp_path_factory.mktemp("pair")
    _, small = build_tiny_checkpoint("llama", d / "s", config=dict(TINY_CONFIGS["llama"],
                                                                    num_hidden_layers=1))
    _, large = build_tiny_checkpoint("mixtral", d / "l")
    return LLM(str(small), dtype="float32"), LLM(str(large), dtype="float32")


def _ids(outs):
    return [o.outputs[0].token_ids for o in outs]


def test_thresholds_choose_who_answers(pair):
    small, large = pair
    prompts = _prompts(8)
    p = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    alone_small, alone_large = _ids(small.generate(prompts, p)), _ids(large.generate(prompts, p))
    none = Cascade(small, large, 0.0).generate(prompts, p)
    assert not any(none.escalated) and _ids(none.outputs) == alone_small
    assert all(o.outputs[0].logprobs is None for o in none.outputs)  # not asked for
    every = Cascade(small, large, 1.0).generate(prompts, p)
    assert all(every.escalated) and _ids(every.outputs) == alone_large
    mid = sorted(none.confidences)[4]
    some = Cascade(small, large, mid).generate(prompts, p)
    assert sum(some.escalated) == 4
    for out, esc, a, b in zip(some.outputs, some.escalated, alone_small, alone_large):
        assert out.outputs[0].token_ids == (b if esc else a)


def test_bad_cascades(pair, tmp_path):
    small, large = pair
    with pytest.raises(ValueError, match="threshold must be in"):
        Cascade(small, large, 1.5)
    _, other = build_tiny_checkpoint("llama", tmp_path / "o",
                                     config=dict(TINY_CONFIGS["llama"], vocab_size=300))
    with pytest.raises(ValueError, match="vocabulary"):
        Cascade(LLM(str(other), dtype="float32"), large, 0.5)


def test_bench_cascade_reports_the_trade(tmp_path, capsys):
    small = build_tiny_chat_model(tmp_path / "s", "llama")
    large = build_tiny_chat_model(tmp_path / "l", "mixtral")
    assert bench_main(["--small", str(small), "--large", str(large), "--prompts", "4",
                       "--max-tokens", "8", "--thresholds", "0,1"]) == 0
    out = capsys.readouterr().out
    assert "large only" in out and "escalated" in out
    rows = [line.split() for line in out.splitlines() if line.strip().startswith(("0.00",
                                                                                 "1.00"))]
    assert rows[0][1] == "0.00" and rows[1][1] == "1.00"  # escalation at 0 and at 1
