"""`sparsa bench spec MODEL`: speculative decoding against plain decoding, batch 1, greedy,
the same prompts on two engines in one process (alternating rounds). Prints output tok/s
of each (median and range), their ratio, and the speculation counters: acceptance rate,
tokens per verifying step, target passes per output token.

Workloads: `copy` asks the model to copy, rewrite or correct a passage of
../shared/corpora/wikitext2_test.txt (text that n-gram lookup can find); `chat` asks open
questions (little to find); `story` gives story openings as plain prompts (for models
without a chat template, such as the llama2.c pairs in ../shared)."""

from __future__ import annotations

import argparse
import json
import re
import statistics
import time

CHAT = ["What are three good habits for staying healthy?",
        "Explain how a rainbow forms.",
        "Write a short poem about the sea.",
        "Why do cats purr?",
        "Give me tips for learning a new language."]
STORIES = ["Once upon a time", "The little dog", "Lily and Tom went to the park",
           "One day, a big"]
TASKS = ["Copy the following text exactly, word for word:\n\n{}",
         "Rewrite the following text, keeping every sentence:\n\n{}",
         "Correct any mistakes in the following text and return the whole text:\n\n{}"]


def copy_prompts(n: int, words: int = 90) -> list[str]:
    from sparsa.tokenizer import shared_dir

    path = shared_dir() / "corpora" / "wikitext2_test.txt"
    text = path.read_text(encoding="utf-8")
    paras = [p.strip() for p in text.split("\n") if len(p.split()) > words and "=" not in p]
    out = []
    for i in range(n):
        para = re.sub(r" @(.)@ ", r"\1", paras[i * 7 % len(paras)]).replace("<unk>", "X")
        out.append(TASKS[i % len(TASKS)].format(" ".join(para.split()[:words])))
    return out


def run(model: str, spec: dict, prompts: list[str], max_tokens: int, rounds: int,
        settings: dict, story: bool = False) -> dict:
    """Both engines take `settings` (engine keywords); only one speculates."""
    from sparsa import LLM, SamplingParams

    settings = {k: v for k, v in settings.items() if k != "speculative_config"}
    engines = {"plain": LLM(model, **settings),
               "spec": LLM(model, **settings, speculative_config=spec)}
    params = SamplingParams(temperature=0, max_tokens=max_tokens)
    chat = not story

    def ask(llm, p):
        if chat:
            return llm.chat([[{"role": "user", "content": p}]], params)[0].outputs[0]
        return llm.generate([p], params)[0].outputs[0]
    rates: dict[str, list[float]] = {k: [] for k in engines}
    outputs: dict[str, list[list[int]]] = {}

    def one_round(name: str) -> float:
        llm = engines[name]
        tokens, seconds, outs = 0, 0.0, []
        for p in prompts:  # batch 1: one request at a time
            t0 = time.perf_counter()
            o = ask(llm, p)
            seconds += time.perf_counter() - t0
            tokens += len(o.token_ids)
            outs.append(o.token_ids)
        outputs[name] = outs
        return tokens / seconds

    def disk_bytes(name: str) -> float:  # experts read from disk, when offloaded
        return engines[name].engine.stats().get("offload", {}).get("disk_bytes_read", 0.0)

    for name in engines:  # warm-up: kernels, caches
        one_round(name)
    start = dict(engines["spec"].engine.speculation.stats)
    read0 = {name: disk_bytes(name) for name in engines}
    for _ in range(rounds):
        for name in engines:
            rates[name].append(one_round(name))
    stats = {k: v - start[k] for k, v in engines["spec"].engine.speculation.stats.items()}
    emitted = sum(len(t) for t in outputs["spec"]) * rounds
    read = {name: (disk_bytes(name) - read0[name]) / max(emitted, 1) for name in engines}
    return {"model": model, "speculative_config": spec, "prompts": len(prompts),
            "max_tokens": max_tokens, "plain_tok_s": rates["plain"],
            "spec_tok_s": rates["spec"],
            "ratio": statistics.median(rates["spec"]) / statistics.median(rates["plain"]),
            "same_tokens": outputs["plain"] == outputs["spec"],
            "acceptance": stats["accepted"] / max(stats["proposed"], 1),
            "tokens_per_verify_step": (stats["accepted"] + stats["verify_steps"])
            / max(stats["verify_steps"], 1),
            "passes_per_token": stats["passes"] / max(emitted, 1),
            "expert_bytes_per_token": read}


def main(argv: list[str] | None = None) -> int:
    from sparsa.config.settings import (
        add_engine_arguments,
        add_model_argument,
        engine_kwargs,
        model_from_args,
    )

    ap = argparse.ArgumentParser(prog="sparsa bench spec", description=__doc__.split("\n")[0])
    add_model_argument(ap)
    add_engine_arguments(ap, defaults={"speculative_config": {
        "method": "ngram", "num_speculative_tokens": 4}})
    ap.add_argument("--workload", choices=("copy", "chat", "story"), default="copy")
    ap.add_argument("--prompts", type=int, default=5)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", action="store_true", help="print the result as JSON")
    args = ap.parse_args(argv)
    model_from_args(args)
    settings = engine_kwargs(args)
    spec = settings["speculative_config"]
    if args.prompts < 1 or args.max_tokens < 1 or args.rounds < 1:
        ap.error("--prompts, --max-tokens and --rounds must be >= 1")
    pool = {"chat": CHAT, "story": STORIES}.get(args.workload)
    prompts = copy_prompts(args.prompts) if pool is None else \
        [pool[i % len(pool)] for i in range(args.prompts)]
    r = run(args.model, spec, prompts, args.max_tokens, args.rounds, settings,
            story=args.workload == "story")
    if args.json:
        print(json.dumps(r, indent=1))
        return 0
    spread = lambda xs: f"{statistics.median(xs):.1f} ({min(xs):.1f}-{max(xs):.1f})"  # noqa: E731
    print(f"{args.model}: {args.workload} workload, {args.prompts} prompts at batch 1, "
          f"{args.max_tokens} max tokens, greedy, {args.rounds} alternating rounds")
    print(f"speculative_config: {json.dumps(spec)}")
    print(f"plain:       {spread(r['plain_tok_s'])} output tok/s")
    print(f"speculative: {spread(r['spec_tok_s'])} output tok/s ({r['ratio']:.2f}x)")
    print(f"acceptance {r['acceptance']:.2f}, {r['tokens_per_verify_step']:.2f} tokens per "
          f"verifying step, {r['passes_per_token']:.2f} target passes per token, "
          f"same tokens as plain: {r['same_tokens']}")
    read = r["expert_bytes_per_token"]
    if read["plain"] or read["spec"]:
        print(f"experts read from disk per output token: plain {read['plain'] / 2**20:.2f} MiB, "
              f"speculative {read['spec'] / 2**20:.2f} MiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
