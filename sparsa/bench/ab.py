"""`sparsa bench ab M --variant JSON --variant JSON ...`: batch-1 decode speed of one model
under several engine settings (e.g. '{"kv_cache_dtype": "int8"}', '{"dynamic_routing":
{"top_p": 0.7}}'), at given context depths, in one process with alternating rounds; with
each variant's KV bytes per token and what its engine counted (routing, offloading).

Each round fills the context with a prompt of `--depth` tokens (random ids: the speed of a
decode step does not depend on them), then times `--tokens` greedy decode steps after it."""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time


def _decode_tok_s(llm, depth: int, tokens: int, seed: int) -> float:
    from sparsa.sampling_params import SamplingParams

    vocab = llm.engine.hf_config.vocab_size
    rng = random.Random(seed)
    prompt = [rng.randrange(3, vocab) for _ in range(depth)]
    engine = llm.engine
    engine.add_request(prompt, SamplingParams(temperature=0, max_tokens=tokens + 1,
                                              ignore_eos=True))
    t0 = None
    while engine.has_unfinished_requests():
        outs = engine.step()
        if t0 is None and any(len(o.outputs[0].token_ids) for o in outs):
            t0 = time.perf_counter()  # the prompt is in: time the decode steps only
    return tokens / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    from sparsa.config import add_engine_arguments, engine_kwargs
    from sparsa.llm import LLM

    ap = argparse.ArgumentParser(prog="sparsa bench ab", description=__doc__)
    ap.add_argument("model")
    ap.add_argument("--variant", action="append", default=None, metavar="JSON",
                    help="engine settings of one variant, over the common flags (repeat; "
                         "default: '{}' and '{\"kv_cache_dtype\": \"int8\"}')")
    ap.add_argument("--depth", type=int, nargs="+", default=[512, 2048],
                    help="context tokens before the timed decode steps")
    ap.add_argument("--tokens", type=int, default=64, help="decode steps timed per round")
    ap.add_argument("--rounds", type=int, default=3)
    add_engine_arguments(ap, exclude=("model",))
    args = ap.parse_args(argv)
    variants = args.variant or ["{}", '{"kv_cache_dtype": "int8"}']
    try:
        settings = [json.loads(v) for v in variants]
    except json.JSONDecodeError as e:
        raise ValueError(f"--variant takes a JSON object: {e}") from None
    if not all(isinstance(v, dict) for v in settings) or len(settings) < 2:
        raise ValueError("give at least two --variant JSON objects")
    if min(args.depth) < 1 or args.tokens < 1 or args.rounds < 1:
        raise ValueError("--depth, --tokens and --rounds must be >= 1")
    base = engine_kwargs(args)
    base.setdefault("max_model_len", max(args.depth) + args.tokens + 8)
    llms = {v: LLM(args.model, **{**base, **s}) for v, s in zip(variants, settings)}
    for d, llm in llms.items():
        r = llm.engine.runner
        print(f"{d}: KV {r.kv_cache_bytes / r.capacity_tokens / 1024:.1f} KiB per token")
    print("| depth | " + " | ".join(f"{d} tok/s" for d in variants) + " | last / first |")
    print("|---|" + "---|" * (len(variants) + 1))
    for depth in args.depth:
        times: dict[str, list[float]] = {d: [] for d in variants}
        for r in range(args.rounds):
            order = variants if r % 2 == 0 else variants[::-1]  # alternate who runs first
            for d in order:
                times[d].append(_decode_tok_s(llms[d], depth, args.tokens, seed=r))
        med = {d: statistics.median(v) for d, v in times.items()}
        cells = [f"{med[d]:.1f} ({min(times[d]):.1f}-{max(times[d]):.1f})" for d in variants]
        ratio = med[variants[-1]] / med[variants[0]]
        print(f"| {depth} | " + " | ".join(cells) + f" | {ratio:.2f}x |")
    for d, llm in llms.items():
        st = llm.engine.stats()
        seen = {k: st[k] for k in ("dynamic_routing", "offload", "early_exit") if k in st}
        if seen:
            print(f"{d}: {json.dumps(seen, default=str)[:600]}")
    return 0
