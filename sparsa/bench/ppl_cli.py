"""`sparsa eval-ppl`: perplexity of a model on a text file, once per weight format."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

from sparsa.bench.methods import WEIGHT_FORMS
from sparsa.bench.ppl import compare_methods, format_table, plot_methods
from sparsa.config.settings import add_model_argument


def add_parser(sub, add_common: Callable, add_model_options: Callable) -> None:
    p = sub.add_parser(
        "eval-ppl", help="perplexity on a text file (compare fp32, int8, int4)",
        description="Score a text file with the model once per weight format and print the "
                    "perplexity of each beside the first.")
    add_common(p)
    add_model_argument(p)
    p.add_argument("--text", required=True, help="UTF-8 text file to score")
    p.add_argument("--slice", default="0:1", dest="text_slice",
                   help="fraction of the text's characters to score, e.g. 0.9:1 (last 10%%)")
    p.add_argument("--mode", default="blocks", choices=["blocks", "stream"],
                   help="blocks: score each blank-line-separated block on its own (default); "
                        "stream: the whole text as one document")
    p.add_argument("--methods", default="none,int8,int4",
                   help="comma-separated methods to compare, each a weight form ("
                        + ", ".join(WEIGHT_FORMS) + "; auto leaves the form unset: a GGUF "
                        "file's own form; none is full precision; int8-exact keeps "
                        "activations exact in batched matmuls, bf16-prefill runs prefill "
                        "GEMMs in bf16) and/or lossy settings joined by '+': dynamic "
                        "routing top_p=P, skip=T (skip_threshold), k=N (max_k), min_k=N, "
                        "layer_k=2/1/1/2, no-renorm; expert pruning / merging prune=F, "
                        "merge=F (a fraction of each layer's experts; --calibration) with "
                        "prune.KEY=V / merge.KEY=V; e.g. none,top_p=0.8,int4+skip=0.3")
    p.add_argument("--decode-tokens", type=int, default=0,
                   help="also time this many greedy batch-1 decode tokens per method")
    p.add_argument("--plot", default=None, metavar="PNG",
                   help="write perplexity against bytes per token (and tok/s) here")
    p.add_argument("--on-miss", default="wait,int4,int8",
                   help="with --expert-memory (then the on-miss handlings are compared instead "
                        "of weight formats): comma-separated wait, int4, int8 (compute a miss "
                        "with that low-precision copy)")
    p.add_argument("--protocol", default="all", choices=["all", "llamacpp"],
                   help="all: every token scored, windows overlapping by one; llamacpp: "
                        "llama-perplexity's chunks (BOS first, second half scored)")
    p.add_argument("--context-len", type=int, default=None,
                   help="tokens per scored window (default: the model's context)")
    p.add_argument("--max-windows", type=int, default=None, help="score at most N windows")
    p.add_argument("--calibration", default=None, metavar="TEXT",
                   help="text file prune=F / merge=F methods record expert routing on (keep "
                        "it disjoint from the scored text); required by those methods")
    p.add_argument("--json", dest="json_out", default=None, help="also write results here")
    add_model_options(p)  # the engine's settings, shared by every load compared
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from sparsa.config import engine_kwargs

    base = engine_kwargs(args)
    threads = base.pop("num_threads", None)
    if base.get("expert_memory") is not None:
        from sparsa.bench.ppl import compare_offload
        from sparsa.offload.low_precision import parse_on_miss

        results = compare_offload(
            args.model, args.text, base.pop("expert_memory"), parse_on_miss(args.on_miss),
            text_slice=args.text_slice, mode=args.mode, context_len=args.context_len,
            max_windows=args.max_windows, policy=base.pop("offload_policy", "lru"),
            num_threads=threads, settings=base)
        return _show(results, args)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not methods:
        raise ValueError(f"--methods names no method; got {args.methods!r}")
    from sparsa.bench.methods import parse_method

    for m in methods:  # every method checked before the first load
        try:
            parse_method(m, calibration=args.calibration)
        except ValueError as e:
            raise ValueError(f"--methods: {e}") from None
    if args.decode_tokens < 0:
        raise ValueError(f"--decode-tokens must be >= 0; got {args.decode_tokens}")
    results = compare_methods(
        args.model, args.text, methods, text_slice=args.text_slice, mode=args.mode,
        context_len=args.context_len, max_windows=args.max_windows,
        group_size=base.pop("quantization_group_size", 64), num_threads=threads,
        settings=base, protocol=args.protocol, decode_tokens=args.decode_tokens,
        calibration=args.calibration)
    return _show(results, args)


def _show(results: list, args: argparse.Namespace) -> int:
    print(format_table(results))
    if getattr(args, "plot", None):
        plot_methods(results, args.plot)
        print(f"plot: {args.plot}")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps([r.as_dict() for r in results], indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    """`sparsa bench ppl ...` (the same as `sparsa eval-ppl ...`)."""
    parser = argparse.ArgumentParser(prog="sparsa bench")
    sub = parser.add_subparsers(dest="command", required=True)
    from sparsa.config import add_engine_arguments

    add_parser(sub, lambda p: None, add_engine_arguments)
    args = parser.parse_args(["eval-ppl", *(argv or [])])
    return args.func(args)
