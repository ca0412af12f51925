"""`sparsa serve` as a real process: it binds loopback, answers, and stops on SIGINT."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import httpx

from sparsa.cli import main
from tests.server.conftest import free_port


def test_help_of_both_commands(capsys):
    assert main(["serve", "--help"]) == 0
    assert "--no-prefix-caching" in capsys.readouterr().out
    assert main(["bench", "serve", "--help"]) == 0
    assert "--request-rate" in capsys.readouterr().out


def test_serve_process(model_dir):
    port = free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "sparsa.cli", "serve", str(model_dir), "--port", str(port),
         "--max-model-len", "128", "--threads", "1", "--api-key", "k", "--num-kv-blocks", "32",
         "--log-level", "warning", "--keep-alive-timeout", "3"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "server did not come up"
            time.sleep(0.3)
        h = {"Authorization": "Bearer k"}
        models = httpx.get(url + "/v1/models", headers=h).json()["data"]
        # named like vLLM names it, not by the absolute path (which is still accepted)
        assert [m["id"] for m in models] == [model_dir.name, str(model_dir)]
        r = httpx.post(url + "/v1/completions", headers=h, timeout=60,
                       json={"model": model_dir.name, "prompt": "Hi", "max_tokens": 4})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
        assert httpx.get(url + "/v1/models").status_code == 401
        # The engine was built on the thread that runs the event loop: its flushing of
        # denormals must not reach request validation (5e-324 > 0 would be False there).
        # (the body is written by hand: this test process may flush denormals itself,
        # after other tests generated on its main thread, and would serialize 0.0)
        body = '{"model": "%s", "prompt": "Hi", "max_tokens": 2, "top_p": 5e-324}'
        r = httpx.post(url + "/v1/completions", timeout=60, content=body % model_dir.name,
                       headers={**h, "Content-Type": "application/json"})
        assert r.status_code == 200, r.text
        # bound to loopback: other Host headers (DNS rebinding) are refused
        r = httpx.get(url + "/v1/models", headers={**h, "Host": "evil.example"})
        assert r.status_code == 400 and r.json()["error"]["code"] == "host_not_allowed"
        assert httpx.get(url + "/v1/models", headers={**h, "Host": f"localhost:{port}"}
                         ).status_code == 200
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            out, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
    assert f"serving {model_dir.name}" in out and "prefix caching on" in out


def test_serve_takes_the_model_options():
    """The shared model options reach the served engine's config (offloading included)."""
    from sparsa.cli import build_parser
    from sparsa.server.cli import engine_config

    args = build_parser().parse_args(
        ["serve", "m", "--expert-memory", "25%", "--offload-policy", "lfu",
         "--offload-on-miss", "int8", "--bf16-prefill", "off", "--no-native-decode",
         "--int8-activations", "none", "--trace-experts", "t.csv.gz"])
    cfg = engine_config(args)
    assert cfg.trace_experts == "t.csv.gz"
    off = cfg.model.offload
    assert (off.expert_memory, off.policy, off.on_miss, off.low_precision) == \
        ("25%", "lfu", "low_precision", "int8")
    assert cfg.model.bf16_prefill is False and cfg.model.int8_activations == "none"
    assert cfg.device.native_decode is False
    plain = engine_config(build_parser().parse_args(["serve", "m"]))
    assert not plain.model.offload.enabled and plain.trace_experts is None
