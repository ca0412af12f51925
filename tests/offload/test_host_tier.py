"""The host tier (experts in host memory between the device cache and the disk) and
Fiddler's compute-where-it-lives on a miss: outputs, budgets, errors."""

from __future__ import annotations

import threading

import pytest
import torch

from sparsa import LLM, SamplingParams
from sparsa.cli import build_parser
from sparsa.config import OffloadConfig
from sparsa.offload.expert_cache import ExpertCache
from sparsa.offload.host_tier import HostTier

from .helpers import moe_checkpoint

PROMPTS = [[1, 5, 9, 33, 7], [1, 100, 3], list(range(1, 40)), [1, 250, 4, 4, 4, 8]]
GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=1)


@pytest.fixture(scope="module", params=["mixtral", "qwen2_moe", "deepseek_v2"])
def checkpoint(request, tmp_path_factory):
    path = moe_checkpoint(request.param, tmp_path_factory.mktemp(request.param))
    ref = [o.outputs[0].token_ids for o in LLM(str(path)).generate(PROMPTS, GREEDY)]
    # offloaded without the tier: the native layout's F.linear, as the host tier computes
    offloaded = LLM(str(path), expert_memory="25%").generate(PROMPTS, GREEDY)
    assert [o.outputs[0].token_ids for o in offloaded] == ref
    return path, ref, [_logprobs(o) for o in offloaded]


def _logprobs(out) -> list[float]:
    c = out.outputs[0]
    return [d[t] for d, t in zip(c.logprobs, c.token_ids)]


@pytest.mark.parametrize("on_miss", ["wait", "host"])
def test_host_tier_keeps_outputs_and_budgets(checkpoint, on_miss):
    path, ref, ref_lp = checkpoint
    # (a batch cycles through every expert each step: a host tier below 100% thrashes)
    llm = LLM(str(path), expert_memory="25%", offload_host_memory="100%",
              offload_on_miss=on_miss)
    outs = llm.generate(PROMPTS, GREEDY)
    assert [o.outputs[0].token_ids for o in outs] == ref
    if on_miss == "wait" or llm.engine.device.type == "cpu":
        # the same arithmetic on the device copy and the host copy: exact
        assert [_logprobs(o) for o in outs] == ref_lp
    else:  # misses computed on the CPU, the rest on the GPU: other kernels
        for got, want in zip([_logprobs(o) for o in outs], ref_lp, strict=True):
            assert got == pytest.approx(want, abs=1e-4)
    rep = llm.engine.model.offload.report()
    assert rep["peak_bytes"] <= rep["budget_bytes"] and rep["evictions"] > 0
    assert rep["host_peak_bytes"] <= rep["host_budget_bytes"]
    assert rep["host_hits"] > 0  # device misses served from host memory
    # every device load went through the tier; only its misses read the disk
    assert rep["host_loads"] == rep["host_hits"] + rep["host_disk_reads"]
    assert rep["disk_loads"] == rep["host_disk_reads"] < rep["host_loads"]
    if on_miss == "host":
        assert rep["host_computes"] > 0 and rep["substitutions"] == rep["host_computes"]
        assert rep["host_compute_rows"] <= 4 * rep["host_computes"]
    else:
        assert rep["host_computes"] == 0 and rep["substitutions"] == 0
    single = llm.generate([PROMPTS[0]], GREEDY)[0]
    assert single.outputs[0].token_ids == ref[0]


def test_host_compute_row_limit(checkpoint):
    """Batches above host_compute_max_rows wait for the device copy instead."""
    path, ref, _ = checkpoint
    llm = LLM(str(path), expert_memory="25%", offload_host_memory="100%",
              offload_on_miss="host", offload_host_compute_max_rows=1)
    assert [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY)] == ref
    rep = llm.engine.model.offload.report()
    assert rep["host_compute_rows"] == rep["host_computes"] > 0  # one row each


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_host_tier_and_fiddler_with_quantized_experts(tmp_path, method):
    """Quantized experts: the tier holds the store's packed bytes; on_miss='host' computes a
    miss on the CPU from one-expert weights over those bytes, with the same kernels."""
    path = moe_checkpoint("mixtral", tmp_path / "m")
    ref = LLM(str(path), quantization=method).generate(PROMPTS, GREEDY)
    store = str(tmp_path / "store")
    waited = LLM(str(path), quantization=method, expert_memory="25%",
                 offload_host_memory="100%", offload_store_dir=store).generate(PROMPTS, GREEDY)
    assert [o.outputs[0].token_ids for o in waited] == [o.outputs[0].token_ids for o in ref]
    llm = LLM(str(path), quantization=method, expert_memory="25%", offload_host_memory="100%",
              offload_on_miss="host", offload_store_dir=store)
    outs = llm.generate(PROMPTS, GREEDY)
    assert [o.outputs[0].token_ids for o in outs] == [o.outputs[0].token_ids for o in ref]
    if llm.engine.device.type == "cpu":  # one arithmetic for device and host copies
        assert [_logprobs(o) for o in outs] == [_logprobs(o) for o in waited]
    rep = llm.engine.model.offload.report()
    assert rep["host_hits"] > 0 and rep["host_computes"] > 0
    assert rep["peak_bytes"] <= rep["budget_bytes"]
    with pytest.raises(ValueError, match="quantized already"):
        LLM(str(path), quantization=method, expert_memory="25%",
            offload_on_miss="low_precision", offload_store_dir=store)


