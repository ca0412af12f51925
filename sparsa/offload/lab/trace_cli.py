"""`sparsa trace`: record an expert-routing trace by batch-decoding prompts.

    sparsa trace ../shared/models/tinymoe-stories --out run.csv.gz          # shared corpus
    sparsa trace MODEL --prompts prompts.txt --out run.csv.gz --max-tokens 64
    sparsa trace MODEL --corpus-text story.txt --num-prompts 20 --offset 20 --out test.csv.gz
    sparsa cache-sim --trace test.csv.gz --train run.csv.gz

``--prompts`` takes one prompt per line (comma-separated token ids for a model without a
tokenizer); ``--corpus-text`` cuts prompts from a text corpus
(its non-empty lines of at least 8 words, each cut to ``--prompt-len`` tokens). With
neither, the corpus is ``corpora/tinystories_val.txt`` of the shared folder. Prompt i of
the selection (after ``--offset``) is request id ``offset + i`` in the trace, so traces of
disjoint slices (a train and a test trace) never share ids. Any run can be traced the same
way: ``sparsa generate ... --trace-experts PATH`` or ``LLM(..., trace_experts=PATH)``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

__all__ = ["add_parser", "read_prompts", "run"]

_MIN_WORDS = 8


def _positive(text: str) -> int:
    v = int(text)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def add_parser(subparsers: Any, add_common: Any = None,
               add_model_options: Any = None) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "trace", help="record an expert-routing trace (for cache-sim) from batch decoding",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    if add_common is not None:
        add_common(p)
    from sparsa.config.settings import add_model_argument

    add_model_argument(p, "HF model directory, hub id or built-in config name (an MoE model)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompts", default=None, metavar="FILE",
                     help="one prompt per line (token ids like 1,5,9 if the model has no "
                          "tokenizer)")
    src.add_argument("--corpus-text", default=None, metavar="FILE",
                     help="cut prompts from this text (default: the shared TinyStories "
                          "validation text)")
    p.add_argument("--out", required=True, metavar="PATH",
                   help="trace to write (.csv or .csv.gz)")
    p.add_argument("--num-prompts", type=_positive, default=20)
    p.add_argument("--offset", type=int, default=0,
                   help="skip this many prompts first (disjoint train / test traces)")
    p.add_argument("--prompt-len", type=_positive, default=32,
                   help="--corpus-text prompts are cut to this many tokens (default 32)")
    p.add_argument("--max-tokens", type=_positive, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--ignore-eos", action="store_true",
                   help="always generate --max-tokens tokens")
    if add_model_options is not None:
        add_model_options(p)
    p.set_defaults(func=run)
    return p


def read_prompts(path: str | Path, corpus: bool, num: int, offset: int = 0) -> list[str]:
    """Prompt texts: every non-empty line of ``path``, or (``corpus``) only lines of at
    least 8 words; ``num`` of them after skipping ``offset``."""
    lines = [ln.strip() for ln in Path(path).read_text(encoding="utf-8").splitlines()]
    lines = [ln for ln in lines if ln and (not corpus or len(ln.split()) >= _MIN_WORDS)]
    picked = lines[offset: offset + num]
    if not picked:
        raise ValueError(f"{path}: no prompts after skipping {offset} "
                         f"(it has {len(lines)} usable lines)")
    return picked


def _ids(line: str, path: Path) -> list[int]:
    try:
        return [int(t) for t in line.replace(",", " ").split()]
    except ValueError:
        raise ValueError(f"{path}: the model has no tokenizer, so each prompt must be token "
                         f"ids like 1,5,9; got {line[:40]!r}") from None


def _source(args: argparse.Namespace) -> tuple[Path, bool]:
    if args.prompts:
        return Path(args.prompts), False
    if args.corpus_text:
        return Path(args.corpus_text), True
    from sparsa.tokenizer import shared_dir

    path = shared_dir() / "corpora" / "tinystories_val.txt"
    if not path.is_file():
        raise ValueError(f"{path} not found: pass --prompts or --corpus-text (or set "
                         "SPARSA_SHARED to the shared folder)")
    return path, True


def run(args: argparse.Namespace) -> int:
    from sparsa.sampling_params import SamplingParams

    path, corpus = _source(args)
    texts = read_prompts(path, corpus, args.num_prompts, args.offset)
    params = SamplingParams(temperature=args.temperature, seed=args.seed,
                            max_tokens=args.max_tokens, ignore_eos=args.ignore_eos)
    out = Path(args.out)
    if out.parent and not out.parent.exists():
        raise ValueError(f"output folder {out.parent} does not exist")
    from sparsa.config import engine_kwargs
    from sparsa.llm import LLM

    # the shared model options, offloading included (--expert-memory, --offload-prefetch, ...)
    llm = LLM(args.model, **{**engine_kwargs(args), "trace_experts": str(out)})
    engine = llm.engine
    if engine.tokenizer is None and corpus:
        raise ValueError(f"{args.model} has no tokenizer, so a text corpus cannot be traced "
                         "(pass --prompts with token ids)")
    room = max(1, engine.max_model_len - args.max_tokens)
    t0 = time.perf_counter()
    n_prompt = n_gen = 0
    for i, text in enumerate(texts):
        ids = engine.encode(text) if engine.tokenizer is not None else _ids(text, path)
        ids = ids[: min(args.prompt_len, room)] if corpus else ids[:room]
        n_prompt += len(ids)
        engine.add_request(ids, params, request_id=str(args.offset + i))
    from tqdm import tqdm

    with tqdm(total=len(texts), desc="Tracing prompts", unit=" prompts", disable=None,
              leave=False) as bar:
        while engine.has_unfinished_requests():
            for o in engine.step():
                if o.finished:
                    n_gen += sum(len(c.token_ids) for c in o.outputs)
                    bar.update(1)
    seconds = time.perf_counter() - t0
    rows = len(engine.tracer)
    llm.close()
    layers = len(engine.tracer.layers)
    print(f"[sparsa] traced {len(texts)} prompts ({n_prompt} prompt + {n_gen} generated "
          f"tokens) x {layers} MoE layers: {rows} rows in {seconds:.1f} s -> {out}",
          file=sys.stderr)
    state = getattr(engine.model, "offload", None)
    if state is not None:
        r = state.report()
        hist = f", history recall {r['history_recall']:.3f} precision " \
            f"{r['history_precision']:.3f}" if "history_recall" in r else ""
        print(f"[sparsa] offloaded experts: hit rate {r['hit_rate']:.3f} (resident at the "
              f"layer's start {r['layer_start_hit_rate']:.3f}; resident or in flight "
              f"{(r['hits'] + r['inflight_hits']) / max(1, r['requests']):.3f}), "
              f"prefetch recall {r['lookahead_recall']:.3f} precision "
              f"{r['lookahead_precision']:.3f}{hist}, {r['disk_loads']} loads", file=sys.stderr)
    return 0
