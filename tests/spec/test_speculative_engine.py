"""Speculative decoding inside the engine is lossless: greedy outputs (and their logprobs)
equal plain decoding's on dense and MoE models, alone and batched, with chunked prefill,
preemption and prefix caching; sampled outputs follow the same distribution; no KV block
leaks and the prefix cache never holds a rejected token."""

from __future__ import annotations

import random

import pytest
import torch

from sparsa import LLM, SamplingParams
from tests.tiny_models import TINY_CONFIGS, build_tiny_checkpoint

SPEC = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 1,
        "prompt_lookup_max": 3, "disable_by_batch_size": None, "adaptive": False}
# a token tree (n-gram: a branch per distinct earlier continuation), verified in one pass
TREE_SPEC = {**SPEC, "num_speculative_tokens": None,
             "token_tree": [[0], [1], [0, 0], [1, 0], [2], [0, 0, 0], [0, 1], [1, 0, 0],
                            [0, 0, 0, 0]]}
MAX_TOKENS = 40


def _prompts(n: int = 8) -> list[list[int]]:
    """Repetitive prompts (n-gram lookup finds matches) and random ones (it mostly fails)."""
    rng = random.Random(0)
    out = []
    for i in range(n):
        if i % 2:
            unit = [rng.randrange(3, 256) for _ in range(rng.choice([3, 5, 7]))]
            out.append([1] + unit * rng.choice([3, 6, 12]))
        else:
            out.append([1] + [rng.randrange(3, 256) for _ in range(rng.choice([4, 20, 50]))])
    return out


def _run(llm: LLM, prompts, logprobs=None):
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True,
                            logprobs=logprobs)
    return [o.outputs[0] for o in llm.generate(prompts, params)]


@pytest.fixture(scope="module", params=["llama", "mixtral", "qwen3_moe", "deepseek_v2"])
def ckpt(request, tmp_path_factory):
    _, path = build_tiny_checkpoint(request.param, tmp_path_factory.mktemp(request.param))
    return str(path)


@pytest.fixture(scope="module")
def plain(ckpt):
    llm = LLM(ckpt, dtype="float32", num_kv_blocks=256)
    return _run(llm, _prompts(), logprobs=0)


@pytest.fixture(params=["chain", "tree"])
def spec(request):
    return SPEC if request.param == "chain" else TREE_SPEC


def _check_equal(got, want):
    assert [c.token_ids for c in got] == [c.token_ids for c in want]


def test_greedy_equal_batched_with_logprobs(ckpt, plain, spec, monkeypatch):
    from sparsa.engine.speculation import Speculation

    off_path = []  # accepted paths that left the first branch (a tree was needed)
    judge = Speculation.judge

    def counting(self, seq, sampled):
        path = judge(self, seq, sampled)
        off_path.append(any(n != d for d, n in enumerate(path)))
        return path

    monkeypatch.setattr(Speculation, "judge", counting)
    llm = LLM(ckpt, dtype="float32", num_kv_blocks=256, speculative_config=spec)
    got = _run(llm, _prompts(), logprobs=0)
    assert any(off_path) == (spec is TREE_SPEC)
    _check_equal(got, plain)
    for g, w in zip(got, plain):
        for a, b, t in zip(g.logprobs, w.logprobs, g.token_ids):
            assert a[t] == pytest.approx(b[t], abs=1e-4)
    stats = llm.engine.stats()["speculative"]
    assert stats["accepted"] > 0 and stats["accepted"] < stats["proposed"]
    bm = llm.engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks


def test_greedy_equal_alone_chunked_preempted(ckpt, plain, spec):
    prompts = _prompts()
    alone = LLM(ckpt, dtype="float32", num_kv_blocks=64, speculative_config=spec)
    _check_equal([_run(alone, [p])[0] for p in prompts], plain)
    # a small KV pool forces preemption; a small budget chunks prompts and drops proposals
    tight = LLM(ckpt, dtype="float32", num_kv_blocks=24, block_size=8,
                max_num_batched_tokens=20, enable_chunked_prefill=True,
                speculative_config=spec)
    engine = tight.engine
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    ids = [engine.add_request(p, params) for p in prompts]
    outs, preempted = {}, 0
    while engine.has_unfinished_requests():
        for o in engine.step():
            if o.finished:
                outs[o.request_id] = o.outputs[0]
        preempted = max([preempted] + [s.num_preemptions for r in engine.requests.values()
                                       for s in r.seqs])
    _check_equal([outs[i] for i in ids], plain)
    assert preempted > 0
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_prefix_cache_never_holds_rejected_tokens(tmp_path, spec):
    """Cached blocks after speculation must hold the tokens that were output: a later
    request whose prompt is that output reuses them and still decodes as plain does."""
    _, path = build_tiny_checkpoint("llama", tmp_path / "m")
    prompts = _prompts(4)
    llm = LLM(str(path), dtype="float32", num_kv_blocks=128, block_size=4,
              enable_prefix_caching=True, speculative_config=spec)
    first = _run(llm, prompts)
    follow = [p + c.token_ids for p, c in zip(prompts, first)]
    plain = LLM(str(path), dtype="float32", num_kv_blocks=128, block_size=4)
    want = _run(plain, follow)
    bm = llm.engine.block_manager
    before = bm.prefix_hit_tokens
    got = _run(llm, follow)
    assert bm.prefix_hit_tokens - before > sum(len(p) for p in prompts) // 2
    _check_equal(got, want)


