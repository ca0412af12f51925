"""Hostile and heavy traffic against a real `sparsa serve` process (loopback only).

Two phases, each reported as JSON (the figures in BENCHMARKS.md come from here):

* burst: BURST requests at once (plain, streamed, prompt lists, n=16, chat, oversize
  prompts) while /health is polled every 20 ms: status counts, 5xx, how fast rejections
  (400/429/503) answer, /health latency during the burst, server RSS before and after.
* soak: SOAK requests at a fixed concurrency, 20% cancelled mid-stream and 10% malformed
  (bad JSON, lone surrogates, wrong types, unknown model, oversize prompt, prompt lists past
  the per-request cap): 5xx count, gauges afterwards (must read idle), server RSS every
  1,000 requests.

    python scripts/serve_stress.py                       # tinymoe-stories from ../shared
    python scripts/serve_stress.py --soak 10000 --burst 500 --json out/stress.json
    python scripts/serve_stress.py --model PATH -- --max-waiting 128   # extra serve flags
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
JSON = {"Content-Type": "application/json"}
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant:{% endif %}")
PROMPTS = ["Once upon a time", "The little dog", "Lily and Ben went to the park",
           "One day, a big red ball", "Tom had a toy car. He"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def bucket_quantiles(buckets: dict[str, float], since: dict[str, float] | None = None
                     ) -> dict[str, float | str | None]:
    """p50/p99 (as the bucket's upper bound, ms) of a cumulative histogram, less `since`."""
    since = since or {}
    rows = sorted(((float(le), c - since.get(le, 0)) for le, c in buckets.items()),
                  key=lambda x: x[0])
    total = rows[-1][1] if rows else 0
    out: dict[str, float | str | None] = {"n": total}
    for q in (50, 99):
        hit = next((le for le, c in rows if total and c >= q / 100 * total), None)
        out[f"p{q}_le"] = None if hit is None else (
            "inf" if hit == float("inf") else round(hit * 1000, 1))
    return out


def pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q / 100 * (len(xs) - 1)))]


def ms(x: float | None) -> float | None:
    return None if x is None else round(1000 * x, 1)


class Server:
    def __init__(self, model: str, extra: list[str]):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "sparsa.cli", "serve", model, "--port", str(self.port),
               "--log-level", "error", "--served-model-name", "m", *extra]
        cfg = Path(model) / "tokenizer_config.json"
        if cfg.is_file() and "chat_template" not in json.loads(cfg.read_text()):
            cmd += ["--chat-template", CHAT_TEMPLATE]  # chat traffic needs one
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        deadline = time.monotonic() + 300
        while True:
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if self.proc.poll() is not None:
                raise RuntimeError(self.proc.stdout.read())
            if time.monotonic() > deadline:
                raise RuntimeError("server did not come up")
            time.sleep(0.3)

    def rss(self) -> float:
        return rss_mb(self.proc.pid)

    def gauges(self) -> dict[str, float]:
        out = {}
        for line in httpx.get(self.url + "/metrics", timeout=30).text.splitlines():
            if line.startswith(("sparsa_num_requests_", "sparsa_kv_cache_usage_perc",
                                "sparsa_tokens_in_flight", "sparsa_num_preemptions_total")):
                name, value = line.rsplit(" ", 1)
                out[name] = float(value)
        return out

    def response_start(self) -> dict[str, dict]:
        """Server-side arrival-to-answer times of /v1 requests by status class, as bucket
        counts of sparsa_http_response_start_seconds: {class: {le: cumulative count}}."""
        out: dict[str, dict] = {}
        text = httpx.get(self.url + "/metrics", timeout=30).text
        for line in text.splitlines():
            if not line.startswith("sparsa_http_response_start_seconds_bucket{"):
                continue
            labels, value = line.rsplit(" ", 1)
            kv = dict(p.split("=", 1) for p in labels[labels.index("{") + 1:-1].split(","))
            kv = {k: v.strip('"') for k, v in kv.items()}
            if not kv["endpoint"].startswith("/v1/"):
                continue
            per = out.setdefault(kv["status"], {})
            per[kv["le"]] = per.get(kv["le"], 0) + float(value)
        return out

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


