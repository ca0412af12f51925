"""`sparsa bench cascade --small S --large L`: what a request-level cascade trades. The
same story prompts go to the large model alone and through the cascade at several
confidence thresholds (greedy, offline batch); per threshold: escalation rate, wall time
against the large model's, agreement with the large model's answers (whole answers and
tokens), and the large model's perplexity of the answers given (its own answers' is the
floor). With --plot, perplexity against time as a PNG."""

from __future__ import annotations

import argparse
import math
import time

import torch

PROMPTS = ["Once upon a time", "The little dog", "Lily and Tom went to the park",
           "One day, a big", "The sun was", "Tim had a red ball", "Mom said", "In the forest"]


def _perplexity(llm, outs) -> float:
    """The large model's perplexity of the answers (given their prompts)."""
    from sparsa.engine.scoring import prompt_logits

    nll, n = 0.0, 0
    for o in outs:
        ids = list(o.prompt_token_ids) + list(o.outputs[0].token_ids)
        p = len(o.prompt_token_ids)
        if len(ids) <= p:
            continue
        logp = torch.log_softmax(prompt_logits(llm.engine, ids).float(), -1)
        tgt = torch.tensor(ids[p:])
        nll -= logp[p - 1:len(ids) - 1].gather(1, tgt[:, None]).sum().item()
        n += len(tgt)
    return math.exp(nll / max(n, 1))


def run(small: str, large: str, thresholds: list[float], prompts: list[str], max_tokens: int
        ) -> list[dict]:
    from sparsa import LLM, SamplingParams
    from sparsa.spec.cascade import Cascade

    s, big = LLM(small), LLM(large)
    params = SamplingParams(temperature=0, max_tokens=max_tokens)
    s.generate(prompts[:1], params)  # warm-up
    big.generate(prompts[:1], params)
    t0 = time.perf_counter()
    ref = big.generate(prompts, params)
    t_large = time.perf_counter() - t0
    want = [o.outputs[0].token_ids for o in ref]
    rows = [{"threshold": "large only", "escalated": 1.0, "seconds": t_large,
             "time_vs_large": 1.0, "answers_equal": 1.0, "tokens_equal": 1.0,
             "large_ppl": _perplexity(big, ref)}]
    for th in thresholds:
        c = Cascade(s, big, th)
        t0 = time.perf_counter()
        res = c.generate(prompts, params)
        dt = time.perf_counter() - t0
        got = [o.outputs[0].token_ids for o in res.outputs]
        same_tok = sum(sum(a == b for a, b in zip(g, w)) for g, w in zip(got, want))
        rows.append({"threshold": th, "escalated": sum(res.escalated) / len(prompts),
                     "seconds": dt, "time_vs_large": dt / t_large,
                     "answers_equal": sum(g == w for g, w in zip(got, want)) / len(prompts),
                     "tokens_equal": same_tok / max(sum(len(w) for w in want), 1),
                     "large_ppl": _perplexity(big, res.outputs)})
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="sparsa bench cascade", description=__doc__.split("\n")[0])
    ap.add_argument("--small", required=True)
    ap.add_argument("--large", required=True)
    ap.add_argument("--thresholds", default="0,0.5,0.6,0.7,0.8,0.9")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--plot", default=None, metavar="PNG")
    args = ap.parse_args(argv)
    try:
        ths = [float(x) for x in args.thresholds.split(",")]
    except ValueError:
        ap.error("--thresholds takes numbers separated by commas")
    if args.prompts < 1 or args.max_tokens < 1:
        ap.error("--prompts and --max-tokens must be >= 1")
    prompts = [PROMPTS[i % len(PROMPTS)] + " " * (i // len(PROMPTS))
               for i in range(args.prompts)]
    rows = run(args.small, args.large, ths, prompts, args.max_tokens)
    print(f"{args.small} -> {args.large}: {args.prompts} prompts x {args.max_tokens} tokens, "
          "greedy, offline batch")
    print(f"{'threshold':>10} {'escalated':>9} {'time':>7} {'answers=':>8} {'tokens=':>7} "
          f"{'large ppl':>9}")
    for r in rows:
        th = r["threshold"] if isinstance(r["threshold"], str) else f"{r['threshold']:.2f}"
        print(f"{th:>10} {r['escalated']:>9.2f} {r['time_vs_large']:>6.2f}x "
              f"{r['answers_equal']:>8.2f} {r['tokens_equal']:>7.2f} {r['large_ppl']:>9.3f}")
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5, 3.5))
        ax.plot([r["time_vs_large"] for r in rows[1:]], [r["large_ppl"] for r in rows[1:]],
                "o-", label="cascade")
        for r in rows[1:]:
            ax.annotate(f"{r['threshold']:.2f}", (r["time_vs_large"], r["large_ppl"]))
        ax.plot([1.0], [rows[0]["large_ppl"]], "s", label="large only")
        ax.set_xlabel("time / large model's time")
        ax.set_ylabel("large model's perplexity of the answers")
        ax.legend()
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)
        print(f"plot: {args.plot}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
