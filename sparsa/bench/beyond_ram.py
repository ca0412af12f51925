"""`sparsa bench beyond-ram`: a model larger than RAM, Sparsa against llama.cpp and
HF transformers + accelerate disk offload, on the same weights and prompt.

One request of `--prompt-len` random token ids (fixed seed; the same ids for every engine),
greedy, EOS ignored, batch 1. Each engine runs in a fresh process of its own, one at a time:

- sparsa: `sparsa.bench.offload.run_one` with `expert_memory` = each `--budgets` value;
- llama.cpp: llama-cpp-python over the GGUF (mmap on, the OS page cache is its only cache;
  `--gguf`, or converted from MODEL_DIR with `--gguf-type`);
- hf: `from_pretrained(device_map="auto", max_memory={"cpu": non-expert bytes + budget +
  --hf-headroom})`; whatever does not fit is offloaded to `--hf-offload-dir`, as a copy
  (transformers 5 fuses the experts at load, so accelerate re-saves them): skipped when the
  disk has no room for it.

`--llamacpp-caps` also runs llama.cpp once per budget inside a memory cgroup of that size
(page cache included), e.g. Sparsa's peak RSS there.

Reported per run: load seconds, TTFT, decode tok/s ((tokens - 1) / (E2E - TTFT)), peak RSS
(and anonymous / file-backed RSS at the end), bytes read from disk by the process
(/proc/self/io read_bytes, load included) and, for Sparsa, the expert cache's figures; then
Sparsa / peer ratios per budget. A run that passes `--timeout` is killed and reports the tokens
it had. `--drop-caches` empties the OS page cache before every run (root only).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import os
import re
import resource
import shutil
import struct
import subprocess
import tempfile
import time
from pathlib import Path

ENGINES = ("sparsa", "llama.cpp", "hf")
_ALIASES = {"sparsa": "sparsa", "llama.cpp": "llama.cpp", "llamacpp": "llama.cpp",
            "llama-cpp": "llama.cpp", "hf": "hf", "transformers": "hf"}
_EXPERT = re.compile(r"\.mlp\.experts\.\d+\.")


# ---- pure helpers (tested) -------------------------------------------------------------

def parse_engines(text: str) -> list[str]:
    """'llama.cpp,hf' -> canonical engine names, order kept, duplicates dropped."""
    out: list[str] = []
    for part in text.split(","):
        p = part.strip().lower()
        if not p:
            continue
        if p not in _ALIASES:
            raise ValueError(f"unknown engine {part.strip()!r}; one of {', '.join(ENGINES)}")
        if _ALIASES[p] not in out:
            out.append(_ALIASES[p])
    return out


def budget_bytes(budget: str, total_expert_bytes: int) -> int:
    """Sparsa's reading of an expert budget: 'N%' of all expert bytes, or a size."""
    from sparsa.config import OffloadConfig

    return OffloadConfig(expert_memory=budget).budget_bytes(total_expert_bytes)