def test_host_memory_auto(checkpoint, monkeypatch):
    """host_memory='auto': host memory available at load less the reserve and, with the CPU
    as the device, the device cache's budget (not allocated yet, so not yet gone)."""
    from sparsa.offload import loading

    path, ref, _ = checkpoint
    probe = LLM(str(path), expert_memory="25%", offload_host_memory="100%")
    rep = probe.engine.model.offload.report()
    raw = rep["host_budget_bytes"] // rep["host_capacity_experts"]  # one expert as read
    spare = 3 * raw + raw // 2
    monkeypatch.setattr(loading, "_available_bytes",
                        lambda device: (2 << 30) + rep["budget_bytes"] + spare)
    llm = LLM(str(path), expert_memory="25%", offload_host_memory="auto")
    got = llm.engine.model.offload.report()
    assert got["host_budget_bytes"] == spare and got["host_capacity_experts"] == 3
    assert [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY)] == ref
    monkeypatch.setattr(loading, "_available_bytes", lambda device: 2 << 30)
    with pytest.raises(ValueError, match="host_memory='auto'"):
        LLM(str(path), expert_memory="25%", offload_host_memory="auto")


@pytest.mark.parametrize("fields, message", [
    (dict(on_miss="host"), "set host_memory"),
    (dict(host_memory="150%"), "host_memory percentage"),
    (dict(host_memory=0), "host_memory must be positive"),
    (dict(host_memory="1GiB", host_compute_max_rows=0), "host_compute_max_rows"),
    (dict(on_miss="gpu"), "on_miss must be one of"),
])
def test_config_errors(fields, message):
    with pytest.raises(ValueError, match=message):
        OffloadConfig(expert_memory="25%", **fields)


def offload_fields(args):
    from sparsa.config import config_from_args

    return config_from_args("m", args).model.offload


def test_cli_options():
    args = build_parser().parse_args(
        ["generate", "m", "--expert-memory", "25%", "--offload-host-memory", "8GiB",
         "--offload-on-miss", "host", "--offload-host-compute-rows", "2",
         "--offload-capacity", "per_layer"])
    f = vars(offload_fields(args))
    assert (f["host_memory"], f["on_miss"], f["host_compute_max_rows"]) == ("8GiB", "host", 2)
    assert f["capacity"] == "per_layer"
    OffloadConfig(**f)
    args = build_parser().parse_args(["generate", "m", "--expert-memory", "25%",
                                      "--offload-on-miss", "int8"])
    f = vars(offload_fields(args))
    assert (f["on_miss"], f["low_precision"], f["host_memory"]) == ("low_precision", "int8",
                                                                    None)


# ---- the tier alone, over a stub reader --------------------------------------------------

class _Reader:
    """read_raw gives one small tensor per expert; reads can be held on a gate."""

    def __init__(self):
        self.device = torch.device("cpu")
        self.slab_bytes = self.raw_bytes = 4096
        self.reads: list[tuple[int, int]] = []
        self.gate: threading.Event | None = None
        self.fail: set[tuple[int, int]] = set()

    def read_raw(self, layer, expert):
        if self.gate is not None:
            self.gate.wait(5)
        if (layer, expert) in self.fail:
            raise OSError("disk error")
        self.reads.append((layer, expert))
        return (torch.full((4, 4), float(layer * 10 + expert)),)

    def raw_offsets(self, layer, expert):
        return (0,)

    def compute_form(self, raw):
        return tuple(t.clone() for t in raw)

    device_form = compute_form


