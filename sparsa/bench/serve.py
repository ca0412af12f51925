"""`sparsa bench serve`: a load generator for any OpenAI-compatible server (Sparsa, vLLM,
llama.cpp's server, ...).

    sparsa bench serve --base-url http://127.0.0.1:8000 --model M --num-prompts 200 \\
        --request-rate 4 --dataset shared-prefix --prefix-len 512 --input-len 64
    sparsa bench serve --prefix-cache-ab MODEL     # Sparsa itself, prefix caching on vs off
    sparsa bench serve --vs-llamacpp mixtral-mini -q int8 --request-rates 0.25,0.5 \\
        --goodput ttft:5000 tpot:500             # Sparsa's server vs llama-server

Requests stream (SSE). Metrics follow vLLM's benchmark_serving: TTFT is the time to the
first chunk with text; TPOT per request is (e2e - ttft) / (output_tokens - 1); ITL is every
gap between consecutive streamed chunks; E2EL is the whole request. Goodput counts the
requests per second that meet every SLO given with --goodput (ms).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys

from sparsa.bench.loadgen import (  # re-exported: the load generator's core
    BenchRequest,
    RequestResult,
    add_load_arguments,
    make_requests,
    parse_slos,
    print_report,
    run_benchmark,
    summarize,
)
from sparsa.config import resolve_engine_args


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sparsa bench serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_load_arguments(p)
    p.add_argument("--prefix-cache-ab", metavar="MODEL", default=None,
                   help="start Sparsa servers for MODEL with prefix caching on and off and "
                        "compare TTFT on a shared-prefix workload")
    from sparsa.bench.serve_peer import add_peer_arguments
    from sparsa.bench.serve_prefix import add_ab_arguments

    add_ab_arguments(p)
    add_peer_arguments(p)
    from sparsa.config import add_engine_arguments

    # the engine's settings for the Sparsa servers these modes start (the A/B's and
    # --vs-llamacpp's); the peer comparison defaults to int8, the A/B to a 1,024 context
    # (--seed is the workload's: the engine's seed only draws dummy weights)
    add_engine_arguments(p, defaults={"quantization": "int8", "max_model_len": 1024},
                         exclude=("seed",))
    return p


def _first_model(base_url: str, api_key: str | None) -> str:
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    r = httpx.get(base_url.rstrip("/") + "/v1/models", headers=headers, timeout=30)
    r.raise_for_status()
    return r.json()["data"][0]["id"]


def main(argv: list[str] | None = None) -> int:
    try:
        args = resolve_engine_args(build_parser().parse_args(argv))
    except SystemExit as e:  # --help or a usage error: a status, not an exit of the caller
        return e.code if isinstance(e.code, int) else 2
    try:
        slos = parse_slos(args.goodput)
    except ValueError as e:
        print(f"sparsa bench serve: error: {e}", file=sys.stderr)
        return 2
    if args.prefix_cache_ab:
        from sparsa.bench.serve_prefix import run_ab

        return run_ab(args, slos)
    if args.vs_llamacpp:
        from sparsa.bench.serve_peer import run_peer_bench

        try:
            return run_peer_bench(args, slos)
        except ValueError as e:
            print(f"sparsa bench serve: error: {e}", file=sys.stderr)
            return 2
    args.model = args.model or _first_model(args.base_url, args.api_key)
    requests = make_requests(args)
    results, duration = asyncio.run(run_benchmark(args, requests))
    m = summarize(results, duration, slos)
    m["config"] = {k: v for k, v in vars(args).items() if k not in ("api_key",)
                   and isinstance(v, (int, float, str, bool, type(None), list))}
    print_report({k: v for k, v in m.items() if k != "config"})
    if args.result_json:
        with open(args.result_json, "w") as f:
            json.dump(m, f, indent=2, default=str)
    return 0 if m["completed"] else 1


if __name__ == "__main__":
    raise SystemExit(main())


__all__ = ["BenchRequest", "RequestResult", "main", "make_requests",
           "run_benchmark", "summarize"]
