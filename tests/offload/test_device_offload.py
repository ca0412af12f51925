"""Expert offloading on an accelerator: the device cache in GPU memory, the pinned host
tier's side-stream copies, Fiddler's CPU compute of a miss, and the device memory bound.

These paths exist only off the CPU, so the module runs where CUDA is available, or on the
device named by ``SPARSA_TEST_DEVICE`` (``SPARSA_TEST_DEVICE=cpu`` checks the tests
themselves on a CPU-only machine). ``scripts/device_check.sh`` runs it on a GPU machine.
"""

from __future__ import annotations

import os

import pytest
import torch

from sparsa import LLM, SamplingParams

from .helpers import moe_checkpoint

DEVICE = os.environ.get("SPARSA_TEST_DEVICE") or ("cuda" if torch.cuda.is_available() else "")
pytestmark = pytest.mark.skipif(
    not DEVICE, reason="needs CUDA (or SPARSA_TEST_DEVICE=cpu|cuda to choose a device)")

PROMPTS = [[1, 5, 9, 33, 7], [1, 100, 3], list(range(1, 40)), [1, 250, 4, 4, 4, 8]]
GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=1)
# F.linear over an expert's native [out, in] tensors and the resident fused layout are
# different GEMMs off the CPU: equal tokens, logprobs within float rounding
LOGPROB_TOL = 1e-4


def _tokens(outs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outs]


def _logprobs(outs) -> list[list[float]]:
    return [[d[t] for d, t in zip(o.outputs[0].logprobs, o.outputs[0].token_ids)]
            for o in outs]


def _assert_close(a: list[list[float]], b: list[list[float]], tol: float) -> None:
    for x, y in zip(a, b, strict=True):
        assert x == pytest.approx(y, abs=tol)


@pytest.fixture(scope="module", params=["mixtral", "deepseek_v2"])
def checkpoint(request, tmp_path_factory):
    path = moe_checkpoint(request.param, tmp_path_factory.mktemp(request.param))
    outs = LLM(str(path), device=DEVICE).generate(PROMPTS, GREEDY)
    return path, _tokens(outs), _logprobs(outs)


def _device_tensors(weights) -> list[torch.Tensor]:
    if isinstance(weights, tuple):
        return [t for t in weights if isinstance(t, torch.Tensor)]
    return list(weights.buffers())


def test_offloaded_experts_live_on_the_device(checkpoint):
    path, ref, ref_lp = checkpoint
    llm = LLM(str(path), device=DEVICE, expert_memory="25%")
    outs = llm.generate(PROMPTS, GREEDY)
    assert _tokens(outs) == ref
    _assert_close(_logprobs(outs), ref_lp, LOGPROB_TOL)
    state = llm.engine.model.offload
    rep = state.report()
    assert rep["evictions"] > 0 and rep["peak_bytes"] <= rep["budget_bytes"]
    state.cache.settle()
    held = [e.weights for e in state.cache._entries.values() if e.weights is not None]
    assert held, "nothing resident after a run"
    dev = torch.device(DEVICE)
    for weights in held:
        tensors = _device_tensors(weights)
        assert tensors and all(t.device.type == dev.type for t in tensors)


@pytest.mark.parametrize("on_miss", ["wait", "host"])
def test_host_tier_on_the_device(checkpoint, on_miss):
    path, ref, ref_lp = checkpoint
    plain = LLM(str(path), device=DEVICE, expert_memory="25%").generate(PROMPTS, GREEDY)
    llm = LLM(str(path), device=DEVICE, expert_memory="25%", offload_host_memory="100%",
              offload_on_miss=on_miss)
    outs = llm.generate(PROMPTS, GREEDY)
    assert _tokens(outs) == ref
    rep = llm.engine.model.offload.report()
    assert rep["host_pinned"] is (torch.device(DEVICE).type == "cuda")
    assert rep["host_hits"] > 0 and rep["host_peak_bytes"] <= rep["host_budget_bytes"]
    assert rep["peak_bytes"] <= rep["budget_bytes"]
    if on_miss == "wait":
        # the same device arithmetic as offloading without the tier: only the copy differs
        assert _logprobs(outs) == _logprobs(plain)
        assert rep["host_computes"] == 0
    else:
        # misses computed on the CPU: other kernels, the same tokens
        assert rep["host_computes"] > 0
        _assert_close(_logprobs(outs), ref_lp, LOGPROB_TOL)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="device memory counters need CUDA")
def test_device_memory_stays_below_resident(checkpoint):
    """The point of offloading: peak device memory falls by about the experts left out."""
    path, _, _ = checkpoint

    def peak(**kw) -> tuple[int, LLM]:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        llm = LLM(str(path), device=DEVICE, kv_cache_memory="4MiB", **kw)
        llm.generate(PROMPTS, GREEDY)
        return torch.cuda.max_memory_allocated() - base, llm

    resident, llm = peak()
    del llm
    offloaded, llm = peak(expert_memory="25%")
    rep = llm.engine.model.offload.report()
    left_out = rep["total_expert_bytes"] - rep["budget_bytes"]
    assert offloaded <= resident - left_out // 2, (offloaded, resident, left_out)
