"""Soak: many streamed requests at a fixed concurrency, some cancelled mid-stream, some
malformed. The server answers no 5xx, the others get exactly their greedy answers, and
afterwards every KV block is free, the gauges read idle, no request's objects are left
alive, and the process grew by less than a fixed bound. SPARSA_SOAK_N sets the number of
requests (CI: 2,000 at concurrency 32; scripts/serve_stress.py runs the long soak)."""

from __future__ import annotations

import asyncio
import gc
import json
import os
import random

import httpx

from tests.server.conftest import API_KEY, MODEL

N = int(os.environ.get("SPARSA_SOAK_N", "2000"))
CONCURRENCY = 32
RSS_GROWTH_MB = 16  # the leak this guards against held ~4 KB per request
PROMPTS = ["Once upon a time", "Once upon a time there was", "The quick brown fox",
           "In a galaxy far away, the ship"]
MAX_TOKENS = 12
HEADERS = {"Authorization": f"Bearer {API_KEY}"}


async def _stream(http: httpx.AsyncClient, body: dict, cancel_after: int | None = None):
    """(status, text, finish_reason) of a streamed completion; closes early if asked."""
    text, reason, events = "", None, 0
    async with http.stream("POST", "/v1/completions", json=body) as r:
        if r.status_code != 200:
            await r.aread()
            return r.status_code, r.text, None
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            assert "error" not in chunk, chunk
            events += 1
            for c in chunk["choices"]:
                text += c["text"]
                reason = c["finish_reason"] or reason
            if cancel_after is not None and events >= cancel_after:
                return 200, text, "cancelled"  # leaving the block closes the connection
    return 200, text, reason


async def _malformed(http: httpx.AsyncClient, kind: int) -> int:
    if kind == 0:
        r = await http.post("/v1/completions", content=b'{"model": "tiny', headers={
            "Content-Type": "application/json"})
    elif kind == 1:
        r = await http.post("/v1/completions", json={"model": MODEL, "prompt": "x",
                                                       "temperature": -1, "stream": True})
    elif kind == 2:
        r = await http.post("/v1/completions", json={"model": "other", "prompt": "x"})
    elif kind == 3:
        r = await http.post("/v1/chat/completions", json={"model": MODEL, "messages": "hi"})
    else:
        r = await http.post("/v1/completions", json={"model": MODEL, "prompt": [10**9]})
    return r.status_code


async def _soak(url: str, n: int) -> tuple[list, list, list]:
    rng = random.Random(0)
    kinds = ["ok"] * n
    for i in rng.sample(range(n), n // 5):
        kinds[i] = "cancel"
    for i in rng.sample([i for i in range(n) if kinds[i] == "ok"], n * 15 // 100):
        kinds[i] = "bad"
    limits = httpx.Limits(max_connections=CONCURRENCY + 10,
                          max_keepalive_connections=CONCURRENCY + 10)
    gate = asyncio.Semaphore(CONCURRENCY)

    async def gated(coro):
        async with gate:
            return await coro

    async with httpx.AsyncClient(base_url=url, headers=HEADERS, timeout=120,
                                 limits=limits) as http:
        tasks = []
        for i, kind in enumerate(kinds):
            prompt = PROMPTS[i % len(PROMPTS)]
            if kind == "ok":
                tasks.append(_stream(http, {"model": MODEL, "prompt": prompt, "stream": True,
                                            "temperature": 0, "max_tokens": MAX_TOKENS,
                                            "ignore_eos": True}))
            elif kind == "cancel":
                tasks.append(_stream(http, {"model": MODEL, "prompt": prompt, "stream": True,
                                            "max_tokens": 200, "ignore_eos": True},
                                     cancel_after=rng.randrange(1, 4)))
            else:
                tasks.append(_malformed(http, i % 5))
        results = await asyncio.gather(*(gated(t) for t in tasks))
    return kinds, results, [PROMPTS[i % len(PROMPTS)] for i in range(n)]


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def _gauges(url: str) -> dict[str, float]:
    out = {}
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith(("sparsa_num_requests_", "sparsa_kv_cache_usage_perc",
                            "sparsa_tokens_in_flight")):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def test_soak(server, client):
    from sparsa.server.async_engine import RequestHandle

    ref = {p: client.completions.create(model=MODEL, prompt=p, temperature=0,
                                        max_tokens=MAX_TOKENS,
                                        extra_body={"ignore_eos": True}).choices[0].text
           for p in PROMPTS}
    # admit everything: this test is about concurrency, test_overload about refusing
    adm = server.app.state.async_engine.admission
    old = adm.max_waiting, adm.max_tokens_in_flight
    adm.max_waiting, adm.max_tokens_in_flight = N + 1, N * 300
    try:
        warm = 500  # allocator pools and caches fill first
        asyncio.run(_soak(server.url, warm))
        server.wait_idle(timeout=60)
        gc.collect()
        rss0 = _rss_mb()
        kinds, results, prompts = asyncio.run(_soak(server.url, N))
    finally:
        adm.max_waiting, adm.max_tokens_in_flight = old
    for kind, res, prompt in zip(kinds, results, prompts):
        if kind == "ok":
            status, text, reason = res
            assert status == 200 and reason == "length" and text == ref[prompt], res
        elif kind == "cancel":
            assert res[0] == 200
        else:
            assert 400 <= res < 500, res
    server.wait_idle(timeout=60)
    assert server.all_blocks_free()
    gauges = _gauges(server.url)
    assert gauges and all(v == 0 for v in gauges.values()), gauges
    gc.collect()
    grew = _rss_mb() - rss0
    assert grew < RSS_GROWTH_MB, f"RSS grew {grew:.1f} MB over {N} requests"
    alive = sum(1 for o in gc.get_objects() if type(o) is RequestHandle)
    assert not alive, f"{alive} finished requests still hold their objects"
    assert httpx.get(server.url + "/health").status_code == 200
    again = client.completions.create(model=MODEL, prompt=PROMPTS[0], temperature=0,
                                      max_tokens=MAX_TOKENS, extra_body={"ignore_eos": True})
    assert again.choices[0].text == ref[PROMPTS[0]]
