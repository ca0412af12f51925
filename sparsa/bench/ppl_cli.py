"""`sparsa eval-ppl`: perplexity of a model on a text file, once per weight format."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

from sparsa.bench.ppl import compare_quantizations, format_table
from sparsa.config.settings import add_model_argument

METHODS = ("auto", "none", "int8", "int8-exact", "int4", "bf16", "bf16-prefill")


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
                   help="comma-separated weight formats to compare (auto, none, int8, "
                        "int8-exact, int4, bf16, bf16-prefill; auto leaves the form unset: a "
                        "GGUF file's own form; none is full precision; int8-exact keeps "
                        "activations exact in batched matmuls, bf16-prefill runs prefill "
                        "GEMMs in bf16)")
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
    bad = [m for m in methods if m not in METHODS]
    if not methods or bad:
        raise ValueError(f"--methods takes {', '.join(METHODS)}; got {args.methods!r}")
    results = compare_quantizations(
        args.model, args.text, methods, text_slice=args.text_slice, mode=args.mode,
        context_len=args.context_len, max_windows=args.max_windows,
        group_size=base.pop("quantization_group_size", 64), num_threads=threads,
        settings=base, protocol=args.protocol)
    return _show(results, args)


def _show(results: list, args: argparse.Namespace) -> int:
    print(format_table(results))
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
