"""Adaptive speculation picks k from measured acceptance and step cost, and stays
lossless while it changes its mind."""

from __future__ import annotations

from sparsa import LLM, SamplingParams
from sparsa.spec.dynamic import SpecController
from tests.spec.test_speculative_engine import _prompts
from tests.tiny_models import build_tiny_checkpoint


def _controller(costs: dict[int, float], max_k: int = 4) -> SpecController:
    c = SpecController(max_k)
    for rows, t in costs.items():
        c.observe_step(rows, t)
    return c


def _accepting(c: SpecController, sid: int, rate: float, rounds: int = 60) -> None:
    for i in range(rounds):  # 4 proposals a round; accepted in a run while i % 10 < rate*10
        m = 4 if (i % 10) < rate * 10 else 0
        c.observe_verify(sid, 4, m)


def test_cheap_rows_and_good_proposals_take_the_most():
    c = _controller({1: 1.0, 2: 1.02, 3: 1.04, 4: 1.06, 5: 1.08})
    _accepting(c, 7, 0.9)
    assert c.choose_k(7, rows=1, limit=4) == 4
    assert c.choose_k(7, rows=1, limit=2) == 2  # never past what fits


def test_costly_rows_or_bad_proposals_take_fewer_or_none():
    flat = {1: 1.0, 2: 1.1, 3: 1.2, 4: 1.5, 5: 1.8}
    c = _controller(flat)
    _accepting(c, 1, 0.7)
    k = c.choose_k(1, rows=1, limit=4)
    assert 1 <= k < 4  # (int8 SmolLM2's measured cost curve picks 2 here)
    bad = _controller(flat)
    for _ in range(30):
        bad.observe_verify(2, 4, 0)
    picks = [bad.choose_k(2, rows=1, limit=4) for _ in range(16)]
    assert picks.count(0) == 14 and picks.count(1) == 2  # off, with a probe every 8 steps


def test_unmeasured_rows_are_priced_from_the_nearest():
    c = _controller({1: 2.0})
    assert c._time(3) == 2.0 * 1.4 / 1.0
    c.forget(set())
    assert c.acceptance(5) == 0.5  # the prior


def test_adaptive_engine_is_lossless(tmp_path):
    _, path = build_tiny_checkpoint("llama", tmp_path / "m")
    p = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    prompts = _prompts(6)
    want = [o.outputs[0].token_ids for o in LLM(str(path), dtype="float32",
                                               num_kv_blocks=128).generate(prompts, p)]
    llm = LLM(str(path), dtype="float32", num_kv_blocks=128, speculative_config={
        "method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 1})
    got = [llm.generate([q], p)[0].outputs[0].token_ids for q in prompts]
    assert got == want
    assert llm.engine.speculation.control.seconds  # step costs were measured


def test_a_compute_bound_batch_turns_speculation_off():
    """Eight rows whose step time grows with every row: a proposal that is right 70% of
    the time would slow the other seven more than it gains, so k is 0 there, while the
    same sequence alone takes proposals."""
    c = _controller({r: float(r) for r in range(1, 14)})
    _accepting(c, 3, 0.7)
    assert c.choose_k(3, rows=8, limit=4, tokens=8.0) in (0, 1)  # 0, or a periodic probe
    assert [c.choose_k(3, rows=8, limit=4, tokens=8.0) for _ in range(6)].count(0) >= 5
    flat = _controller({r: 1.0 + 0.05 * (r - 1) for r in range(1, 14)})
    _accepting(flat, 3, 0.7)
    assert flat.choose_k(3, rows=1, limit=4, tokens=1.0) >= 2