async def stream(http: httpx.AsyncClient, path: str, body: bytes,
                 cancel_after: int | None = None) -> tuple[int, float]:
    """(status, seconds to the response head)."""
    t0 = time.perf_counter()
    async with http.stream("POST", path, content=body, headers=JSON) as r:
        head = time.perf_counter() - t0
        if r.status_code != 200:
            await r.aread()
            return r.status_code, head
        events = 0
        async for line in r.aiter_lines():
            if line.startswith("data: "):
                if '"error"' in line and '"server_error"' in line:
                    return 500, head  # a failure after the stream started
                events += 1
                if cancel_after is not None and events >= cancel_after:
                    break
    return 200, head


async def post(http: httpx.AsyncClient, path: str, content: bytes) -> tuple[int, float]:
    t0 = time.perf_counter()
    r = await http.post(path, content=content, headers=JSON)
    return r.status_code, time.perf_counter() - t0


def malformed(i: int) -> tuple[str, bytes | str | dict]:
    kinds = [
        ("/v1/completions", b'{"model": "m", "prompt": '),
        ("/v1/completions", '{"model": "m", "prompt": "a\\ud800b", "max_tokens": 4}'),
        ("/v1/chat/completions", '{"model": "m", "messages": [{"role": "user", '
                                 '"content": "\\udfff"}]}'),
        ("/v1/completions", {"model": "m", "prompt": "x", "stream": "yes"}),
        ("/v1/completions", {"model": "m", "prompt": "x", "max_tokens": "5"}),
        ("/v1/completions", {"model": "nope", "prompt": "x"}),
        ("/v1/completions", {"model": "m", "prompt": "x" * 1_000_000}),
        ("/v1/completions", {"model": "m", "prompt": ["a"] * 1000, "n": 16}),
        ("/v1/completions", {"model": "m", "prompt": [10**9]}),
    ]
    return kinds[i % len(kinds)]


def one_request(rng: random.Random, i: int, cancel_rate: float, bad_rate: float):
    u = rng.random()
    prompt = rng.choice(PROMPTS)
    if u < bad_rate:
        path, body = malformed(i)
        return "bad", post_factory(path, body)
    if u < bad_rate + cancel_rate:
        body = {"model": "m", "prompt": prompt, "max_tokens": 64, "stream": True,
                "ignore_eos": True}
        return "cancel", stream_factory("/v1/completions", body, rng.randrange(1, 5))
    kind = rng.randrange(5)
    if kind == 4:  # odd but valid: a denormal top_p must not be refused
        return "ok", post_factory("/v1/completions", {
            "model": "m", "prompt": prompt, "top_p": 5e-324, "max_tokens": 4})
    if kind == 0:
        return "ok", stream_factory("/v1/completions", {
            "model": "m", "prompt": prompt, "max_tokens": 16, "stream": True,
            "logprobs": 2})
    if kind == 1:
        return "ok", post_factory("/v1/completions", {
            "model": "m", "prompt": [prompt, prompt + " and"], "max_tokens": 8, "n": 2})
    if kind == 2:
        return "ok", stream_factory("/v1/chat/completions", {
            "model": "m", "messages": [{"role": "user", "content": prompt}],
            "max_tokens": 16, "stream": True})
    return "ok", post_factory("/v1/chat/completions", {
        "model": "m", "messages": [{"role": "user", "content": prompt}], "max_tokens": 12,
        "logprobs": True, "top_logprobs": 2})


def _encode(body: bytes | str | dict) -> bytes:
    """Bodies are serialized before the clock starts, so the client's own JSON work does
    not count as server latency."""
    if isinstance(body, dict):
        return json.dumps(body).encode()
    return body.encode() if isinstance(body, str) else body


