"""The serving load generator's core: requests (random or shared-prefix prompts), sending
them with streaming, and vLLM's benchmark_serving metrics (serve.py is its command line)."""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

_WORD_TEXT = ("the of and to in is was that for it with as his on be at by had are but from or "
         "have an they which one you were her all she there would their we him been has "
         "when who will more no if out so said what up its about into than them can only "
         "other new some could time these two may then do first any my now such like our "
         "over man me even most made after also did many before must through back years "
         "where much your way well down should because each just those people how too "
         "little state good very make world still own see men work long get here between "
         "both life being under never day same another know while last might us great old "
         "year off come since against go came right used take three")
WORDS = _WORD_TEXT.split()


@dataclass
class BenchRequest:
    prompt: str | list[int]
    prompt_len: int  # tokens when known exactly (ids), else an estimate (words)
    output_len: int


@dataclass
class RequestResult:
    success: bool = False
    error: str = ""
    ttft: float = 0.0
    latency: float = 0.0
    itl: list[float] = field(default_factory=list)
    output_tokens: int = 0
    prompt_tokens: int = 0
    text: str = ""


# ---- workloads ---------------------------------------------------------------------------


def _random_prompt(rng: random.Random, n: int, ids: bool, vocab: tuple[int, int]):
    if ids:
        return [rng.randrange(*vocab) for _ in range(n)]
    return " ".join(rng.choice(WORDS) for _ in range(n))


def make_requests(args: argparse.Namespace) -> list[BenchRequest]:
    """`random`: independent prompts of --input-len (+- --range-ratio). `shared-prefix`:
    --num-prefixes system prompts of --prefix-len, each request one of them plus its own
    --input-len suffix. Lengths are tokens with --prompt-ids, else words."""
    rng = random.Random(args.seed)
    vocab = (args.min_token_id, args.vocab_size)
    ids = args.prompt_ids
    prefixes = [_random_prompt(rng, args.prefix_len, ids, vocab)
                for _ in range(args.num_prefixes)] if args.dataset == "shared-prefix" else []
    out = []
    for _ in range(args.num_prompts):
        r = args.range_ratio
        n_in = max(1, round(args.input_len * rng.uniform(1 - r, 1 + r)))
        n_out = max(1, round(args.output_len * rng.uniform(1 - r, 1 + r)))
        body = _random_prompt(rng, n_in, ids, vocab)
        if prefixes:
            pre = rng.choice(prefixes)
            body = pre + body if ids else f"{pre} {body}"
            n_in += args.prefix_len
        out.append(BenchRequest(body, n_in, n_out))
    return out


# ---- one request -------------------------------------------------------------------------


async def send_request(http: Any, args: argparse.Namespace, req: BenchRequest
                       ) -> RequestResult:
    res = RequestResult(prompt_tokens=req.prompt_len)
    body: dict[str, Any] = {"model": args.model, "max_tokens": req.output_len, "stream": True,
                            "stream_options": {"include_usage": True},
                            "temperature": args.temperature}
    if args.ignore_eos:
        body["ignore_eos"] = True
    if args.endpoint == "chat":
        body["messages"] = [{"role": "user", "content": req.prompt}]
        path = "/v1/chat/completions"
    else:
        body["prompt"] = req.prompt
        path = "/v1/completions"
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    start = time.perf_counter()
    last = start
    chunks = 0
    try:
        async with http.stream("POST", args.base_url.rstrip("/") + path, json=body,
                               headers=headers) as r:
            if r.status_code != 200:
                res.error = f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
                return res
            async for line in r.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    res.error = str(chunk["error"])[:200]
                    return res
                if chunk.get("usage"):
                    res.output_tokens = chunk["usage"].get("completion_tokens", 0)
                    res.prompt_tokens = chunk["usage"].get("prompt_tokens", req.prompt_len)
                for c in chunk.get("choices", []):
                    piece = c.get("text") if args.endpoint != "chat" else \
                        (c.get("delta") or {}).get("content")
                    if not piece:
                        continue
                    now = time.perf_counter()
                    if chunks == 0:
                        res.ttft = now - start
                    else:
                        res.itl.append(now - last)
                    last = now
                    chunks += 1
                    res.text += piece
    except Exception as e:  # a failed request is a data point, not a crash
        res.error = f"{type(e).__name__}: {e}"
        return res
    res.latency = time.perf_counter() - start
    res.output_tokens = res.output_tokens or chunks  # servers without usage: 1 per chunk
    res.success = chunks > 0
    if not res.success:
        res.error = "no text streamed"
    return res


# ---- the run -----------------------------------------------------------------------------