def test_max_tokens_and_context_are_respected(tmp_path):
    _, path = build_tiny_checkpoint("llama", tmp_path / "m")
    unit = [5, 6, 7, 8]
    llm = LLM(str(path), dtype="float32", num_kv_blocks=64, max_model_len=64,
              speculative_config=SPEC)
    for n in (1, 2, 3, 7):
        c = _run_n(llm, [1] + unit * 4, n)
        assert len(c.token_ids) == n and c.finish_reason == "length"
    c = _run_n(llm, [1] + unit * 10, 100)  # 41 prompt tokens: the context stops it at 64
    assert len(c.token_ids) == 64 - 41 and c.finish_reason == "length"


def _run_n(llm, prompt, n):
    return llm.generate([prompt], SamplingParams(temperature=0, max_tokens=n,
                                                 ignore_eos=True))[0].outputs[0]


def test_sampling_distribution_unchanged(tmp_path):
    """20,000 samples of the second and third generated tokens, which speculation
    produces by verification (n-gram: every token of this prompt recurs in it, so every
    step proposes; n-gram token trees: it recurs twice, with two continuations; and a
    draft model): a chi-square homogeneity test against plain
    sampling passes for both, while one against a biased sampler (temperature 0.7) fails."""
    from scipy.stats import chi2_contingency

    cfg = dict(TINY_CONFIGS["llama"], vocab_size=24)
    _, path = build_tiny_checkpoint("llama", tmp_path / "m", config=cfg, std=0.15)
    rng = random.Random(1)
    prompt = [1] + rng.sample(range(3, 24), 21) + rng.sample(range(3, 24), 21)
    n_req, n = 250, 80  # 20,000 samples

    small = dict(cfg, num_hidden_layers=1)
    _, draft = build_tiny_checkpoint("llama", tmp_path / "d", config=small, std=0.15)
    draft_spec = {"method": "draft_model", "model": str(draft), "num_speculative_tokens": 2,
                  "disable_by_batch_size": None, "adaptive": False}

    def sample(spec, temperature=1.0, seed=0):
        # the global generator: per-request seeds give the n samples seeds seed + index,
        # which overlap between requests and correlate them
        torch.manual_seed(seed)
        kw = {"speculative_config": {**SPEC, "num_speculative_tokens": 2}} if spec else {}
        if spec == "draft":
            kw = {"speculative_config": draft_spec}
        if spec == "tree":
            kw = {"speculative_config": {**TREE_SPEC, "token_tree": [[0], [1], [0, 0]]}}
        llm = LLM(str(path), dtype="float32", num_kv_blocks=2048, max_num_seqs=256,
                  enable_prefix_caching=True, **kw)
        params = SamplingParams(temperature=temperature, n=n, max_tokens=3, ignore_eos=True)
        outs = llm.generate([prompt] * n_req, params)
        toks = torch.tensor([c.token_ids for o in outs for c in o.outputs])
        return toks, llm.engine.stats().get("speculative")

    base, _ = sample(False)
    spec, stats = sample(True, seed=1)
    assert stats["verify_steps"] > 1000 and 0 < stats["accepted"] < stats["proposed"]
    drafted, stats = sample("draft", seed=3)
    assert stats["verify_steps"] > 1000 and 0 < stats["accepted"] < stats["proposed"]
    branched, stats = sample("tree", seed=4)
    assert stats["verify_steps"] > 1000 and 0 < stats["accepted"] < stats["proposed"]
    biased, _ = sample(True, temperature=0.7, seed=2)

    def p_value(a, b, pos):
        counts = torch.stack([torch.bincount(a[:, pos], minlength=24),
                              torch.bincount(b[:, pos], minlength=24)])
        keep = counts.sum(0) >= 10
        return chi2_contingency(counts[:, keep].numpy())[1]

    for pos in (1, 2):
        assert p_value(base, spec, pos) > 1e-3
        assert p_value(base, drafted, pos) > 1e-3
        assert p_value(base, branched, pos) > 1e-3
        assert p_value(base, biased, pos) < 1e-6