def post_factory(path, body):
    data = _encode(body)
    return lambda http: post(http, path, data)


def stream_factory(path, body, cancel_after=None):
    data = _encode(body)
    return lambda http: stream(http, path, data, cancel_after)


async def raw_request(port: int, data: bytes) -> tuple[int, float]:
    """One request on its own connection with a minimal HTTP/1.1 client: (status, seconds
    to the response head). httpx spends more CPU per request than the server does to
    refuse one, and on a small machine the load generator then sets the latency."""
    t0 = time.perf_counter()
    reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=1 << 20)
    try:
        writer.write(data)
        with contextlib.suppress(ConnectionError):  # answered before the body was sent
            await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
        took = time.perf_counter() - t0
        status = int(head.split(b" ", 2)[1])
        while await reader.read(1 << 16):  # the body, or the whole stream
            pass
        return status, took
    finally:
        writer.close()


def http_bytes(path: str, body: bytes | str | dict) -> bytes:
    data = _encode(body)
    return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json"
            f"\r\nContent-Length: {len(data)}\r\nConnection: close\r\n\r\n").encode() + data


async def burst(server: Server, n: int, seed: int) -> dict:
    url = server.url
    before = server.response_start()
    rng = random.Random(seed)
    reqs: list[bytes] = []
    for _ in range(n):
        u = rng.random()
        p = rng.choice(PROMPTS)
        if u < 0.1:  # prompt lists, some past the per-request cap
            reqs.append(http_bytes("/v1/completions", {
                "model": "m", "prompt": [p] * rng.choice([64, 128, 1000]), "max_tokens": 8}))
        elif u < 0.2:
            reqs.append(http_bytes("/v1/completions", {
                "model": "m", "prompt": p, "n": 16, "max_tokens": 32}))
        elif u < 0.25:  # megabytes of prompt: past the context, some past the body limit
            reqs.append(http_bytes("/v1/completions", {"model": "m", "prompt": p * 200_000}))
        elif u < 0.5:
            reqs.append(http_bytes("/v1/chat/completions", {
                "model": "m", "messages": [{"role": "user", "content": p}],
                "max_tokens": 32, "stream": True}))
        else:
            reqs.append(http_bytes("/v1/completions", {
                "model": "m", "prompt": p, "max_tokens": 32, "stream": True}))
    poller = subprocess.Popen([sys.executable, __file__, "--poll-health", url],
                              stdout=subprocess.PIPE, text=True)
    await asyncio.sleep(1.0)
    t0 = time.perf_counter()
    results = await asyncio.gather(*(raw_request(server.port, r) for r in reqs),
                                   return_exceptions=True)
    wall = time.perf_counter() - t0
    poller.send_signal(signal.SIGINT)
    out, _ = poller.communicate(timeout=30)
    health = [float(x) for x in out.split()]
    statuses: dict[str, int] = {}
    reject = []
    errors = 0
    for r in results:
        if isinstance(r, BaseException):
            errors += 1
            continue
        status, head = r
        statuses[str(status)] = statuses.get(str(status), 0) + 1
        if status in (400, 408, 413, 429, 503):
            reject.append(head)
    return {"requests": n, "wall_s": round(wall, 2), "statuses": statuses,
            "5xx": sum(v for k, v in statuses.items() if k.startswith("5") and k != "503"),
            "client_errors": errors,
            "rejection_ms": {"n": len(reject), "p50": ms(pct(reject, 50)),
                             "p99": ms(pct(reject, 99)), "max": ms(max(reject, default=None))},
            "server_response_start_ms": {
                cls: bucket_quantiles(b, before.get(cls))
                for cls, b in server.response_start().items() if cls != "2xx"},
            "health_ms": {"n": len(health), "p50": ms(pct(health, 50)),
                          "p99": ms(pct(health, 99)), "max": ms(max(health, default=None))}}


