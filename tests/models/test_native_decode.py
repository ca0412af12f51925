"""The native decode step (sparsa.models.native_decode) computes what the module path does."""

from __future__ import annotations

import pytest
import torch

from sparsa import LLM, SamplingParams, kernels
from sparsa.kernels import ops
from sparsa.layers.moe import softmax_topk
from sparsa.models.native_decode import NativeDecodePlan
from tests.tiny_models import build_tiny_checkpoint

pytestmark = pytest.mark.skipif(not kernels.available(), reason="native kernels not built")

PROMPTS = [[1, 5, 9, 17], [1, 33], [1, 7, 7, 7, 7, 90, 3]]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    out = {}
    for name in ("llama", "qwen2", "mistral-sliding", "qwen3", "mixtral", "qwen2_moe",
                 "qwen3_moe", "olmoe"):
        _, path = build_tiny_checkpoint(name, tmp_path_factory.mktemp(name))
        out[name] = path
    return out


def _generate(path, quantization, native: bool, prompts=PROMPTS):
    llm = LLM(str(path), dtype="float32", quantization=quantization, kv_cache_memory="8MiB",
              native_decode=native, num_threads=1)
    sp = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=3)
    outs = llm.generate(prompts, sp)
    decoder = llm.engine.model.model
    return [(o.outputs[0].token_ids, o.outputs[0].logprobs) for o in outs], decoder


# olmoe's full-width q/k norm and qkv clipping are outside the fused attention kernel: it
# must keep the module path (no plan) and still give the same results.
COVERED = {"llama", "qwen2", "mistral-sliding", "qwen3", "mixtral", "qwen2_moe", "qwen3_moe"}


@pytest.mark.parametrize("quantization", ["none", "int8", "int4"])
@pytest.mark.parametrize("name", ["llama", "qwen2", "mistral-sliding", "qwen3", "mixtral",
                                  "qwen2_moe", "qwen3_moe", "olmoe"])
def test_native_decode_equals_module_path(checkpoints, name, quantization):
    ref, off = _generate(checkpoints[name], quantization, native=False)
    got, on = _generate(checkpoints[name], quantization, native=True)
    assert off._plan is None  # never built when switched off
    assert bool(on._plan) == (name in COVERED)
    # bit-identical: the same kernels in the same order, only without the modules around them
    assert got == ref


def test_plan_declines_hooked_experts_and_large_batches(checkpoints):
    llm = LLM(str(checkpoints["mixtral"]), dtype="float32", quantization="int8",
              kv_cache_memory="8MiB", num_threads=1)
    llm.generate([[1, 2, 3]], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
    decoder = llm.engine.model.model
    plan = decoder._plan
    assert isinstance(plan, NativeDecodePlan)
    calls = []
    orig = NativeDecodePlan.run
    NativeDecodePlan.run = lambda self, *a: calls.append(1) or orig(self, *a)
    try:
        sp = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
        llm.generate([[1, 2, 3]], sp)
        assert len(calls) == 3  # every decode step, never the prefill
        calls.clear()
        seen = []
        handle = decoder.layers[0].mlp.experts.register_forward_pre_hook(
            lambda m, args: seen.append(args[2].shape[0]))
        llm.generate([[1, 2, 3]], sp)
        handle.remove()
        assert calls == [] and seen == [3, 1, 1, 1]  # a hook sees every step
        calls.clear()
        llm.generate([[1, i] for i in range(3, 3 + plan.max_rows + 1)], sp)
        assert calls == []  # more rows than the kernels take natively
    finally:
        NativeDecodePlan.run = orig


# ----------------------------------------------------------------- the native ops it calls


@pytest.mark.parametrize("experts,k,renorm", [(8, 2, True), (64, 8, True), (60, 4, False),
                                              (5, 5, True)])
def test_moe_route_matches_softmax_topk(experts, k, renorm):
    torch.manual_seed(experts)
    for rows in (1, 3, 40):  # 40: the threaded (prefill) branch
        x = torch.randn(rows, 96)
        w = torch.randn(96, experts) * 0.2
        weights, ids = ops.moe_route(x, w, k, renorm)
        ref_w, ref_ids = softmax_topk(x @ w, k, renorm)
        assert torch.equal(ids, ref_ids)
        torch.testing.assert_close(weights, ref_w, atol=1e-6, rtol=1e-5)


def test_moe_route_ties_go_to_the_lower_expert():
    x = torch.ones(1, 4)
    w = torch.zeros(4, 6)
    w[:, 4] = 1.0
    weights, ids = ops.moe_route(x, w, 3, False)
    assert ids.tolist() == [[4, 0, 1]]
    assert weights.sum().item() < 1.0  # not renormalised


def test_moe_route_rejects_bad_arguments():
    with pytest.raises(ValueError, match="top_k"):
        ops.moe_route(torch.randn(1, 4), torch.randn(4, 3), 4, True)
    with pytest.raises(ValueError, match="features"):
        ops.moe_route(torch.randn(1, 5), torch.randn(4, 3), 1, True)
    with pytest.raises(ValueError, match="float32"):
        ops.moe_route(torch.randn(1, 4).double(), torch.randn(4, 3), 1, True)


def test_add_rms_norm_is_the_add_then_the_norm():
    torch.manual_seed(0)
    for rows, h in ((1, 1024), (3, 100), (64, 64)):
        r, x, w = torch.randn(rows, h), torch.randn(rows, h), torch.randn(h)
        expect_r = r + x
        y = ops.add_rms_norm_(r, x, w, 1e-5)
        assert torch.equal(r, expect_r)
        assert torch.equal(y, ops.rms_norm(expect_r, w, 1e-5))
    with pytest.raises(ValueError, match="shapes"):
        ops.add_rms_norm_(torch.randn(2, 8), torch.randn(1, 8), torch.randn(8), 1e-5)


def test_argmax_rows_is_torch_argmax():
    torch.manual_seed(0)
    for vocab in (1, 7, 8, 33, 32000):
        x = torch.randn(4, vocab)
        x[1, vocab // 2] = 50.0
        x[2, vocab - 1] = 50.0
        x[3, 0] = x[3, vocab - 1] = 50.0  # a tie: the first index, as torch
        assert ops.argmax_rows(x).tolist() == x.argmax(dim=-1).tolist()
    strided = torch.randn(8, 40)[::2]
    assert ops.argmax_rows(strided).tolist() == strided.argmax(dim=-1).tolist()
    with pytest.raises(ValueError, match="contiguous"):
        ops.argmax_rows(torch.randn(40, 8).t())
