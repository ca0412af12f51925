"""The `sparsa` command line: generate, info, bench and demo.

    sparsa generate MODEL --prompt "Once upon a time" --max-tokens 64 --temperature 0
    sparsa info MODEL [--json]
    sparsa bench ...            (forwarded to sparsa.bench when it is installed)
    sparsa demo

MODEL is a Hugging Face model directory, a llama2.c ``.bin`` file, or a built-in config name
(random weights). Bad input (a missing model, a malformed config, bad sampling values, a prompt
longer than the context) prints one line on stderr and exits with status 2; ``--debug`` shows
the traceback instead.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import logging
import math
import os
import re
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn

from sparsa.config import add_engine_arguments, config_from_args, engine_kwargs
from sparsa.config.settings import add_model_argument, model_from_args
from sparsa.extras import MissingExtra
from sparsa.offload.cli_options import positive_int
from sparsa.sampling_params import SamplingParams

__all__ = ["build_parser", "main"]

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2

# Exceptions that mean "the input was wrong" (exit 2), as opposed to an internal failure.
_USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError, KeyError,
                                                  MissingExtra)


class CLIError(Exception):
    """A usage error detected by the CLI itself (exit 2, one line on stderr)."""


class _Parser(argparse.ArgumentParser):
    """argparse, but errors are a single line (no usage dump) and never exit the caller's
    process on their own: main() turns the SystemExit into a return code."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


# ---- argument parsing ------------------------------------------------------------------------


def _token_ids(text: str) -> list[int]:
    parts = [p for p in text.replace(",", " ").split() if p]
    if not parts:
        raise argparse.ArgumentTypeError("expected comma-separated token ids, e.g. 1,2,3")
    try:
        return [int(p) for p in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integer token ids, got {text!r}") from None


def _add_common(p: argparse.ArgumentParser) -> None:
    # SUPPRESS, so a subcommand does not overwrite `sparsa --debug CMD` with its default
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                   help="show tracebacks instead of one-line errors")
    p.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                   help="log Sparsa's decisions (weight form, kernels, KV cache, offload "
                        "budget, threads) on stderr")