def prompt_ids(vocab_size: int, n: int, seed: int = 0) -> list[int]:
    """The prompt every engine gets: bench_offload.run_one's (ids 3.. vocab-1, seed 0)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab_size, (n,), generator=g).tolist()


def decode_tok_s(n_tokens: int, e2e_s: float, ttft_s: float) -> float | None:
    """Tokens after the first over the time after the first; None below two tokens."""
    if n_tokens < 2 or e2e_s <= ttft_s:
        return None
    return (n_tokens - 1) / (e2e_s - ttft_s)


def checkpoint_split(model_dir: Path) -> tuple[int, int]:
    """(routed-expert bytes, all other bytes) of a safetensors checkpoint, from its headers."""
    experts = other = 0
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        for name, meta in header.items():
            if name == "__metadata__":
                continue
            lo, hi = meta["data_offsets"]
            if _EXPERT.search(name):
                experts += hi - lo
            else:
                other += hi - lo
    if experts + other == 0:
        raise FileNotFoundError(f"no safetensors tensors in {model_dir}")
    return experts, other


def hf_cpu_memory(other_bytes: int, expert_budget: int, headroom: int) -> int:
    """accelerate's max_memory['cpu'] for a budget comparable to Sparsa's: every non-expert
    weight, the expert budget, and headroom for what accelerate keeps besides weights."""
    return other_bytes + expert_budget + headroom


def hf_offload_copy_bytes(expert_bytes: int, other_bytes: int, cpu_bytes: int) -> int:
    """About what accelerate writes to offload_folder: transformers 5 fuses each layer's
    experts at load, so every weight that does not fit `cpu_bytes` is re-saved (a copy)."""
    return max(0, expert_bytes + other_bytes - cpu_bytes)


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def _fmt(x: float | None, spec: str = ".2f", none: str = "-") -> str:
    return none if x is None else format(x, spec)


def format_results(results: list[dict]) -> str:
    """A markdown table, one row per run."""
    rows = ["| engine | budget | load s | TTFT s | decode tok/s | tokens | peak RSS GiB "
            "| anon / file RSS GiB | read from disk GB | note |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        anon, file_ = r.get("rss_anon_bytes"), r.get("rss_file_bytes")
        split = f"{anon / 2**30:.2f} / {file_ / 2**30:.2f}" if anon is not None \
            and file_ is not None else "-"
        rd = r.get("read_bytes")
        rows.append(
            f"| {r['engine']} | {r['budget']} | {_fmt(r.get('load_s'), '.1f')} "
            f"| {_fmt(r.get('ttft_s'))} | {_fmt(r.get('decode_tok_s'), '.3f')} "
            f"| {r.get('n_tokens', 0)} | {_fmt((r.get('peak_rss_bytes') or 0) / 2**30)} "
            f"| {split} | {_fmt(rd / 1e9 if rd is not None else None, '.1f')} "
            f"| {r.get('note', '')} |")
    return "\n".join(rows)


def ratio_lines(results: list[dict]) -> list[str]:
    """Sparsa against each peer at every budget: decode tok/s ratio and TTFT speedup. A
    peer without budgets (llama.cpp: the page cache) is compared at every budget."""
    lines = []
    sparsa = [r for r in results if r["engine"] == "sparsa"]
    for s in sparsa:
        for peer in ("llama.cpp", "hf"):
            runs = [r for r in results if r["engine"] == peer
                    and r["budget"] in (s["budget"], "mmap")]
            for p in runs:
                d = ratio(s.get("decode_tok_s"), p.get("decode_tok_s"))
                t = ratio(p.get("ttft_s"), s.get("ttft_s"))
                lines.append(f"budget {s['budget']}: Sparsa / {peer} ({p['budget']}): decode "
                             f"{_fmt(d, '.2f', 'n/a')}x, TTFT {_fmt(t, '.2f', 'n/a')}x faster")
    return lines


def same_tokens(results: list[dict]) -> list[str]:
    """Engines whose greedy tokens differ from the first complete Sparsa run's (dummy
    weights: llama.cpp and transformers round differently, so this is informative)."""
    ref = next((r for r in results if r["engine"] == "sparsa" and r.get("tokens")), None)
    if ref is None:
        return []
    out = []
    for r in results:
        toks = r.get("tokens") or []
        n = min(len(toks), len(ref["tokens"]))
        if n and toks[:n] != ref["tokens"][:n]:
            out.append(f"{r['engine']} {r['budget']}: tokens differ from sparsa "
                       f"{ref['budget']} ({toks[:n]} vs {ref['tokens'][:n]})")
    return out


# ---- process measurements ----------------------------------------------------------------

def io_counters() -> dict[str, int]:
    try:
        text = Path("/proc/self/io").read_text()
    except OSError:
        return {}
    return {k: int(v) for k, v in (ln.split(": ") for ln in text.splitlines())}


def _rss() -> dict:
    res = {"peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    try:
        for ln in Path("/proc/self/status").read_text().splitlines():
            k, _, v = ln.partition(":")
            if k in ("RssAnon", "RssFile"):
                res[f"rss_{k[3:].lower()}_bytes"] = int(v.split()[0]) * 1024
    except OSError:
        pass
    return res


class _Recorder:
    """The child's result, rewritten to a JSON file at every step, so a killed run still
    reports what it had."""

    def __init__(self, path: str, base: dict):
        self.path = path
        self.res = dict(base)
        self.io0 = io_counters()

    def save(self, **kw) -> None:
        self.res.update(kw)
        io = io_counters()
        if io and self.io0:
            self.res["read_bytes"] = io["read_bytes"] - self.io0["read_bytes"]
            self.res["write_bytes"] = io["write_bytes"] - self.io0["write_bytes"]
        self.res.update(_rss())
        tmp = self.path + ".tmp"
        Path(tmp).write_text(json.dumps(self.res))
        os.replace(tmp, self.path)

    def token(self, times: list[float], tokens: list[int]) -> None:
        self.save(ttft_s=times[0], e2e_s=times[-1], n_tokens=len(tokens), tokens=tokens[:16],
                  decode_tok_s=decode_tok_s(len(tokens), times[-1], times[0]))


# ---- engines (each in its own process) ---------------------------------------------------

def _run_sparsa(out: str, model: str, budget: str, opts: dict) -> None:
    from sparsa.bench.offload import run_one

    rec = _Recorder(out, {"engine": "sparsa", "budget": budget})
    rec.save(note="loading")
    r = run_one(model, budget, argparse.Namespace(**opts))
    c = r.get("cache", {})
    note = ""
    if c:
        gbs = c["disk_bytes_read"] / c["disk_read_seconds"] / 1e9 \
            if c.get("disk_read_seconds") else 0.0
        note = (f"hit {c['hit_rate']:.3f} (layer start {c['layer_start_hit_rate']:.3f}), "
                f"recall {c['lookahead_recall']:.3f}, "
                f"{c['disk_loads']} loads, {c['disk_bytes_read'] / 1e9:.1f} GB at "
                f"{gbs:.2f} GB/s/thread, waited {c['wait_seconds']:.1f} s")
        if c.get("compression"):
            note = f"zstd store, ratio {c['compression_ratio']:.3f}; {note}"
    n = opts["max_tokens"]
    rec.save(load_s=r["load_s"], ttft_s=r["ttft_s"], decode_tok_s=r["decode_tok_s"],
             n_tokens=n, tokens=r["tokens"], cache=c, note=note)


def _run_llamacpp(out: str, gguf: str, prompt: list[int], max_tokens: int, threads: int,
                  ctx: int, cap: str | None = None, cap_bytes: int = 0) -> None:
    budget, note = "mmap", "mmap, page cache unlimited"
    if cap_bytes:
        # into the memory cgroup before anything is mapped: page cache counts against it too
        join_memory_cgroup(cap_bytes)
        budget, note = cap, f"mmap, memory cgroup {cap_bytes / 2**30:.2f} GiB"
    from llama_cpp import Llama

    rec = _Recorder(out, {"engine": "llama.cpp", "budget": budget})
    t = time.perf_counter()
    llm = Llama(model_path=gguf, n_ctx=ctx, n_threads=threads, n_threads_batch=threads,
                use_mmap=True, logits_all=False, verbose=False)
    rec.save(load_s=time.perf_counter() - t, note=note)
    times: list[float] = []
    tokens: list[int] = []
    t0 = time.perf_counter()
    for tok in llm.generate(prompt, temp=0.0, top_k=1, top_p=1.0, min_p=0.0,
                            repeat_penalty=1.0, reset=True):
        times.append(time.perf_counter() - t0)
        tokens.append(int(tok))
        rec.token(times, tokens)
        if len(tokens) >= max_tokens:
            break


def _run_hf(out: str, model: str, budget: str, prompt: list[int], max_tokens: int,
            threads: int, cpu_bytes: int, offload_dir: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    rec = _Recorder(out, {"engine": "hf", "budget": budget,
                          "hf_cpu_memory_bytes": cpu_bytes})
    rec.save(note="loading")
    t = time.perf_counter()
    m = AutoModelForCausalLM.from_pretrained(model, dtype=torch.bfloat16, device_map="auto",
                                             max_memory={"cpu": cpu_bytes},
                                             offload_folder=offload_dir)
    m.eval()
    placed = getattr(m, "hf_device_map", {}) or {}
    on_disk = sum(1 for v in placed.values() if v == "disk")
    copied = sum(f.stat().st_size for f in Path(offload_dir).rglob("*") if f.is_file())
    note = f"{on_disk} of {len(placed)} modules on disk, offload copy {copied / 1e9:.1f} GB"
    rec.save(load_s=time.perf_counter() - t, offload_copy_bytes=copied, note=note)
    times: list[float] = []
    tokens: list[int] = []
    ids = torch.tensor([prompt])
    t0 = time.perf_counter()
    with torch.inference_mode():
        o = m(ids, use_cache=True)
        for _ in range(max_tokens):
            tok = int(o.logits[0, -1].float().argmax())
            times.append(time.perf_counter() - t0)
            tokens.append(tok)
            rec.token(times, tokens)
            if len(tokens) >= max_tokens:
                break
            o = m(torch.tensor([[tok]]), past_key_values=o.past_key_values, use_cache=True)


_CGROUP_V1 = Path("/sys/fs/cgroup/memory")


def parse_caps(text: str | None, budgets: list[str]) -> dict[str, int]:
    """'12.6GiB,19.3GiB' -> {budget: bytes}, one cap per budget in order (llama.cpp runs
    once per cap with all of its memory, page cache included, held to it)."""
    from sparsa.config import parse_size

    if not text:
        return {}
    caps = [c.strip() for c in text.split(",") if c.strip()]
    if len(caps) != len(budgets):
        raise ValueError(f"--llamacpp-caps needs one size per budget ({len(budgets)}); "
                         f"got {len(caps)}")
    return {b: parse_size(c) for b, c in zip(budgets, caps)}


def join_memory_cgroup(limit: int, root: Path = _CGROUP_V1) -> Path:
    """Move this process into a fresh memory cgroup (v1) limited to `limit` bytes of
    memory, page cache included; the parent removes it after the process exits."""
    cg = root / f"sparsa-bench-{os.getpid()}"
    cg.mkdir()
    (cg / "memory.limit_in_bytes").write_text(str(limit))
    (cg / "cgroup.procs").write_text(str(os.getpid()))
    return cg


def _remove_cgroups(root: Path = _CGROUP_V1) -> None:
    for cg in root.glob("sparsa-bench-*"):
        with contextlib.suppress(OSError):  # still in use: left for the next run
            cg.rmdir()


def run_isolated(fn, args: tuple, timeout: float | None) -> dict:
    """`fn(result_path, *args)` in a spawned process; its last saved result, with
    `timed_out` / `exitcode` when it did not finish cleanly."""
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "result.json")
        p = ctx.Process(target=fn, args=(path, *args))
        p.start()
        p.join(timeout)
        timed_out = p.is_alive()
        if timed_out:
            p.terminate()
            p.join(30)
            if p.is_alive():
                p.kill()
                p.join()
        try:
            res = json.loads(Path(path).read_text())
        except (OSError, ValueError):
            res = {}
    if timed_out:
        res["timed_out"] = True
        note = f"; killed at the {timeout:.0f} s timeout"
        res["note"] = (res.get("note", "") + note).lstrip("; ")
    elif p.exitcode:
        res["exitcode"] = p.exitcode
        res["note"] = (res.get("note", "") + f"; exited with {p.exitcode}").lstrip("; ")
    return res


def _drop_caches() -> None:
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError as e:
        print(f"(cannot drop the page cache: {e})", flush=True)


def _uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return ""


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="sparsa bench beyond-ram",
                                 description=__doc__.splitlines()[0])
    ap.add_argument("model", help="HF model directory (safetensors)")
    ap.add_argument("--budgets", default="25%,50%",
                    help="comma-separated expert budgets (of expert bytes, or sizes)")
    ap.add_argument("--engines", "--peers", dest="engines", default="sparsa,llama.cpp,hf",
                    help="comma-separated: sparsa, llama.cpp, hf")
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--hf-max-tokens", type=int, default=4,
                    help="transformers reads every offloaded weight per token: fewer tokens")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per run")
    ap.add_argument("--gguf", default=None, help="llama.cpp model (default: convert MODEL)")
    ap.add_argument("--gguf-type", default="bf16", choices=["bf16", "int8", "none"],
                    help="weight form of the converted GGUF (sparsa names: int8 = Q8_0)")
    ap.add_argument("--hf-offload-dir", default=None,
                    help="accelerate's offload_folder (default: MODEL.hf-offload, removed "
                         "after each run)")
    ap.add_argument("--hf-headroom", default="1GiB",
                    help="added to non-expert bytes + budget for accelerate's cpu memory")
    ap.add_argument("--llamacpp-caps", default=None,
                    help="comma-separated sizes, one per budget: also run llama.cpp in a "
                         "memory cgroup of that size (page cache included), e.g. Sparsa's "
                         "peak RSS at each budget")
    ap.add_argument("--no-llamacpp-uncapped", action="store_true",
                    help="with --llamacpp-caps: skip the run with unlimited page cache")
    ap.add_argument("--drop-caches", action="store_true",
                    help="sync and drop the OS page cache before every run (needs root)")
    ap.add_argument("--json", dest="json_out", default=None)
    ap.add_argument("--from-json", nargs="+", default=None, metavar="FILE",
                    help="run nothing: print the table and ratios of earlier --json files")
    # Sparsa's settings (the engine's flags; the thread count goes to every engine)
    from sparsa.bench.offload import SWEPT
    from sparsa.config import add_engine_arguments

    add_engine_arguments(ap, defaults={"num_threads": 2}, exclude=SWEPT)
    return ap


def main(argv: list[str] | None = None) -> int:
    from sparsa.config import engine_kwargs, parse_size, resolve_engine_args

    args = build_parser().parse_args(argv)
    settings = engine_kwargs(args)
    resolve_engine_args(args)
    if args.from_json:
        results = [r for f in args.from_json for r in json.loads(Path(f).read_text())]
        print(format_results(results))
        for line in ratio_lines(results) + same_tokens(results):
            print(line)
        return 0
    engines = parse_engines(args.engines)
    budgets = [b.strip() for b in args.budgets.split(",") if b.strip()]
    model = Path(args.model)
    cfg = json.loads((model / "config.json").read_text())
    prompt = prompt_ids(int(cfg["vocab_size"]), args.prompt_len)
    expert_b, other_b = checkpoint_split(model)
    print(f"{model}: {expert_b / 2**30:.2f} GiB of routed experts, {other_b / 2**30:.2f} GiB "
          f"other; prompt {args.prompt_len} ids {prompt[:6]}..., {args.max_tokens} new "
          f"tokens, {args.num_threads} threads", flush=True)
    results: list[dict] = []

    def record(r: dict, label: str) -> None:
        r.setdefault("engine", label.split()[0])
        r.setdefault("budget", label.split()[-1])
        r["uptime_before"] = up
        results.append(r)
        print(f"{label}: TTFT {_fmt(r.get('ttft_s'))} s, decode "
              f"{_fmt(r.get('decode_tok_s'), '.3f')} tok/s, {r.get('n_tokens', 0)} tokens, "
              f"peak RSS {(r.get('peak_rss_bytes') or 0) / 2**30:.2f} GiB, read "
              f"{(r.get('read_bytes') or 0) / 1e9:.1f} GB; {r.get('note', '')}", flush=True)
        if args.json_out:
            Path(args.json_out).write_text(json.dumps(results, indent=2))

    sparsa_opts = {**settings, "prompt_len": args.prompt_len, "max_tokens": args.max_tokens}
    caps = parse_caps(args.llamacpp_caps, budgets)
    for engine in engines:
        runs = budgets
        if engine == "llama.cpp":
            runs = ([] if caps and args.no_llamacpp_uncapped else ["mmap"]) + list(caps)
        gguf = None
        if engine == "llama.cpp":
            from sparsa.bench.peers.llamacpp import LlamaCpp, default_cache

            gguf = Path(args.gguf) if args.gguf else \
                LlamaCpp(default_cache()).convert(model, args.gguf_type)
        for b in runs:
            if args.drop_caches:
                _drop_caches()
            up = _uptime()
            print(f"[{engine} {b}] {up}", flush=True)
            if engine == "sparsa":
                r = run_isolated(_run_sparsa, (str(model), b, sparsa_opts), args.timeout)
            elif engine == "llama.cpp":
                r = run_isolated(_run_llamacpp, (str(gguf), prompt, args.max_tokens,
                                                 args.num_threads,
                                                 args.prompt_len + args.max_tokens + 16,
                                                 b, caps.get(b, 0)),
                                 args.timeout)
                _remove_cgroups()
            else:
                cpu = hf_cpu_memory(other_b, budget_bytes(b, expert_b),
                                    parse_size(args.hf_headroom))
                off = Path(args.hf_offload_dir or f"{model}.hf-offload")
                off.mkdir(parents=True, exist_ok=True)
                need = hf_offload_copy_bytes(expert_b, other_b, cpu)
                free = shutil.disk_usage(off).free
                if need + (2 << 30) > free:  # never fill the disk for it
                    off.rmdir()
                    record({"engine": "hf", "budget": b,
                            "note": f"skipped: its offload copy needs ~{need / 1e9:.0f} GB, "
                                    f"{free / 1e9:.0f} GB free"}, f"{engine} {b}")
                    continue
                try:
                    r = run_isolated(_run_hf, (str(model), b, prompt, args.hf_max_tokens,
                                               args.num_threads, cpu, str(off)), args.timeout)
                finally:
                    shutil.rmtree(off, ignore_errors=True)
            record(r, f"{engine} {b}")
    print()
    print(format_results(results))
    for line in ratio_lines(results) + same_tokens(results):
        print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
