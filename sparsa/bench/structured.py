"""`sparsa bench structured MODEL`: what a JSON-schema constraint costs. The same chat
prompts run as one offline batch free and then constrained (and again, alternating), on one
engine; prints output tokens per second of each and the ratio, and checks every
constrained answer parses."""

from __future__ import annotations

import argparse
import json
import statistics
import time

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 16}, "age": {"type": "integer"},
    "city": {"enum": ["Paris", "Rome", "Oslo", "Lima"]},
    "hobbies": {"type": "array", "items": {"type": "string", "maxLength": 12},
                "maxItems": 3}},
    "required": ["name", "age", "city", "hobbies"], "additionalProperties": False}
QUESTION = "Describe a person as JSON with name, age, city and hobbies."


def run(model: str, requests: int, max_tokens: int, rounds: int, threads: int | None
        ) -> dict:
    from sparsa import LLM, SamplingParams

    llm = LLM(model, num_threads=threads, max_num_seqs=requests)
    msgs = [[{"role": "user", "content": QUESTION}]] * requests

    def batch(guided: bool) -> float:
        params = [SamplingParams(temperature=0.8, seed=i, max_tokens=max_tokens,
                                 guided_decoding={"json": SCHEMA} if guided else None)
                  for i in range(requests)]
        t0 = time.perf_counter()
        outs = llm.chat(msgs, params)
        dt = time.perf_counter() - t0
        if guided:
            for o in outs:
                json.loads(o.outputs[0].text)  # every constrained answer parses
        return sum(len(o.outputs[0].token_ids) for o in outs) / dt

    batch(False)  # warm-up: kernels, the tokenizer's grammar view
    batch(True)
    free, guided = [], []
    for _ in range(rounds):
        free.append(batch(False))
        guided.append(batch(True))
    f, g = statistics.median(free), statistics.median(guided)
    return {"model": model, "requests": requests, "max_tokens": max_tokens,
            "free_tok_s": free, "guided_tok_s": guided, "ratio": g / f}


def main(argv: list[str] | None = None) -> int:
    from sparsa.config.settings import add_model_argument, model_from_args

    ap = argparse.ArgumentParser(prog="sparsa bench structured",
                                 description=__doc__.split("\n")[0])
    add_model_argument(ap)
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    model_from_args(args)
    if args.requests < 1 or args.max_tokens < 1 or args.rounds < 1:
        ap.error("--requests, --max-tokens and --rounds must be >= 1")
    r = run(args.model, args.requests, args.max_tokens, args.rounds, args.threads)
    spread = lambda xs: f"{statistics.median(xs):.1f} ({min(xs):.1f}-{max(xs):.1f})"  # noqa: E731
    print(f"{args.requests} chat requests, {args.max_tokens} max tokens, offline batch, "
          f"{args.rounds} alternating rounds")
    print(f"free:        {spread(r['free_tok_s'])} output tok/s")
    print(f"JSON schema: {spread(r['guided_tok_s'])} output tok/s ({r['ratio']:.2f}x)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
