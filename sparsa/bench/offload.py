"""`sparsa bench offload`: decode speed, TTFT and memory with experts offloaded.

For each expert budget (and "all" = every expert resident, when it fits), one request of
`--prompt-len` random tokens decodes `--max-tokens` tokens greedily at batch 1. Reported:
TTFT, decode tok/s ((tokens - 1) / (E2E - TTFT)), the cache's hit rate, lookahead recall
and bytes read from disk, and the process's peak RSS. `--on-miss wait,int4,int8` repeats each
offloaded budget once per miss handling (wait, or the int4/int8 low-precision copy), and
`--layouts native,resident` once per expert layout (see sparsa.offload.expert_reader), and
`--quantization none,int8,int4` every budget once per weight form (offloaded int8/int4 experts
come from the quantized expert store, built on the first such run: see `load_s`).
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

import torch

# settings this benchmark sweeps with its own list flags (--budgets, --on-miss, --layouts,
# --quantization); every other engine setting is the engine's flag
SWEPT = ("expert_memory", "offload_on_miss", "offload_low_precision", "offload_layout",
         "quantization")


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_one(model: str, budget: str | None, args, on_miss: tuple[str, str] = ("wait", "int4"),
            layout: str = "auto", quantization: str | None = None) -> dict:
    from sparsa import LLM, SamplingParams
    from sparsa.config import engine_kwargs

    settings = {"kv_cache_memory": "512MiB", **engine_kwargs(args)}
    if budget is None:  # all resident: no tier of any kind
        settings.pop("offload_host_memory", None)
    t = time.perf_counter()
    llm = LLM(model, **{
        **settings, "expert_memory": budget, "offload_layout": layout,
        "offload_on_miss": on_miss[0] if budget is not None else "wait",
        "offload_low_precision": on_miss[1], "quantization": quantization,
        "max_model_len": args.prompt_len + args.max_tokens + 16})
    load_s = time.perf_counter() - t
    vocab = llm.engine.hf_config.vocab_size
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(3, vocab, (args.prompt_len,), generator=g).tolist()
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=args.max_tokens,
                                                ignore_eos=True))[0]
    m = out.metrics
    ttft = m["first_token_time"] - m["arrival_time"]
    decode = (len(out.outputs[0].token_ids) - 1) / (m["finished_time"] - m["first_token_time"])
    res = {"budget": budget or "all", "load_s": load_s, "ttft_s": ttft,
           "on_miss": on_miss[0] if on_miss[0] in ("wait", "host") or budget is None
           else on_miss[1],
           "device": str(llm.engine.device),
           "decode_tok_s": decode, "peak_rss_bytes": _peak_rss(),
           "tokens": out.outputs[0].token_ids[:16], "layout": "-",
           "quantization": quantization or "none"}
    if llm.engine.device.type == "cuda":
        res["peak_device_bytes"] = torch.cuda.max_memory_allocated(llm.engine.device)
    state = getattr(llm.engine.model, "offload", None)
    if state is not None:
        res["cache"] = state.report()
        res["layout"] = res["cache"].get("expert_layout", "-")
    return res


def main(argv: list[str] | None = None) -> int:
    from sparsa.config import add_engine_arguments
    from sparsa.config.settings import add_model_argument, model_from_args

    ap = argparse.ArgumentParser(prog="sparsa bench offload",
                                 description=__doc__.splitlines()[0])
    add_model_argument(ap)
    ap.add_argument("--budgets", default="25%,all",
                    help="comma-separated expert_memory values; 'all' = no offloading")
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--on-miss", default="wait",
                    help="comma-separated miss handlings to compare: wait, host (compute it "
                         "on the CPU from the host tier; needs --offload-host-memory), int4, "
                         "int8 "
                         "(compute a miss with that low-precision copy instead of waiting)")
    ap.add_argument("--layouts", default="auto",
                    help="comma-separated expert layouts to compare: native (the checkpoint's "
                         "[out, in], F.linear), resident (transposed per load, bit-identical "
                         "to all-resident), auto (resident only when every expert fits)")
    ap.add_argument("--quantization", default="none",
                    help="comma-separated weight forms to compare: none, int8, int4")
    ap.add_argument("--json", dest="json_out", default=None)
    add_engine_arguments(ap, exclude=SWEPT)
    args = ap.parse_args(argv)
    model_from_args(args)
    from sparsa.offload.low_precision import parse_on_miss

    variants = parse_on_miss(args.on_miss)
    layouts = args.layouts.split(",")
    runs = [(q, b, v, lay) for q in args.quantization.split(",") for b in args.budgets.split(",")
            for v in (variants[:1] if b == "all" else variants)
            for lay in (layouts[:1] if b == "all" else layouts)]
    results = []
    for q, b, v, lay in runs:
        # each budget in a fresh process would be cleaner for RSS; a child keeps it honest
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        with ctx.Pool(1) as pool:
            r = pool.apply(run_one, (args.model, None if b == "all" else b, args, v, lay,
                                     None if q == "none" else q))
        results.append(r)
        c = r.get("cache", {})
        lowp = f", {c['substitutions']} low-precision substitutions, " \
            f"{c['low_precision_bytes'] / 2**20:.1f} MiB low-precision tier" \
            if c.get("low_precision") else ""
        io = ""
        if c.get("host_budget_bytes"):
            io += (f", host tier {c['host_budget_bytes'] / 2**30:.2f} GiB "
                   f"(pinned: {c['host_pinned']}), host hit rate {c['host_hit_rate']:.3f}, "
                   f"{c['host_computes']} misses computed on the host")
        if c.get("disk_read_seconds"):
            gbs = c["disk_bytes_read"] / c["disk_read_seconds"] / 1e9
            io += (f", {c['disk_loads']} loads read at {gbs:.2f} GB/s per I/O thread, "
                   f"compute waited {c['wait_seconds']:.1f} s for loads")
        dev = (f", peak {r['device']} memory {r['peak_device_bytes'] / 2**30:.2f} GiB"
               if "peak_device_bytes" in r else "")
        print(f"{r['quantization']}, budget {r['budget']:>6}, load {r['load_s']:.1f} s, "
              f"on miss {r['on_miss']:>4}, layout {r['layout']}: "
              f"TTFT {r['ttft_s']:.2f} s, "
              f"decode "
              f"{r['decode_tok_s']:.2f} tok/s, peak RSS {r['peak_rss_bytes'] / 2**30:.2f} GiB"
              + dev + (f", hit rate {c['hit_rate']:.3f} (at the layer's start "
                 f"{c['layer_start_hit_rate']:.3f}), lookahead recall "
                 f"{c['lookahead_recall']:.3f}, disk read {c['disk_bytes_read'] / 1e9:.1f} GB, "
                 f"budget {c['budget_bytes'] / 2**30:.2f} GiB of "
                 f"{c['total_expert_bytes'] / 2**30:.2f} GiB" + lowp + io if c else ""),
              flush=True)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
