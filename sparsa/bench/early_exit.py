"""`sparsa bench early-exit MODEL`: what CALM-style early exit trades. Prompts from a
corpus file (the first words of its paragraphs) are generated greedily, one request at a
time, by the full model and with early exit at each (exit layers, threshold) setting; per
setting: output tok/s, mean layers run per decoded token, agreement with the full model's
greedy tokens (the fraction of positions before the first divergence, and of all
positions), and the full model's perplexity of the generated text (its own text's is the
floor). With --plot, perplexity and agreement against tok/s as a PNG."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def corpus_prompts(path: Path, n: int, words: int) -> list[str]:
    """The first `words` words of n paragraphs spread over the file."""
    paras = [p for p in path.read_text(encoding="utf-8", errors="replace").split("\n")
             if len(p.split()) > 2 * words]
    if not paras:
        raise ValueError(f"{path}: no paragraph of more than {2 * words} words")
    step = max(len(paras) // n, 1)
    return [" ".join(paras[(i * step) % len(paras)].split()[:words]) for i in range(n)]


def agreement(got: list[list[int]], want: list[list[int]]) -> tuple[float, float]:
    """(positions before the first divergence, positions equal), each over all of the full
    model's positions."""
    total = max(sum(len(w) for w in want), 1)
    prefix = equal = 0
    for g, w in zip(got, want):
        same = [a == b for a, b in zip(g, w)]
        prefix += same.index(False) if False in same else len(same)
        equal += sum(same)
    return prefix / total, equal / total


def run(model: str, settings: dict, layer_sets: list, thresholds: list[float],
        confidence: str, prompts: list[str], max_tokens: int, rounds: int) -> list[dict]:
    """The rows of the table: the full model first, then one per (layers, threshold)."""
    from sparsa import LLM, SamplingParams
    from sparsa.bench.cascade import _perplexity
    from sparsa.config.early_exit import EarlyExitConfig
    from sparsa.spec.early_exit import attach

    llm = LLM(model, **{k: v for k, v in settings.items() if k != "early_exit_config"})
    engine = llm.engine
    layers_total = len(engine.model.model.layers)
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)

    def generate(cfg):
        engine.early_exit = attach(engine.model, cfg)  # fresh counters
        best, outs = 0.0, []
        for _ in range(rounds):
            t0, outs = time.perf_counter(), []
            for p in prompts:  # batch 1, where one row decides the exit alone
                outs += llm.generate([p], params)
            dt = time.perf_counter() - t0
            best = max(best, sum(len(o.outputs[0].token_ids) for o in outs) / dt)
        stats = engine.early_exit.stats() if cfg is not None else None
        engine.early_exit = attach(engine.model, None)  # scoring: the full model
        return outs, best, stats

    llm.generate(prompts[:1], SamplingParams(temperature=0, max_tokens=8))  # warm-up
    ref, tok_s, _ = generate(None)
    want = [o.outputs[0].token_ids for o in ref]
    rows = [{"exit_layers": "full model", "threshold": None, "tok_s": tok_s,
             "mean_layers": float(layers_total), "exited": 0.0, "agree_prefix": 1.0,
             "agree_all": 1.0, "ppl": _perplexity(llm, ref)}]
    for layers in layer_sets:
        for th in thresholds:
            cfg = EarlyExitConfig(exit_layers=layers, threshold=th, confidence=confidence)
            outs, tok_s, st = generate(cfg)
            pre, allp = agreement([o.outputs[0].token_ids for o in outs], want)
            rows.append({"exit_layers": layers, "threshold": th, "tok_s": tok_s,
                         "mean_layers": st["mean_layers"],
                         "exited": st["exited"] / max(st["steps"], 1),
                         "agree_prefix": pre, "agree_all": allp, "ppl": _perplexity(llm, outs)})
    return rows


def _layers_arg(text: str) -> list:
    """'1,2;every 2' -> [[1, 2], 'every 2']."""
    out: list = []
    for part in text.split(";"):
        part = part.strip()
        out.append(part if part.startswith("every") else [int(x) for x in part.split(",")])
    return out