async def soak(server: Server, n: int, concurrency: int, seed: int) -> dict:
    rng = random.Random(seed)
    gate = asyncio.Semaphore(concurrency)
    statuses: dict[str, dict[str, int]] = {}
    rss = [round(server.rss(), 1)]
    done = 0
    errors = 0
    limits = httpx.Limits(max_connections=concurrency + 10,
                          max_keepalive_connections=concurrency + 10)

    async def run(http, kind, job) -> None:
        nonlocal done, errors
        async with gate:
            try:
                status, _ = await job(http)
            except httpx.HTTPError:
                errors += 1
                status = -1
        per = statuses.setdefault(kind, {})
        per[str(status)] = per.get(str(status), 0) + 1
        done += 1
        if done % 1000 == 0:
            rss.append(round(server.rss(), 1))

    t0 = time.perf_counter()
    async with httpx.AsyncClient(base_url=server.url, timeout=600, limits=limits) as http:
        batch = []
        for i in range(n):
            kind, job = one_request(rng, i, cancel_rate=0.2, bad_rate=0.1)
            batch.append(run(http, kind, job))
            if len(batch) >= 2000:  # bounded client memory
                await asyncio.gather(*batch)
                batch = []
        await asyncio.gather(*batch)
    wall = time.perf_counter() - t0
    await asyncio.sleep(1.0)  # aborts land between engine steps
    fivexx = sum(v for per in statuses.values() for k, v in per.items()
                 if k.startswith("5") and k != "503")
    return {"requests": n, "concurrency": concurrency, "wall_s": round(wall, 1),
            "statuses": statuses, "5xx": fivexx, "client_errors": errors,
            "rss_mb_every_1000": rss, "gauges_after": server.gauges()}


def poll_health(url: str) -> None:
    """Until SIGINT: GET /health every 20 ms; print each latency (s) at the end."""
    lat: list[float] = []
    try:
        with httpx.Client(base_url=url, timeout=60) as h:
            while True:
                t0 = time.perf_counter()
                r = h.get("/health")
                lat.append(time.perf_counter() - t0)
                if r.status_code != 200:
                    lat.append(float("inf"))
                time.sleep(0.02)
    except KeyboardInterrupt:
        pass
    print(" ".join(f"{x:.6f}" for x in lat), flush=True)


def main() -> int:
    if len(sys.argv) == 3 and sys.argv[1] == "--poll-health":
        poll_health(sys.argv[2])
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=str(ROOT.parent / "shared" / "models" /
                                           "tinymoe-stories"))
    ap.add_argument("--burst", type=int, default=500)
    ap.add_argument("--soak", type=int, default=10_000)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="also write the report here")
    ap.add_argument("serve_args", nargs="*", help="extra `sparsa serve` flags (after --)")
    args = ap.parse_args()
    server = Server(args.model, ["--threads", "1", *args.serve_args])
    report: dict = {"model": args.model, "serve_args": args.serve_args,
                    "cpu": _cpu(), "date": time.strftime("%Y-%m-%d")}
    try:
        report["rss_mb_start"] = round(server.rss(), 1)
        if args.burst:
            report["burst"] = asyncio.run(burst(server, args.burst, args.seed))
            time.sleep(2)
            report["burst"]["rss_mb_after"] = round(server.rss(), 1)
            report["burst"]["gauges_after"] = server.gauges()
        if args.soak:
            report["soak"] = asyncio.run(soak(server, args.soak, args.concurrency, args.seed))
        report["rss_mb_end"] = round(server.rss(), 1)
    finally:
        server.stop()
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(text)
    bad = report.get("burst", {}).get("5xx", 0) + report.get("soak", {}).get("5xx", 0)
    return 1 if bad else 0


def _cpu() -> str:
    sys.path.insert(0, str(ROOT))
    from sparsa.kernels.cpu import cpu_info

    return str(cpu_info().get("model", "unknown"))


if __name__ == "__main__":
    sys.exit(main())
