"""Charts of the current benchmark figures: docs/bench-data.json -> docs/bench_*.png.

    python scripts/plot_benchmarks.py [--data docs/bench-data.json] [--out docs]

The data file holds the figures of BENCHMARKS.md's tables (each series with its command,
date and machine); this script only draws them. It uses matplotlib's Agg canvas directly
(no pyplot, no display).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA = ROOT / "docs" / "bench-data.json"
DEFAULT_OUT = ROOT / "docs"

# chart file name -> the data section it draws
CHARTS: dict[str, str] = {
    "bench_llamacpp_ratios.png": "llamacpp_ratios",
    "bench_beyond_ram.png": "beyond_ram",
    "bench_serving_goodput.png": "serving_goodput",
    "bench_perplexity.png": "perplexity",
    "bench_hit_rate_dsv2lite.png": "hit_rate",
}

COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2",
          "#17becf", "#7f7f7f"]
MARKERS = ["o", "s", "^", "D", "v", "P", "X", "<", ">"]
LINESTYLES = ["-", "--", "-.", ":", (0, (5, 1)), (0, (3, 1, 1, 1)), (0, (1, 1)),
              (0, (5, 2, 1, 2)), "-"]
HATCHES = ["", "//", ".."]

Data = dict[str, Any]

# where the perplexity chart puts each weight form's label: (offset in points, ha, va)
LABEL_PLACES: dict[str, tuple[tuple[int, int], str, str]] = {
    "fp32": ((0, -12), "center", "top"),
    "bf16": ((8, 10), "left", "bottom"),
    "int8": ((0, -12), "left", "top"),
    "int4": ((12, 0), "left", "center"),
}


def _machine(data: Data, key: str) -> str:
    return str(data["machines"][key]["label"])


def _new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(fig)
    return fig


def _note(fig: Figure, text: str) -> None:
    fig.text(0.01, 0.01, text, fontsize=7.5, color="#444444", ha="left", va="bottom",
             wrap=True)


def _save(fig: Figure, path: Path) -> Path:
    fig.savefig(path, format="png")
    return path


def plot_llamacpp_ratios(data: Data, path: Path) -> Path:
    """Grouped bars of pp512 and tg128 ratios (Sparsa / llama.cpp) per model and bits."""
    sec = data["llamacpp_ratios"]
    rows: list[dict[str, Any]] = sec["rows"]
    models = list(dict.fromkeys(r["model"] for r in rows))
    pairings = list(dict.fromkeys(f"{r['sparsa']} vs {r['gguf']}" for r in rows))
    fig = _new_figure(12.5, 5.6)
    axes = fig.subplots(1, 2)
    width = 0.8 / len(pairings)
    for ax, metric, label in ((axes[0], "pp512", "prefill pp512"),
                              (axes[1], "tg128", "batch-1 decode tg128")):
        for j, pairing in enumerate(pairings):
            xs: list[float] = []
            ys: list[float] = []
            lo: list[float] = []
            hi: list[float] = []
            for i, model in enumerate(models):
                row = next((r for r in rows if r["model"] == model
                            and f"{r['sparsa']} vs {r['gguf']}" == pairing), None)
                if row is None:
                    continue
                xs.append(i + (j - (len(pairings) - 1) / 2) * width)
                if metric == "pp512":
                    ys.append(row["pp512_ratio"])
                    lo.append(0.0)
                    hi.append(0.0)
                else:
                    med, rmin, rmax = row["tg128_ratio"]
                    ys.append(med)
                    lo.append(med - rmin)
                    hi.append(rmax - med)
            yerr = [lo, hi] if metric == "tg128" else None
            bars = ax.bar(xs, ys, width * 0.95, color=COLORS[j], hatch=HATCHES[j % len(HATCHES)],
                          edgecolor="black", linewidth=0.6, label=f"Sparsa {pairing}",
                          yerr=yerr, capsize=3, error_kw={"linewidth": 0.8})
            for bar, y, up in zip(bars, ys, hi):
                ax.annotate(f"{y:.2f}", (bar.get_x() + bar.get_width() / 2, y + up),
                            textcoords="offset points", xytext=(0, 3), ha="center",
                            fontsize=7.5)
        ax.axhline(1.0, color="black", linewidth=1.2, linestyle="-", label="parity (1.0)")
        ax.axhline(sec["goal"], color="#555555", linewidth=1.0, linestyle="--",
                   label=f"goal ({sec['goal']}x)")
        ax.set_xticks(range(len(models)))
        ax.set_xticklabels([m.replace(" shape", "\nshape (dense)") for m in models], fontsize=8)
        ax.set_ylabel(f"{label}: Sparsa / llama.cpp (ratio of tok/s)")
        ax.set_title(f"{label}" + (" (error bars: min-max of 5 paired rounds)"
                                   if metric == "tg128" else ""), fontsize=9.5)
        ax.grid(axis="y", alpha=0.3)
        ax.set_ylim(0, max(r["pp512_ratio"] for r in rows) * 1.12 if metric == "pp512"
                    else max(r["tg128_ratio"][2] for r in rows) * 1.12)
    handles, labels = axes[1].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=8.5, loc="lower center",
               ncol=min(len(labels), 4), bbox_to_anchor=(0.5, 0.06))
    fig.suptitle(f"{sec['title']}, 2 threads\n{_machine(data, sec['machine'])}, {sec['date']}; "
                 f"{sec['peer']}", fontsize=10.5)
    _note(fig, "qwen3moe-mini int4 measured at 14:37 UTC with the fused batched int4 MoE; its "
          "pp512 is noisy (0.81-1.42x across the day's runs). SmolLM2-135M shape: int8 only. "
          "SmolLM2 GGUF: llama.cpp's own files, Sparsa in the file's form. Commands per row: "
          "BENCHMARKS.md, table (a).")
    fig.tight_layout(rect=(0, 0.17, 1, 0.98))
    return _save(fig, path)


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def plot_beyond_ram(data: Data, path: Path) -> Path:
    """Decode tok/s against the expert budget, one line per engine."""
    sec = data["beyond_ram"]
    fig = _new_figure(9.5, 6.0)
    ax = fig.subplots()
    for k, s in enumerate(sec["series"]):
        runs: list[list[float]] = s["decode_tok_s_runs"]
        ys = [_mean(r) for r in runs]
        yerr = [[y - min(r) for y, r in zip(ys, runs)], [max(r) - y for y, r in zip(ys, runs)]]
        ax.errorbar(s["budgets_pct"], ys, yerr=yerr, color=COLORS[k], marker=MARKERS[k],
                    linestyle=LINESTYLES[k], linewidth=1.8, markersize=7, capsize=4,
                    label=s["engine"])
        for x, y in zip(s["budgets_pct"], ys):
            ax.annotate(f"{y:.2f}", (x, y), textcoords="offset points", xytext=(0, 9),
                        ha="center", fontsize=8.5, color=COLORS[k], fontweight="bold")
    sparsa = sec["series"][0]
    if len(sparsa["budgets_pct"]) > 2:
        x_auto = sparsa["budgets_pct"][-1]
        y_auto = _mean(sparsa["decode_tok_s_runs"][-1])
        ax.annotate('expert_memory="auto"\n(58.5%)', (x_auto, y_auto),
                    textcoords="offset points", xytext=(0, -30), ha="center", fontsize=8,
                    color=COLORS[0])
    for k, u in enumerate(sec["unbudgeted"], start=len(sec["series"])):
        y = _mean(u["decode_tok_s_runs"])
        ax.axhline(y, color=COLORS[k], linestyle=":", linewidth=2.0,
                   label=f"{u['engine']}: {y:.2f} (no budget)")
    ax.set_xlabel(sec["budget_unit"])
    ax.set_ylabel("decode tok/s (batch 1; mean of runs, bars: min-max)")
    ax.set_xlim(15, 65)
    ax.set_ylim(0, 2.3)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    ax.set_title(f"{sec['title']}\n{_machine(data, sec['machine'])}, {sec['date']} "
                 f"{sec['time_utc']} UTC, idle box\n{sec['note']}", fontsize=9.5)
    _note(fig, f"{sec['workload']}. The llama.cpp cgroup runs get Sparsa's peak RSS "
          "(page cache included) as their memory limit.")
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    return _save(fig, path)


def plot_serving_goodput(data: Data, path: Path) -> Path:
    """Goodput (and request throughput) against the offered request rate."""
    sec = data["serving_goodput"]
    rates: list[float] = sec["rates"]
    fig = _new_figure(8.5, 5.8)
    ax = fig.subplots()
    for k, s in enumerate(sec["series"]):
        ax.plot(rates, s["goodput"], color=COLORS[k], marker=MARKERS[k], linestyle="-",
                linewidth=2.0, markersize=8, label=f"{s['engine']}: goodput (met both SLOs)")
        ax.plot(rates, s["request_throughput"], color=COLORS[k], marker=MARKERS[k],
                linestyle="--", linewidth=1.2, markersize=6, fillstyle="none",
                label=f"{s['engine']}: requests served")
        for i, (x, y) in enumerate(zip(rates, s["goodput"])):
            first = i == 0
            ax.annotate(f"{y:.2f}", (x, y), textcoords="offset points",
                        xytext=(-10 if first else 10, -3), ha="right" if first else "left",
                        fontsize=9, color=COLORS[k], fontweight="bold")
    lo, hi = min(rates) - 0.5, max(rates) + 0.5
    ax.plot([lo, hi], [lo, hi], color="#888888", linestyle=":", linewidth=1.0,
            label="offered rate")
    ax.set_xlim(lo, hi)
    ax.set_ylim(0, hi)
    ax.set_xticks(rates)
    ax.set_xlabel("offered request rate (req/s, Poisson)")
    ax.set_ylabel("req/s")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    ax.set_title(f"{sec['title']}\n{_machine(data, sec['machine'])}, {sec['date']}; "
                 f"{sec['note']}", fontsize=9.5)
    _note(fig, sec["workload"] + ".")
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    return _save(fig, path)


def plot_perplexity(data: Data, path: Path) -> Path:
    """Perplexity against bytes per weight, one labelled point per weight form."""
    sec = data["perplexity"]
    models: list[dict[str, Any]] = sec["models"]
    fig = _new_figure(12.5, 5.6)
    axes = fig.subplots(1, len(models))
    for ax, m in zip(axes, models):
        forms: list[dict[str, Any]] = m["forms"]
        fp32 = forms[0]["ppl"]
        xs = [f["bytes_per_weight"] for f in forms]
        ax.plot(xs, [f["ppl"] for f in forms], color=COLORS[0], marker="o", linestyle="-",
                linewidth=1.0, markersize=8, label="weights only (exact activations)")
        dx = [f["bytes_per_weight"] for f in forms if "default_ppl" in f]
        dy = [f["default_ppl"] for f in forms if "default_ppl" in f]
        ax.plot(dx, dy, color=COLORS[1], marker="s", linestyle="none", markersize=9,
                fillstyle="none", markeredgewidth=1.5,
                label="engine default here (int8: W8A8 prefill; bf16/int4: bf16 GEMMs)")
        for f in forms:
            lines = [f["form"] + (" (nominal size)" if f.get("nominal_bytes") else ""),
                     f"{f['ppl']:.4f}" + ("" if f is forms[0]
                                          else f" ({(f['ppl'] / fp32 - 1) * 100:+.2f}%)")]
            if "default_ppl" in f:
                lines.append(f"{f['default']}: {f['default_ppl']:.4f} "
                             f"({(f['default_ppl'] / fp32 - 1) * 100:+.2f}%)")
            offset, ha, va = LABEL_PLACES.get(f["form"].split("-")[0], ((10, 8), "left", "bottom"))
            ax.annotate("\n".join(lines), (f["bytes_per_weight"], f["ppl"]),
                        textcoords="offset points", xytext=offset, ha=ha, va=va, fontsize=8)
        ax.set_xlim(0, 4.9)
        lo = min(min(f["ppl"] for f in forms), *dy)
        hi = max(max(f["ppl"] for f in forms), *dy)
        pad = (hi - lo) * 0.25
        ax.set_ylim(lo - pad, hi + pad * 0.5)
        ax.set_xlabel("bytes per parameter, whole model (weight bytes / parameters)")
        ax.set_ylabel("perplexity (lower is better)")
        ax.set_title(f"{m['model']} ({m['tokens']:,} predicted tokens)", fontsize=9.5)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7.5, loc="center right")
    fig.suptitle(f"{sec['title']}\n{_machine(data, sec['machine'])}, {sec['date']}",
                 fontsize=10.5)
    _note(fig, "Sizes from the weight MB of each form (2026-11-23); bf16's size is not in the "
          "log, drawn at the nominal 2 bytes. stories260K: first 100 windows of the slice.")
    fig.tight_layout(rect=(0, 0.04, 1, 0.98))
    return _save(fig, path)


def plot_hit_rate(data: Data, path: Path) -> Path:
    """Hit rate against cache size, one line per policy; Belady as the offline bound."""
    sec = data["hit_rate"]
    fig = _new_figure(10.0, 6.4)
    ax = fig.subplots()
    k = 0
    for s in sec["series"]:
        if s.get("bound"):
            ax.plot(s["capacity"], s["hit_rate"], color="black", marker="*", markersize=10,
                    linestyle="--", linewidth=2.4, label=f"{s['policy']} (offline bound)",
                    zorder=5)
            ax.annotate("Belady: offline bound", (s["capacity"][3], s["hit_rate"][3]),
                        textcoords="offset points", xytext=(-120, 8), fontsize=9,
                        fontweight="bold")
            continue
        offline = bool(s.get("offline"))
        ax.plot(s["capacity"], s["hit_rate"], color=COLORS[k], marker=MARKERS[k],
                linestyle=":" if offline else LINESTYLES[k], linewidth=1.6, markersize=6,
                label=s["policy"] + (" [6/13/19 only]" if len(s["capacity"]) < 8 else ""))
        k += 1
    ax.set_xlabel(sec["capacity_unit"])
    ax.set_ylabel("hit rate (share of expert requests resident at their layer)")
    top = ax.secondary_xaxis("top", functions=(lambda c: c / 64 * 100, lambda p: p * 64 / 100))
    top.set_xlabel("% of each layer's 64 experts", fontsize=8.5)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right", ncol=1)
    ax.set_title(f"{sec['title']}\n{sec['trace']}\n{_machine(data, sec['machine'])}, "
                 f"{sec['date']} (simulation: hit rates do not depend on the machine)",
                 fontsize=9)
    _note(fig, f"{sec['note']}. Command: {sec['command']}")
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    return _save(fig, path)


PLOTTERS = {
    "llamacpp_ratios": plot_llamacpp_ratios,
    "beyond_ram": plot_beyond_ram,
    "serving_goodput": plot_serving_goodput,
    "perplexity": plot_perplexity,
    "hit_rate": plot_hit_rate,
}


def plot_all(data: Data, out_dir: Path) -> list[Path]:
    """Write every chart of CHARTS into `out_dir`; returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    return [PLOTTERS[section](data, out_dir / name) for name, section in CHARTS.items()]


def main(argv: Sequence[str] | None = None) -> int:
    """Read the data file and write the charts."""
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="bench-data.json")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder for the PNGs")
    args = ap.parse_args(list(argv) if argv is not None else None)
    data = json.loads(args.data.read_text())
    for path in plot_all(data, args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
