"""Failures stay contained: a request whose post-processing raises fails alone, a failed
engine step fails only the requests in it, and a non-streaming client that gives up has
its request aborted."""

from __future__ import annotations

import concurrent.futures as cf
import time

import httpx
import openai
import pytest

from tests.server.conftest import API_KEY, MODEL

GREEDY = dict(temperature=0, max_tokens=16, extra_body={"ignore_eos": True})


def test_one_bad_request_fails_alone(server, client, monkeypatch):
    engine = server.engine
    original = engine._find_stop

    def find_stop(text, old_len, stops):
        if "BOOM" in stops:
            raise RuntimeError("detokenizer exploded")
        return original(text, old_len, stops)

    monkeypatch.setattr(engine, "_find_stop", find_stop)
    ref = client.completions.create(model=MODEL, prompt="fine", **GREEDY).choices[0].text
    with cf.ThreadPoolExecutor(4) as pool:
        good = [pool.submit(client.completions.create, model=MODEL, prompt="fine", **GREEDY)
                for _ in range(3)]
        bad = pool.submit(client.completions.create, model=MODEL, prompt="fine",
                          stop=["BOOM"], **GREEDY)
        with pytest.raises(openai.InternalServerError, match="detokenizer exploded"):
            bad.result()
        assert [g.result().choices[0].text for g in good] == [ref] * 3
    server.wait_idle()
    assert server.all_blocks_free()


def test_failed_step_fails_its_requests_and_serving_goes_on(server, client, monkeypatch):
    runner = server.engine.runner
    original = runner.execute
    calls = {"n": 0}

    def execute(sched):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("simulated kernel failure")
        return original(sched)

    monkeypatch.setattr(runner, "execute", execute)
    with pytest.raises(openai.InternalServerError, match="simulated kernel failure"):
        client.completions.create(model=MODEL, prompt="first", **GREEDY)
    server.wait_idle()
    assert server.all_blocks_free()
    r = client.completions.create(model=MODEL, prompt="second", **GREEDY)
    assert r.usage.completion_tokens == 16
    assert httpx.get(server.url + "/health").status_code == 200


def test_non_streaming_client_timeout_aborts(server, monkeypatch):
    runner = server.engine.runner
    original = runner.execute

    def slow_execute(sched):  # >= 2 s for the whole request, whatever the machine
        time.sleep(0.01)
        return original(sched)

    monkeypatch.setattr(runner, "execute", slow_execute)
    body = {"model": MODEL, "prompt": "a long wait", "max_tokens": 230, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/completions", json=body, timeout=0.3,
                   headers={"Authorization": f"Bearer {API_KEY}"})
    server.wait_idle(timeout=10)
    assert server.all_blocks_free()