def test_tier_lru_budget_and_pins():
    reader = _Reader()
    tier = HostTier(reader, budget_bytes=2 * 4096, expert_bytes=4096)  # two experts
    assert tier.capacity == 2
    for e in (0, 1):
        assert tier.load(0, e)[0][0, 0] == e
    assert tier.held() == {(0, 0), (0, 1)}
    tier.load(0, 0)  # a hit: (0, 1) is now least recently used
    assert reader.reads == [(0, 0), (0, 1)] and tier.stats.hits == 1
    tier.load(0, 2)
    assert tier.held() == {(0, 0), (0, 2)} and tier.stats.evictions == 1
    # pinned experts are never evicted; with every slot pinned a read is not kept
    a, b = tier.acquire(0, 0), tier.acquire(0, 2)
    assert a is not None and b is not None
    assert tier.acquire(0, 1) is None
    assert tier.load(0, 3)[0][0, 0] == 3
    assert tier.held() == {(0, 0), (0, 2)} and tier.stats.not_kept == 1
    assert tier.used_bytes <= tier.budget_bytes
    tier.release(0, 0)
    tier.release(0, 2)
    tier.load(1, 0)
    assert (1, 0) in tier.held() and tier.stats.peak_bytes <= tier.budget_bytes
    assert tier.report()["host_capacity_experts"] == 2


def test_tier_failed_read_leaves_nothing():
    reader = _Reader()
    tier = HostTier(reader, budget_bytes=4096, expert_bytes=4096)
    reader.fail.add((0, 5))
    with pytest.raises(OSError, match="disk error"):
        tier.load(0, 5)
    assert tier.held() == set() and tier.used_bytes == 0
    tier.load(0, 1)
    assert tier.held() == {(0, 1)}
    with pytest.raises(ValueError, match="holds no expert"):
        HostTier(reader, budget_bytes=10, expert_bytes=4096)


def test_tier_entry_being_filled_is_not_served():
    reader = _Reader()
    tier = HostTier(reader, budget_bytes=4 * 4096, expert_bytes=4096)
    reader.gate = threading.Event()
    t = threading.Thread(target=tier.load, args=(0, 7))
    t.start()
    while not tier._entries:
        pass
    assert tier.acquire(0, 7) is None  # being read: not yet usable on the host
    reader.gate.set()
    t.join()
    assert tier.acquire(0, 7) is not None


def test_cache_can_skip_decides_wait():
    """acquire(wait=False, can_skip=f): f False makes it wait and return the weights."""
    reader = _Reader()
    reader.load = lambda layer, expert: reader.compute_form(reader.read_raw(layer, expert))
    cache = ExpertCache(reader, num_layers=1, num_experts=4, expert_bytes=64,
                        budget_bytes=4 * 64)
    try:
        asked = []
        w = cache.acquire(0, 1, wait=False, can_skip=lambda k: asked.append(k) or False)
        assert w is not None and asked == [(0, 1)]
        cache.release(0, 1)
        reader.gate = threading.Event()
        assert cache.acquire(0, 2, wait=False, can_skip=lambda k: True) is None
        assert cache.stats.substitutions == 1
        reader.gate.set()
        cache.settle()
        # a resident expert never asks
        assert cache.acquire(0, 2, wait=False, can_skip=lambda k: 1 / 0) is not None
        cache.release(0, 2)
    finally:
        cache.close = lambda: cache._pool.shutdown(wait=True)
        cache.close()


@pytest.mark.parametrize("rule", ["cold", "any"])
def test_a_guess_never_evicts_another_guess(rule):
    """Prefetching guesses [0, 2] for a layer whose cache holds 0 (least recently used) and
    1: the load of 2 evicts 1, never the guessed 0."""
    reader = _Reader()
    reader.load = lambda layer, expert: reader.compute_form(reader.read_raw(layer, expert))
    cache = ExpertCache(reader, num_layers=1, num_experts=4, expert_bytes=64,
                        budget_bytes=2 * 64, prefetch_evicts=rule)
    try:
        for e in (0, 1):
            cache.acquire(0, e)
            cache.release(0, e)
        cache._pass += 2  # two forward passes later: nothing is warm for the "cold" rule
        assert cache.prefetch(0, [0, 2]) == 1
        cache.settle()
        assert cache.resident() == {(0, 0), (0, 2)}
    finally:
        cache._pool.shutdown(wait=True)


def test_guesses_wait_for_an_idle_io_thread():
    """guess_when_idle: with every I/O thread busy a guess starts nothing; known needs still
    start, and guesses start again once a thread is free."""
    reader = _Reader()
    reader.load = lambda layer, expert: reader.compute_form(reader.read_raw(layer, expert))
    reader.gate = threading.Event()
    cache = ExpertCache(reader, num_layers=1, num_experts=8, expert_bytes=64,
                        budget_bytes=8 * 64, io_threads=1, guess_when_idle=True)
    try:
        assert cache.prefetch(0, [0], guess=False) == 1  # occupies the only I/O thread
        assert cache.prefetch(0, [1, 2]) == 0  # a guess waits
        assert cache.prefetch(0, [3], guess=False) == 1  # a known need does not
        reader.gate.set()
        cache.settle()
        assert cache.prefetch(0, [1]) == 1
        cache.settle()
        assert cache.resident() == {(0, 0), (0, 1), (0, 3)}
    finally:
        reader.gate.set()
        cache._pool.shutdown(wait=True)