def _add_model_options(p: argparse.ArgumentParser, **kw: Any) -> None:
    """Every engine setting as a flag (generated from the config fields)."""
    add_engine_arguments(p, **kw)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="sparsa", description="Sparsa: inference for MoE and dense LLMs.")
    from sparsa import __version__

    parser.add_argument("--version", action="version", version=f"sparsa {__version__}")
    _add_common(parser)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    g = sub.add_parser("generate", help="generate text (or token ids) from prompts",
                       description="Run LLM.generate (or LLM.chat with --chat) and print the "
                                   "outputs; a timing line goes to stderr.")
    _add_common(g)
    add_model_argument(g)
    g.add_argument("--prompt", dest="prompts", action="append", metavar="TEXT",
                   help="a text prompt (repeat for several); default: the BOS token alone")
    g.add_argument("--prompt-ids", dest="prompts", action="append", type=_token_ids,
                   metavar="IDS", help="a prompt as comma-separated token ids (repeatable)")
    g.add_argument("--chat", action="store_true",
                   help="treat each --prompt as a user message and apply the chat template")
    g.add_argument("--system", default=None, help="system message for --chat")
    g.add_argument("--chat-template", default=None,
                   help="Jinja chat template (a string, or a path to a file) for --chat")
    g.add_argument("--echo", action="store_true", help="print each prompt before its output")
    g.add_argument("--max-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0, help="0 or -1 disables")
    g.add_argument("--min-p", type=float, default=0.0)
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--presence-penalty", type=float, default=0.0)
    g.add_argument("--frequency-penalty", type=float, default=0.0)
    g.add_argument("--n", type=int, default=1, help="completions per prompt")
    g.add_argument("--stop", action="append", default=None, metavar="S",
                   help="stop string (repeatable)")
    g.add_argument("--stop-token-ids", type=_token_ids, default=None, metavar="IDS")
    g.add_argument("--ignore-eos", action="store_true")
    g.add_argument("--logprobs", type=int, default=None, metavar="N",
                   help="also return the top-N log-probabilities of each generated token")
    g.add_argument("--json", action="store_true",
                   help="print a JSON document with token ids, finish reasons and logprobs")
    g.add_argument("--no-stream", dest="stream", action="store_false",
                   help="print the text when it is complete (one prompt with one sample "
                        "streams its tokens as they come by default)")
    _add_model_options(g)

    i = sub.add_parser("info", help="parameters, active parameters, memory plan of a model",
                       description="Describe a model without loading its weights (it is built "
                                   "on the meta device).")
    _add_common(i)
    add_model_argument(i)
    i.add_argument("--json", action="store_true", help="print the raw numbers as JSON")
    _add_model_options(i, defaults={"device": "cpu"})

    sub.add_parser("bench", help="measuring tools: engines vs peers, serve, offload, kernels, "
                                 "ppl, ... (see sparsa/bench/__init__.py)",
                   add_help=False)

    d = sub.add_parser("demo", help="generate stories with the real shared models",
                       description="Greedy and sampled stories from stories260K (dense) and "
                                   "tinymoe-stories (MoE) in $SPARSA_SHARED or ../shared; "
                                   "a random-weight mixtral-mini when those are absent.")
    _add_common(d)
    d.add_argument("--max-tokens", type=positive_int, default=120)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--temperature", type=float, default=0.8)
    d.add_argument("--threads", type=positive_int, default=None)

    # Subcommands kept in their own modules: each module's add_parser(sub) registers one
    # parser with `set_defaults(func=...)`.
    for module in _EXTERNAL_COMMANDS:
        importlib.import_module(module).add_parser(sub, _add_common, _add_model_options)
    return parser


_EXTERNAL_COMMANDS = ["sparsa.chat_cli", "sparsa.bench.ppl_cli", "sparsa.server.cli",
                      "sparsa.offload.lab.cache_sim_cli", "sparsa.loader.dummy_writer_cli",
                      "sparsa.offload.lab.trace_cli", "sparsa.spec.train_draft",
                      "sparsa.compress.cli"]


# ---- helpers ---------------------------------------------------------------------------------


class _LogFormat(logging.Formatter):
    """`sparsa: message` for Sparsa's -v lines, `sparsa: warning: message` above INFO;
    another library's records carry its logger's name instead of `sparsa`."""

    def format(self, record: logging.LogRecord) -> str:
        who = "sparsa" if record.name.partition(".")[0] == "sparsa" else record.name
        level = "" if record.levelno <= logging.INFO else f"{record.levelname.lower()}: "
        return f"{who}: {level}{super().format(record)}"


@contextlib.contextmanager
def _log_levels(verbose: bool) -> Iterator[None]:
    """Sparsa's own decisions at INFO when verbose, and transformers at ERROR (WARNING when
    verbose): its INFO is a dump of every config it reads, noise next to our lines.
    Both are restored afterwards so in-process callers (tests, notebooks) keep theirs."""
    ours = logging.getLogger("sparsa")
    old_ours = ours.level
    ours.setLevel(logging.INFO if verbose else logging.WARNING)
    hf_logging: Any = None
    with contextlib.suppress(Exception):
        from transformers.utils import logging as hf_logging
    old_hf = hf_logging.get_verbosity() if hf_logging is not None else None
    if hf_logging is not None:
        hf_logging.set_verbosity(logging.WARNING if verbose else logging.ERROR)
    try:
        yield
    finally:
        ours.setLevel(old_ours)
        if hf_logging is not None:
            hf_logging.set_verbosity(old_hf)


def _finite(x: float | None) -> float | None:
    return x if x is not None and math.isfinite(x) else None


def _token_str(tokenizer: Any, tid: int) -> str | None:
    if tokenizer is None:
        return None
    try:
        return tokenizer.decode([tid])
    except Exception:
        return None


def _sampling_params(args: argparse.Namespace) -> SamplingParams:
    return SamplingParams(
        n=args.n, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
        min_p=args.min_p, repetition_penalty=args.repetition_penalty,
        presence_penalty=args.presence_penalty, frequency_penalty=args.frequency_penalty,
        seed=args.seed, stop=args.stop, stop_token_ids=args.stop_token_ids,
        max_tokens=args.max_tokens, ignore_eos=args.ignore_eos, logprobs=args.logprobs,
    )


def _make_llm(model: str, args: argparse.Namespace, **overrides: Any) -> Any:
    """An LLM from the settings given as flags (and the command's own overrides)."""
    from sparsa.llm import LLM

    return LLM(model, **{**engine_kwargs(args), **overrides})


def _usage_stats(outputs: list[Any], seconds: float) -> dict[str, Any]:
    n_prompt = sum(len(o.prompt_token_ids) for o in outputs)
    n_gen = sum(len(c.token_ids) for o in outputs for c in o.outputs)
    arrivals = [o.metrics["arrival_time"] for o in outputs if "arrival_time" in o.metrics]
    firsts = [o.metrics["first_token_time"] for o in outputs if "first_token_time" in o.metrics]
    ttft = (min(firsts) - min(arrivals)) if arrivals and firsts else None
    n_seqs = sum(len(o.outputs) for o in outputs)
    decode = None
    if ttft is not None and seconds > ttft and n_gen > n_seqs:
        decode = (n_gen - n_seqs) / (seconds - ttft)
    return {
        "prompt_tokens": n_prompt,
        "generated_tokens": n_gen,
        "seconds": seconds,
        "tokens_per_second": n_gen / seconds if seconds > 0 else None,
        "ttft_seconds": ttft,
        "decode_tokens_per_second": decode,
    }


def _timing_line(stats: dict[str, Any], load_seconds: float | None = None) -> str:
    tps = stats["tokens_per_second"]
    line = (f"[sparsa] {stats['prompt_tokens']} prompt tokens, {stats['generated_tokens']} "
            f"generated tokens in {stats['seconds']:.2f} s: "
            + (f"{tps:.1f} tok/s" if tps is not None else "- tok/s"))
    if stats["ttft_seconds"] is not None:
        line += f", TTFT {1000 * stats['ttft_seconds']:.0f} ms"
    if stats["decode_tokens_per_second"] is not None:
        line += f", decode {stats['decode_tokens_per_second']:.1f} tok/s"
    if load_seconds is not None:
        line += f" (model load {load_seconds:.1f} s)"
    return line


def _logprobs_json(entries: list[dict[int, float]] | None, chosen: list[int], top_n: int,
                   tokenizer: Any) -> list[dict[str, Any]] | None:
    if entries is None:
        return None
    out = []
    for tid, entry in zip(chosen, entries):
        ranked = sorted(entry.items(), key=lambda kv: -kv[1] if math.isfinite(kv[1]) else math.inf)
        out.append({
            "token_id": tid,
            "token": _token_str(tokenizer, tid),
            "logprob": _finite(entry.get(tid)),
            "top_logprobs": [
                {"token_id": t, "token": _token_str(tokenizer, t), "logprob": _finite(lp)}
                for t, lp in ranked[:top_n]
            ],
        })
    return out


def _outputs_json(outputs: list[Any], top_n: int, tokenizer: Any) -> list[dict[str, Any]]:
    results = []
    for o in outputs:
        results.append({
            "request_id": o.request_id,
            "prompt": o.prompt,
            "prompt_token_ids": list(o.prompt_token_ids),
            "outputs": [
                {
                    "index": c.index,
                    "text": c.text,
                    "token_ids": list(c.token_ids),
                    "finish_reason": c.finish_reason,
                    "stop_reason": c.stop_reason,
                    "cumulative_logprob": _finite(c.cumulative_logprob),
                    "logprobs": _logprobs_json(c.logprobs, c.token_ids, top_n, tokenizer),
                }
                for c in o.outputs
            ],
        })
    return results


def _print_text(outputs: list[Any], tokenizer: Any, echo: bool, top_n: int | None) -> None:
    many = len(outputs) > 1 or any(len(o.outputs) > 1 for o in outputs)
    for i, o in enumerate(outputs):
        for c in o.outputs:
            if many:
                tag = f"prompt {i}" + (f", sample {c.index}" if len(o.outputs) > 1 else "")
                print(f"--- {tag} (finish: {c.finish_reason}) ---")
            if tokenizer is None:
                if echo:
                    print(f"prompt token ids: {list(o.prompt_token_ids)}")
                print(f"token ids: {list(c.token_ids)}")
            else:
                prefix = ""
                if echo:
                    prefix = o.prompt if o.prompt is not None else tokenizer.decode(
                        o.prompt_token_ids, skip_special_tokens=True)
                print(prefix + c.text)
            if top_n is not None and c.logprobs is not None:
                for tid, entry in zip(c.token_ids, c.logprobs):
                    ranked = sorted(entry.items(), key=lambda kv: -kv[1])[:top_n]
                    shown = ", ".join(f"{_token_str(tokenizer, t)!r}:{lp:.3f}" if tokenizer
                                      else f"{t}:{lp:.3f}" for t, lp in ranked)
                    tok = repr(_token_str(tokenizer, tid)) if tokenizer else str(tid)
                    print(f"  {tok:>16} {entry.get(tid, float('nan')):8.3f}   top: {shown}")


def _bos_prompt(llm: Any) -> list[int]:
    engine = llm.engine
    bos = getattr(engine.hf_config, "bos_token_id", None)
    if not isinstance(bos, int) and engine.tokenizer is not None:
        bos = engine.tokenizer.bos_token_id
    if not isinstance(bos, int):
        raise CLIError("no prompt given and the model has no BOS token: pass --prompt or "
                       "--prompt-ids")
    return [bos]


# ---- commands --------------------------------------------------------------------------------


def cmd_generate(args: argparse.Namespace) -> int:
    # Validate everything that does not need the model before loading it.
    params = _sampling_params(args)
    prompts: list[str | list[int]] = list(args.prompts or [])
    if args.chat:
        if any(not isinstance(p, str) for p in prompts):
            raise CLIError("--chat takes text prompts (--prompt), not --prompt-ids")
        if not prompts:
            raise CLIError("--chat needs at least one --prompt")
    template = args.chat_template
    if template is not None and Path(template).is_file():
        template = Path(template).read_text()

    llm = _make_llm(args.model, args)
    tokenizer = llm.get_tokenizer()
    if args.chat:
        if tokenizer is None:
            raise CLIError("this model has no tokenizer, so --chat is unavailable")
        if template is None and not getattr(tokenizer, "chat_template", None):
            raise CLIError("the model's tokenizer has no chat template: pass --chat-template "
                           "(a Jinja template string or a file holding one)")
    if not prompts:
        prompts = [_bos_prompt(llm)]
    t0 = time.perf_counter()
    if args.chat:
        convs = []
        for p in prompts:
            conv = [{"role": "system", "content": args.system}] if args.system else []
            conv.append({"role": "user", "content": p})
            convs.append(conv)
        prompts = [llm.chat_prompt(c, template) for c in convs]
    streamed = (args.stream and not args.json and len(prompts) == 1 and params.n == 1
                and tokenizer is not None and args.logprobs is None)
    if streamed:
        if args.echo:
            print(prompts[0] if isinstance(prompts[0], str)
                  else tokenizer.decode(prompts[0], skip_special_tokens=True), end="")
        text = ""
        for out in llm.stream(prompts[0], params):
            piece = out.outputs[0].text[len(text):]
            text = out.outputs[0].text
            print(piece, end="", flush=True)
        print(flush=True)  # before the timing line on stderr
        outputs = [out]
    else:
        outputs = llm.generate(prompts, params)
    seconds = time.perf_counter() - t0
    stats = _usage_stats(outputs, seconds)
    llm.close()  # writes the --trace-experts file

    if args.json:
        doc = {
            "model": args.model,
            "results": _outputs_json(outputs, args.logprobs or 0, tokenizer),
            "usage": stats,
        }
        print(json.dumps(doc, indent=2))
    elif not streamed:
        _print_text(outputs, tokenizer, args.echo, args.logprobs)
    print(_timing_line(stats, getattr(llm.engine, "load_seconds", None)), file=sys.stderr)
    return EXIT_OK


def cmd_info(args: argparse.Namespace) -> int:
    from sparsa.info import format_info, model_info

    cfg = config_from_args(args.model, args)
    d = model_info(args.model, dtype=cfg.model.dtype, device=cfg.device.device,
                   load_format=cfg.model.load_format, max_model_len=cfg.model.max_model_len,
                   kv_cache_memory=cfg.cache.kv_cache_memory,
                   quantization=cfg.model.quantization,
                   group_size=cfg.model.quantization_group_size)
    print(json.dumps(d, indent=2) if args.json else format_info(d))
    if d.get("build_error"):
        print(f"sparsa: warning: could not build {args.model} to count its parameters: "
              f"{d['build_error']}", file=sys.stderr)
    return EXIT_OK


def _demo_one(title: str, model: str, args: argparse.Namespace, max_tokens: int,
              **llm_kwargs: Any) -> None:
    print(f"=== {title} ===", flush=True)
    llm = _make_llm(model, args, dtype="float32", kv_cache_memory="64MiB",
                    num_threads=args.threads, **llm_kwargs)
    tokenizer = llm.get_tokenizer()
    prompt = _bos_prompt(llm)
    runs = [
        ("greedy from BOS", SamplingParams(temperature=0.0, max_tokens=max_tokens)),
        (f"sampled (temperature {args.temperature}, top-p 0.95, seed {args.seed})",
         SamplingParams(temperature=args.temperature, top_p=0.95, seed=args.seed,
                        max_tokens=max_tokens)),
    ]
    for label, params in runs:
        t0 = time.perf_counter()
        out = llm.generate([prompt], params)
        stats = _usage_stats(out, time.perf_counter() - t0)
        c = out[0].outputs[0]
        print(f"--- {label} ---")
        print(c.text.strip() if tokenizer is not None else f"token ids: {c.token_ids}")
        print(_timing_line(stats), file=sys.stderr, flush=True)
    print()


def _demo_chat(title: str, model: str, args: argparse.Namespace, question: str) -> None:
    """One chat turn, greedy, with the chat template the model's file carries. The file's
    weights are decoded to fp32 (quantization "none"), the math transformers does: in the
    file's own 4-bit form the first token of this answer is a near tie that goes the other
    way, in Sparsa as in llama.cpp."""
    print(f"=== {title} ===", flush=True)
    llm = _make_llm(model, args, dtype="float32", kv_cache_memory="64MiB",
                    num_threads=args.threads, quantization="none")
    t0 = time.perf_counter()
    out = llm.chat([{"role": "user", "content": question}],
                   SamplingParams(temperature=0.0, max_tokens=48))
    stats = _usage_stats(out, time.perf_counter() - t0)
    print(f"user: {question}")
    print(f"assistant: {out[0].outputs[0].text.strip()}")
    print(_timing_line(stats), file=sys.stderr, flush=True)
    print()


def cmd_demo(args: argparse.Namespace) -> int:
    from sparsa.tokenizer import shared_dir

    shared = shared_dir()
    stories = shared / "models" / "stories260K" / "stories260K.bin"
    moe = shared / "models" / "tinymoe-stories"
    found = False
    if stories.is_file():
        found = True
        _demo_one("stories260K: dense Llama, 260K params, real TinyStories weights (llama2.c)",
                  str(stories), args, args.max_tokens)
    if (moe / "config.json").is_file():
        found = True
        _demo_one("tinymoe-stories: Mixtral MoE, 8 experts top-2, 3.5M params (1.1M active)",
                  str(moe), args, args.max_tokens)
    chat = shared / "models" / "smollm2-135m-instruct" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if chat.is_file():
        found = True
        _demo_chat("SmolLM2-135M-Instruct: a real chat model, llama.cpp's Q4_1 GGUF file "
                   "(weights decoded to fp32)",
                   str(chat), args, "What is the capital of France?")
    if not found:
        print(f"note: the shared models were not found under {shared} (set SPARSA_SHARED to "
              "the shared/ directory); running the built-in mixtral-mini with RANDOM weights "
              "instead, so its output is noise (token ids only without a tokenizer).",
              file=sys.stderr)
        _demo_one("mixtral-mini: Mixtral MoE shapes, 8 experts top-2, random weights",
                  "mixtral-mini", args, min(args.max_tokens, 24), load_format="dummy",
                  max_model_len=512)
    return EXIT_OK


def cmd_bench(argv: list[str]) -> int:
    """Forward to sparsa.bench.main(argv), which another module provides."""
    try:
        bench = importlib.import_module("sparsa.bench")
    except ModuleNotFoundError as e:
        if e.name != "sparsa.bench":
            raise  # sparsa.bench exists but one of its own imports is missing
        raise CLIError("the bench subcommand is not available: this installation has no "
                       "sparsa.bench module") from None
    fn = getattr(bench, "main", None)
    if not callable(fn):
        raise CLIError("sparsa.bench has no main(argv) function")
    try:
        rc = fn(argv)
    except SystemExit as e:  # its argparse: --help or a usage error
        rc = e.code if isinstance(e.code, int) or e.code is None else EXIT_USAGE
    return int(rc) if rc is not None else EXIT_OK


# ---- entry point -----------------------------------------------------------------------------


def _split_bench(argv: list[str]) -> tuple[list[str], list[str]] | None:
    """(global options, bench argv) when the subcommand is `bench`, else None."""
    for i, a in enumerate(argv):
        if not a.startswith("-"):
            return (argv[:i], argv[i + 1:]) if a == "bench" else None
    return None


def _one_line(e: BaseException) -> str:
    msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
    msg = " ".join(str(msg).split())
    return _as_flags(msg) or type(e).__name__


def _as_flags(msg: str) -> str:
    """The Python names of settings and sampling parameters in an error, as the flags the
    user typed (`top_p must be in (0, 1]` -> `--top-p must be ...`). Only names with an
    underscore and a few unmistakable ones, so ordinary words stay words."""
    import dataclasses

    from sparsa.config import settings

    names = {s.name for s in settings()} | {f.name for f in dataclasses.fields(SamplingParams)}
    names = {n for n in names if "_" in n or n in ("temperature", "logprobs", "quantization")}
    pattern = r"(?<![\w.\-'\"])(" + "|".join(sorted(map(re.escape, names), key=len,
                                                   reverse=True)) + r")(?![\w(])"
    return re.sub(pattern, lambda m: "--" + m.group(1).replace("_", "-"), msg)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status (0 ok, 1 internal failure, 2 bad input)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    bench = _split_bench(argv)
    try:
        args = parser.parse_args(bench[0] if bench is not None else argv)
    except SystemExit as e:  # argparse: --help, --version, or a usage error
        return e.code if isinstance(e.code, int) else EXIT_USAGE
    debug = bool(getattr(args, "debug", False))
    verbose = bool(getattr(args, "verbose", False))
    if bench is None and args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE

    root = logging.getLogger()
    if not root.handlers:  # a host program's own logging setup is left alone
        handler = logging.StreamHandler()  # stderr
        handler.setFormatter(_LogFormat())
        root.addHandler(handler)

    try:
        if bench is not None:
            with _log_levels(verbose or debug):  # `sparsa -v bench ...`
                return cmd_bench(bench[1])
        commands = {"generate": cmd_generate, "info": cmd_info, "demo": cmd_demo}
        func = getattr(args, "func", None) or commands[args.command]
        if hasattr(args, "model_flag"):  # MODEL or --model M
            model_from_args(args)
        with _log_levels(verbose or debug):
            return func(args)
    except BrokenPipeError:  # e.g. `sparsa info X --json | head`
        with contextlib.suppress(Exception):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        return EXIT_FAILURE
    except KeyboardInterrupt:
        print("sparsa: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if debug:
            raise
        if isinstance(e, (CLIError, *_USER_ERRORS)):
            print(f"sparsa: error: {_one_line(e)}", file=sys.stderr)
            return EXIT_USAGE
        print(f"sparsa: internal error: {type(e).__name__}: {_one_line(e)} "
              "(run with --debug for the traceback)", file=sys.stderr)
        return EXIT_FAILURE


if __name__ == "__main__":
    raise SystemExit(main())