async def run_benchmark(args: argparse.Namespace, requests: list[BenchRequest]
                        ) -> tuple[list[RequestResult], float]:
    import httpx
    from tqdm import tqdm

    rng = np.random.default_rng(args.seed)
    sem = asyncio.Semaphore(args.max_concurrency) if args.max_concurrency else None
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    # completed requests, as vLLM's benchmark_serving shows them
    bar = tqdm(total=len(requests), desc="Requests", unit=" req", disable=None, leave=False)

    async def limited(http, req):
        try:
            if sem is None:
                return await send_request(http, args, req)
            async with sem:
                return await send_request(http, args, req)
        finally:
            bar.update(1)

    with bar:
        async with httpx.AsyncClient(timeout=httpx.Timeout(args.timeout),
                                     limits=limits) as http:
            start = time.perf_counter()
            tasks = []
            for req in requests:
                tasks.append(asyncio.create_task(limited(http, req)))
                if math.isfinite(args.request_rate):
                    # Poisson arrivals: exponential gaps with mean 1/rate
                    await asyncio.sleep(float(rng.exponential(1.0 / args.request_rate)))
            results = await asyncio.gather(*tasks)
            duration = time.perf_counter() - start
    return list(results), duration


def _stats(values: list[float], prefix: str, scale: float = 1000.0) -> dict[str, float]:
    a = np.asarray(values, dtype=float) * scale if values else np.zeros(1)
    return {f"mean_{prefix}_ms": float(a.mean()), f"median_{prefix}_ms": float(np.median(a)),
            f"p99_{prefix}_ms": float(np.percentile(a, 99))}


def parse_slos(specs: list[str] | None) -> dict[str, float]:
    slos = {}
    for spec in specs or []:
        key, _, val = spec.partition(":")
        if key not in ("ttft", "tpot", "e2el") or not val:
            raise ValueError(f"--goodput takes ttft:MS, tpot:MS or e2el:MS, got {spec!r}")
        slos[key] = float(val) / 1000.0
    return slos


def summarize(results: list[RequestResult], duration: float,
              slos: dict[str, float] | None = None) -> dict[str, Any]:
    ok = [r for r in results if r.success]
    tpots = [(r.latency - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    out_tokens = sum(r.output_tokens for r in ok)
    in_tokens = sum(r.prompt_tokens for r in ok)
    good = 0
    for r in ok:
        tpot = (r.latency - r.ttft) / (r.output_tokens - 1) if r.output_tokens > 1 else 0.0
        vals = {"ttft": r.ttft, "tpot": tpot, "e2el": r.latency}
        good += all(vals[k] <= v for k, v in (slos or {}).items())
    m: dict[str, Any] = {
        "completed": len(ok), "failed": len(results) - len(ok), "duration_s": duration,
        "total_input_tokens": in_tokens, "total_output_tokens": out_tokens,
        "request_throughput": len(ok) / duration,
        "output_throughput": out_tokens / duration,
        "total_token_throughput": (in_tokens + out_tokens) / duration,
    }
    if slos:
        m["goodput"] = good / duration
        m["slos_ms"] = {k: v * 1000 for k, v in slos.items()}
    m.update(_stats([r.ttft for r in ok], "ttft"))
    m.update(_stats(tpots, "tpot"))
    m.update(_stats([x for r in ok for x in r.itl], "itl"))
    m.update(_stats([r.latency for r in ok], "e2el"))
    errors = sorted({r.error for r in results if not r.success})
    if errors:
        m["errors"] = errors[:5]
    return m


def print_report(m: dict[str, Any], title: str = "Serving benchmark") -> None:
    print(f"{'=' * 18} {title} {'=' * 18}")
    for k, v in m.items():
        if isinstance(v, float):
            print(f"{k:<28}{v:>14.2f}")
        else:
            print(f"{k:<28}{v!s:>14}")


# ---- command line ------------------------------------------------------------------------


def add_load_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base-url", default="http://127.0.0.1:8000")
    p.add_argument("--model", default=None, help="model id to send (default: the first of "
                                                 "/v1/models)")
    p.add_argument("--api-key", default=None)
    p.add_argument("--endpoint", choices=["completions", "chat"], default="completions")
    p.add_argument("--dataset", choices=["random", "shared-prefix"], default="random")
    p.add_argument("--num-prompts", type=int, default=100)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--range-ratio", type=float, default=0.0,
                   help="lengths drawn uniformly in len*(1 +- ratio)")
    p.add_argument("--prefix-len", type=int, default=512, help="shared-prefix length")
    p.add_argument("--num-prefixes", type=int, default=1)
    p.add_argument("--prompt-ids", action="store_true",
                   help="send prompts as token ids (exact lengths; completions only)")
    p.add_argument("--vocab-size", type=int, default=32000, help="for --prompt-ids")
    p.add_argument("--min-token-id", type=int, default=3, help="for --prompt-ids")
    p.add_argument("--request-rate", type=float, default=math.inf,
                   help="Poisson arrival rate in requests/s (default inf: all at once)")
    p.add_argument("--max-concurrency", type=int, default=None,
                   help="at most this many requests in flight")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--no-ignore-eos", dest="ignore_eos", action="store_false",
                   help="don't send vLLM's ignore_eos (for servers that reject it)")
    p.add_argument("--goodput", nargs="*", metavar="KEY:MS",
                   help="SLOs for goodput, e.g. ttft:500 tpot:100 e2el:5000")
    p.add_argument("--timeout", type=float, default=600.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--result-json", default=None, help="write the metrics here")
