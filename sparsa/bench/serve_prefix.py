"""`sparsa bench serve --prefix-cache-ab MODEL`: one Sparsa server, the same shared-prefix
workload run with prefix caching on and then off; reports TTFT p50 of both and whether
the greedy outputs are identical.

One engine serves both runs (only the block manager's switch flips between them, with
the cache emptied), so both see the same weights, threads and warm-up.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import socket
import threading
import time
from typing import Any


def add_ab_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("prefix-cache A/B (with --prefix-cache-ab MODEL)")
    g.add_argument("--ab-num-prompts", type=int, default=16)
    g.add_argument("--ab-suffix-len", type=int, default=32,
                   help="tokens each request adds after the shared prefix")
    g.add_argument("--ab-output-len", type=int, default=8)


class _Server:
    def __init__(self, app):
        import uvicorn

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port,
                                                    log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> _Server:
        self.thread.start()
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError("server failed to start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def _build(args: argparse.Namespace):
    from sparsa.config import engine_config, engine_kwargs
    from sparsa.engine.llm_engine import LLMEngine
    from sparsa.server.app import build_app
    from sparsa.server.settings import ServerSettings

    engine = LLMEngine(engine_config(args.prefix_cache_ab, **{
        **engine_kwargs(args), "enable_prefix_caching": True, "device": "cpu"}))
    return build_app(engine, ServerSettings(model_name="ab")), engine


def run_ab(args: argparse.Namespace, slos: dict[str, float]) -> int:
    from sparsa.bench.loadgen import make_requests, print_report, run_benchmark, summarize

    app, engine = _build(args)
    w = copy.copy(args)
    w.model, w.api_key, w.endpoint = "ab", None, "completions"
    w.dataset, w.prompt_ids, w.num_prefixes = "shared-prefix", True, 1
    w.vocab_size = engine.hf_config.vocab_size
    w.num_prompts, w.input_len, w.output_len = (args.ab_num_prompts, args.ab_suffix_len,
                                                args.ab_output_len)
    w.temperature, w.ignore_eos = 0.0, True
    if w.max_concurrency is None and w.request_rate == float("inf"):
        w.max_concurrency = 1  # sequential: TTFT is the prefill itself, not queueing
    w.num_prompts += 2
    requests = make_requests(w)  # all share one prefix; the first two only warm up
    warm_requests, requests = requests[:2], requests[2:]
    w.num_prompts -= 2
    bm = engine.block_manager
    report: dict[str, Any] = {}
    texts: dict[str, list[str]] = {}
    with _Server(app) as srv:
        w.base_url = srv.url
        for mode in ("on", "off"):
            bm.reset_prefix_cache()
            bm.enable_prefix_caching = mode == "on"
            # warm-up: torch's first calls, and (caching on) the shared prefix in the cache
            asyncio.run(run_benchmark(w, warm_requests))
            q0, h0 = bm.prefix_query_tokens, bm.prefix_hit_tokens
            results, duration = asyncio.run(run_benchmark(w, requests))
            m = summarize(results, duration, slos)
            q, h = bm.prefix_query_tokens - q0, bm.prefix_hit_tokens - h0
            m["prefix_cache_hit_rate"] = h / q if q else 0.0
            print_report(m, f"prefix caching {mode}")
            report[mode] = m
            texts[mode] = [r.text for r in results]
    bm.enable_prefix_caching = True
    on, off = report["on"], report["off"]
    ratio = off["median_ttft_ms"] / max(on["median_ttft_ms"], 1e-9)
    same = texts["on"] == texts["off"] and all(texts["on"])
    summary = {"model": args.prefix_cache_ab, "prefix_len": w.prefix_len,
               "suffix_len": w.input_len, "output_len": w.output_len,
               "num_prompts": w.num_prompts, "max_concurrency": w.max_concurrency,
               "request_rate": w.request_rate,
               "ttft_p50_ms_on": on["median_ttft_ms"], "ttft_p50_ms_off": off["median_ttft_ms"],
               "ttft_p50_speedup": ratio, "greedy_outputs_identical": same,
               "on": on, "off": off}
    print(f"TTFT p50: {on['median_ttft_ms']:.1f} ms with prefix caching, "
          f"{off['median_ttft_ms']:.1f} ms without: {ratio:.2f}x lower; "
          f"greedy outputs identical: {same}")
    if args.result_json:
        with open(args.result_json, "w") as f:
            json.dump(summary, f, indent=2, default=str)
    return 0 if same and on["completed"] == off["completed"] == w.num_prompts else 1