def _plot(rows: list[dict], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.6))
    base = rows[0]
    for key, ax, label in (("ppl", a, "full model's perplexity of the text"),
                           ("agree_all", b, "agreement with full greedy (all positions)")):
        groups: dict[str, list[dict]] = {}
        for r in rows[1:]:
            groups.setdefault(json.dumps(r["exit_layers"]), []).append(r)
        for name, rs in groups.items():
            ax.plot([r["tok_s"] for r in rs], [r[key] for r in rs], "o-", label=f"exit {name}")
            for r in rs:
                ax.annotate(f"{r['threshold']:g}", (r["tok_s"], r[key]), fontsize=7)
        ax.plot([base["tok_s"]], [base[key]], "s", label="full model")
        ax.set_xlabel("output tok/s (batch 1)")
        ax.set_ylabel(label)
    a.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    from sparsa.config.settings import (
        add_engine_arguments,
        add_model_argument,
        engine_kwargs,
        model_from_args,
    )
    from sparsa.tokenizer import shared_dir

    ap = argparse.ArgumentParser(prog="sparsa bench early-exit",
                                 description=__doc__.split("\n")[0])
    add_model_argument(ap)
    add_engine_arguments(ap)
    ap.add_argument("--exit-layer-sets", default="every 1",
                    help="exit layer sets separated by ';', each a comma list of layer "
                         "indices or 'every N' (e.g. '1,2;every 2')")
    ap.add_argument("--thresholds", default="1.0,0.9,0.8,0.6,0.4")
    ap.add_argument("--confidence", choices=("softmax", "margin"), default="softmax")
    ap.add_argument("--corpus", default=None,
                    help="prompt text (default: ../shared/corpora/tinystories_val.txt)")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--prompt-words", type=int, default=12)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=1, help="timed rounds (the best is kept)")
    ap.add_argument("--plot", default=None, metavar="PNG")
    ap.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = ap.parse_args(argv)
    model_from_args(args)
    try:
        ths = [float(x) for x in args.thresholds.split(",")]
        layer_sets = _layers_arg(args.exit_layer_sets)
    except ValueError:
        ap.error("--thresholds takes numbers and --exit-layer-sets comma lists of ints or "
                 "'every N', separated by ';'")
    if min(args.prompts, args.max_tokens, args.rounds, args.prompt_words) < 1:
        ap.error("--prompts, --prompt-words, --max-tokens and --rounds must be >= 1")
    corpus = Path(args.corpus) if args.corpus else \
        shared_dir() / "corpora" / "tinystories_val.txt"
    prompts = corpus_prompts(corpus, args.prompts, args.prompt_words)
    rows = run(args.model, engine_kwargs(args), layer_sets, ths, args.confidence, prompts,
               args.max_tokens, args.rounds)
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    title = (f"{Path(args.model).name}: {args.prompts} prompts from {corpus.name} x "
             f"{args.max_tokens} tokens, greedy, batch 1, confidence {args.confidence}")
    print(title)
    print("| exit layers | threshold | tok/s | vs full | mean layers | steps exited | "
          "agree (prefix) | agree (all) | full-model ppl |")
    print("|---|---|---|---|---|---|---|---|---|")
    base = rows[0]["tok_s"]
    for r in rows:
        th = "-" if r["threshold"] is None else f"{r['threshold']:g}"
        layers = r["exit_layers"] if isinstance(r["exit_layers"], str) else \
            ",".join(map(str, r["exit_layers"]))
        print(f"| {layers} | {th} | {r['tok_s']:.1f} | {r['tok_s'] / base:.2f}x | "
              f"{r['mean_layers']:.2f} | {r['exited']:.2f} | {r['agree_prefix']:.3f} | "
              f"{r['agree_all']:.3f} | {r['ppl']:.3f} |")
    if args.plot:
        _plot(rows, args.plot, title)
        print(f"plot: {args.plot}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
