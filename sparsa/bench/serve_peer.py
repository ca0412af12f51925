"""`sparsa bench serve --vs-llamacpp MODEL`: Sparsa's server and llama.cpp's server on the
same weights and the same request stream, at one or more Poisson request rates.

Both servers run as their own processes (the load generator never shares a GIL with an
engine), one after the other on the same cores, with the same thread count and the same
number of concurrent sequences. MODEL is an HF checkpoint directory or a built-in config
name (dummy weights written once, as `sparsa bench` does); llama.cpp gets the GGUF of equal
bits that its own converter writes (`-q int8` -> Q8_0, `-q int4` -> Q4_K_M, none -> F32).

Prompts are token ids, so both engines see exactly the same prompt lengths; every request
ignores EOS and produces its full output length. Each rate gets its own prompts (seed + i),
the same for both engines. Metrics and goodput are vLLM's (see
`sparsa.bench.serve`); the ratio printed is Sparsa / llama.cpp per rate.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ENGINES = ("sparsa", "llama.cpp")
# reported side by side; higher is better for the first three
COMPARED = ("goodput", "request_throughput", "output_throughput", "median_ttft_ms",
            "median_tpot_ms", "p99_e2el_ms")


def add_peer_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("Sparsa vs llama.cpp's server (with --vs-llamacpp MODEL)")
    g.add_argument("--vs-llamacpp", metavar="MODEL", default=None,
                   help="serve MODEL with Sparsa and with llama-server in turn and compare")
    g.add_argument("--request-rates", default="0.25,0.5",
                   help="comma-separated Poisson rates (requests/s), one run each")
    g.add_argument("--parallel", type=int, default=16,
                   help="sequences in flight: Sparsa's --max-num-seqs, llama-server's -np")
    g.add_argument("--engines", default=",".join(ENGINES),
                   help="which servers to run (default both)")
    g.add_argument("--bench-cache-dir", default=str(Path.home() / ".cache" / "sparsa" / "bench"),
                   help="where built-in config names get their dummy checkpoint")


def _rates(spec: str) -> list[float]:
    try:
        rates = [float(x) for x in spec.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--request-rates takes numbers like 0.25,0.5; got {spec!r}") from None
    if not rates or any(r <= 0 for r in rates):
        raise ValueError(f"--request-rates must be positive numbers; got {spec!r}")
    return rates


def resolve_model(spec: str, cache_dir: str) -> Path:
    """An existing directory as is; a built-in config name -> its dummy checkpoint."""
    path = Path(spec)
    if path.is_dir():
        return path
    from sparsa.bench.weights import ensure_checkpoint

    return ensure_checkpoint(spec, Path(cache_dir))


@contextmanager
def sparsa_server(model: Path, args: argparse.Namespace, ctx: int) -> Iterator[str]:
    """`sparsa serve` in a child process on a free loopback port."""
    from sparsa.bench.peers.llamacpp import free_port, serving_process
    from sparsa.config import engine_argv, engine_kwargs

    port = free_port()
    cmd = [sys.executable, "-m", "sparsa.cli", "serve", str(model), "--port", str(port),
           "--dtype", "float32", "--max-num-seqs", str(args.parallel),
           "--max-model-len", str(ctx), "--log-level", "warning", "--served-model-name", "bench",
           "--max-waiting", str(max(256, args.num_prompts)), "--kv-cache-memory", "2GiB"]
    # the settings given to this benchmark, as flags (its own choices above win)
    given = {k: v for k, v in engine_kwargs(args).items()
             if k not in ("dtype", "max_num_seqs", "max_model_len", "kv_cache_memory")}
    cmd += engine_argv(given)
    with serving_process(cmd, port, timeout=900, name="sparsa serve") as base:
        yield base


@contextmanager
def llamacpp_server(model: Path, args: argparse.Namespace, ctx: int) -> Iterator[str]:
    from sparsa.bench.peers.llamacpp import LlamaCpp, default_cache
    from sparsa.config import physical_cores

    lc = LlamaCpp(default_cache())
    lc.ensure_installed()
    gguf = lc.convert(model, args.quantization)
    with lc.server(gguf, args.num_threads or physical_cores(), args.parallel, ctx) as base:
        yield base


def _load(args: argparse.Namespace, base: str, vocab: int, rate: float | None,
          num_prompts: int | None = None, seed: int | None = None) -> argparse.Namespace:
    w = copy.copy(args)
    w.base_url, w.model, w.api_key, w.endpoint = base, "bench", None, "completions"
    w.prompt_ids, w.vocab_size, w.temperature, w.ignore_eos = True, vocab, 0.0, True
    w.request_rate = rate if rate is not None else float("inf")
    if num_prompts is not None:
        w.num_prompts = num_prompts
    if seed is not None:
        w.seed = seed
    return w


def run_engine(name: str, model: Path, args: argparse.Namespace, rates: list[float],
               slos: dict[str, float], vocab: int, ctx: int) -> dict[float, dict[str, Any]]:
    from sparsa.bench.loadgen import make_requests, print_report, run_benchmark, summarize

    server = sparsa_server if name == "sparsa" else llamacpp_server
    out: dict[float, dict[str, Any]] = {}
    with server(model, args, ctx) as base:
        # warm-up (first calls, thread pools), not measured
        warm = _load(args, base, vocab, None, num_prompts=2, seed=args.seed + 999)
        warm.max_concurrency = 1
        asyncio.run(run_benchmark(warm, make_requests(warm)))
        for i, rate in enumerate(rates):
            # fresh prompts per rate (same across engines): a repeated prompt would be served
            # from either engine's prompt cache and flatter every rate after the first
            w = _load(args, base, vocab, rate, seed=args.seed + i)
            results, duration = asyncio.run(run_benchmark(w, make_requests(w)))
            m = summarize(results, duration, slos)
            print_report(m, f"{name}, {rate:g} req/s")
            out[rate] = m
    return out


def format_comparison(report: dict[str, dict[float, dict[str, Any]]]) -> str:
    rows = ["| rate (req/s) | metric | Sparsa | llama.cpp | Sparsa / llama.cpp |",
            "|---|---|---|---|---|"]
    rates = sorted({r for runs in report.values() for r in runs})
    for rate in rates:
        for key in COMPARED:
            a = report.get("sparsa", {}).get(rate, {}).get(key)
            b = report.get("llama.cpp", {}).get(rate, {}).get(key)
            if a is None and b is None:
                continue
            ratio = f"{a / b:.2f}x" if a is not None and b else "-"
            fa = "-" if a is None else f"{a:.2f}"
            fb = "-" if b is None else f"{b:.2f}"
            rows.append(f"| {rate:g} | {key} | {fa} | {fb} | {ratio} |")
    return "\n".join(rows)


def run_peer_bench(args: argparse.Namespace, slos: dict[str, float]) -> int:
    from transformers import AutoConfig

    rates = _rates(args.request_rates)
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    bad = [e for e in engines if e not in ENGINES]
    if bad:
        raise ValueError(f"unknown engine(s) {bad}; choose from {list(ENGINES)}")
    model = resolve_model(args.vs_llamacpp, args.bench_cache_dir)
    vocab = AutoConfig.from_pretrained(model).vocab_size
    r = args.range_ratio
    ctx = int(args.input_len * (1 + r)) + int(args.output_len * (1 + r)) + 16
    report: dict[str, dict[float, dict[str, Any]]] = {}
    for name in engines:
        report[name] = run_engine(name, model, args, rates, slos, vocab, ctx)
    table = format_comparison(report)
    print(f"\nSparsa vs llama.cpp server, {model.name}, -q {args.quantization}, "
          f"{args.num_prompts} requests per rate, {args.parallel} in flight, "
          f"SLOs {slos or 'none'} ({time.strftime('%Y-%m-%d')})\n{table}")
    if args.result_json:
        with open(args.result_json, "w") as f:
            json.dump({"model": str(model), "quantization": args.quantization,
                       "slos_ms": {k: v * 1000 for k, v in slos.items()},
                       "runs": {n: {str(k): v for k, v in runs.items()}
                                for n, runs in report.items()}}, f, indent=2, default=str)
    ok = all(m["completed"] for runs in report.values() for m in runs.values())
    return 0 if ok else 1
