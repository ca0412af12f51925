"""`sparsa bench --suite real|minis --vs llama.cpp`: `sparsa bench --vs` over a list of model
shapes (dummy weights of the built-in configs) and weight formats, each against the
llama.cpp types of equal bits (int8: Q8_0; int4: Q4_K_M and Q4_0).

Before each entry the disk (dummy checkpoint, GGUFs, the unquantized GGUF llama-quantize
starts from) and the RAM (Sparsa's weights, the largest GGUF) it needs are estimated from the
config; an entry that does not fit is skipped with the reason printed. Sparsa's model is freed
before the peer's runs (sparsa/bench_vs.py) and between entries. The unquantized GGUF that an
entry wrote only to feed llama-quantize is deleted after it (it is the largest file).
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from sparsa.bench.vs import mem_available


@dataclass(frozen=True)
class SuiteEntry:
    model: str  # a built-in config (sparsa/models/builtin_configs.py)
    quantization: str  # Sparsa's weight format
    vs_types: tuple[str, ...]  # llama.cpp GGUF types of equal bits


_INT8 = ("int8", ("q8_0",))
_INT4 = ("int4", ("q4_k_m", "q4_0"))
MINIS = [SuiteEntry(m, *q) for m in ("mixtral-mini", "qwen3moe-mini") for q in (_INT8, _INT4)]
SUITES: dict[str, list[SuiteEntry]] = {
    "minis": MINIS,
    "real": [*MINIS, SuiteEntry("olmoe-1b-7b", *_INT8), SuiteEntry("olmoe-1b-7b", *_INT4),
             SuiteEntry("deepseek-v2-lite", *_INT4), SuiteEntry("qwen3-30b-a3b", *_INT4)],
}
# Bytes per parameter of each GGUF type (block sizes: q8_0 34 B / 32, q4_0 18 B / 32,
# q4_k_m about 4.85 bits on average, some tensors kept in q6_k).
GGUF_BYTES_PER_PARAM = {"f32": 4.0, "f16": 2.0, "bf16": 2.0, "q8_0": 34 / 32,
                        "q4_0": 18 / 32, "q4_k_m": 4.85 / 8, "q4_k_s": 4.6 / 8, "q6_k": 6.56 / 8}
CHECKPOINT_BYTES_PER_PARAM = 2  # the dummy writer stores bf16 shards
MARGIN = 2 << 30


def entry_needs(entry: SuiteEntry, checkpoint: Path, gguf_dir: Path,
                info: dict | None = None) -> dict:
    """{"disk_checkpoint", "disk_gguf", "ram"} bytes that `entry` still needs: the dummy
    checkpoint and the GGUFs not yet written (and the unquantized GGUF to quantize from),
    and the RAM of the larger of Sparsa's weights and the biggest GGUF (they are never
    needed together: the tg runs fall back to one engine after the other)."""
    if info is None:
        from sparsa.info import model_info

        info = model_info(entry.model, dtype="float32", quantization=entry.quantization)
    params = info["total_params"]
    ckpt = 0 if (checkpoint / "config.json").exists() else params * CHECKPOINT_BYTES_PER_PARAM
    missing = [t for t in entry.vs_types
               if not (gguf_dir / f"{checkpoint.name}-{t}.gguf").exists()]
    gguf = sum(params * GGUF_BYTES_PER_PARAM.get(t, 4.0) for t in missing)
    from sparsa.bench.peers.llamacpp import CONVERTER_TYPES

    if any(t not in CONVERTER_TYPES for t in missing):
        mid = _intermediate(checkpoint)
        if not (gguf_dir / f"{checkpoint.name}-{mid}.gguf").exists():
            gguf += params * GGUF_BYTES_PER_PARAM[mid]
    biggest = max(params * GGUF_BYTES_PER_PARAM.get(t, 4.0) for t in entry.vs_types)
    sparsa = info["weight_bytes"] + info.get("buffer_bytes", 0)
    return {"disk_checkpoint": int(ckpt), "disk_gguf": int(gguf), "ram": int(max(sparsa,
                                                                                  biggest))}


def _intermediate(checkpoint: Path) -> str:
    """The GGUF type llama-quantize starts from for `checkpoint` (written or to be)."""
    from sparsa.bench.peers.llamacpp import intermediate_type

    if (checkpoint / "config.json").exists():
        return intermediate_type(checkpoint)
    return "bf16" if CHECKPOINT_BYTES_PER_PARAM == 2 else "f32"


def skip_reason(needs: dict, free_checkpoint: int, free_gguf: int, same_disk: bool,
                available_ram: int | None) -> str | None:
    """Why an entry cannot run here (None when it can)."""
    gib = 1 << 30
    disk = [(needs["disk_checkpoint"] + needs["disk_gguf"], free_checkpoint)] if same_disk \
        else [(needs["disk_checkpoint"], free_checkpoint), (needs["disk_gguf"], free_gguf)]
    for need, free in disk:
        if need and need + MARGIN > free:
            return (f"needs {need / gib:.1f} GiB more disk (checkpoint "
                    f"{needs['disk_checkpoint'] / gib:.1f} + GGUFs {needs['disk_gguf'] / gib:.1f}"
                    f"), {free / gib:.1f} GiB free")
    if available_ram is not None and needs["ram"] + MARGIN > available_ram:
        return (f"needs {needs['ram'] / gib:.1f} GiB of RAM for the larger engine's weights, "
                f"{available_ram / gib:.1f} GiB available")
    return None


def _free(path: Path) -> tuple[int, int]:
    """(free bytes, device id) of the filesystem `path` is (or will be) on."""
    p = path
    while not p.exists():
        p = p.parent
    return shutil.disk_usage(p).free, p.stat().st_dev


def run_suite(args: argparse.Namespace) -> int:
    """Each entry of SUITES[args.suite] as `sparsa bench --model M -q Q --vs ... --vs-types T`;
    results in args.json_out (a directory: one JSON per entry and suite.json)."""
    from sparsa.bench.peers.llamacpp import default_cache
    from sparsa.bench.vs import run_vs
    from sparsa.bench.weights import ensure_checkpoint

    cache = Path(args.cache_dir)
    out_dir = Path(args.json_out) if args.json_out else None
    if out_dir:
        out_dir.mkdir(parents=True, exist_ok=True)
    gguf_dir = default_cache() / "models"
    summary: list[dict] = []
    for e in SUITES[args.suite]:
        label = f"{e.model} {e.quantization}"
        ckpt = cache / f"{e.model}-seed0"
        needs = entry_needs(e, ckpt, gguf_dir)
        (fc, dc), (fg, dg) = _free(ckpt), _free(gguf_dir)
        reason = skip_reason(needs, fc, fg, dc == dg, mem_available())
        row: dict = {"model": e.model, "quantization": e.quantization,
                     "vs_types": list(e.vs_types), "needs": needs}
        if reason:
            print(f"=== {label}: skipped: {reason}", flush=True)
            summary.append({**row, "skipped": reason})
            continue
        print(f"=== {label} vs llama.cpp {','.join(e.vs_types)}", flush=True)
        sub = copy.copy(args)
        sub.model, sub.quantization, sub.vs_types = e.model, e.quantization, ",".join(e.vs_types)
        sub.vs = args.vs or "llama.cpp"
        sub.json_out = str(out_dir / f"{e.model}-{e.quantization}.json") if out_dir else None
        results: dict = {"model": e.model, "workload": dict(vars(sub))}
        mid = gguf_dir / f"{ckpt.name}-{_intermediate(ckpt)}.gguf"
        had_mid = mid.exists()
        try:
            run_vs(sub, ensure_checkpoint(e.model, cache), results)
        except Exception as exc:  # one entry's failure does not end the suite
            print(f"=== {label}: failed: {type(exc).__name__}: {exc}", flush=True)
            summary.append({**row, "error": f"{type(exc).__name__}: {exc}"})
            continue
        finally:
            gc.collect()
            if not had_mid and mid.name.removeprefix(f"{ckpt.name}-").removesuffix(".gguf") \
                    not in e.vs_types:
                mid.unlink(missing_ok=True)  # the unquantized GGUF only fed llama-quantize
        summary.append({**row, **suite_row(results)})
        if out_dir:
            (out_dir / "suite.json").write_text(json.dumps(summary, indent=2, default=str))
    print(format_suite(summary))
    if out_dir:
        (out_dir / "suite.json").write_text(json.dumps(summary, indent=2, default=str))
    return 0


def suite_row(results: dict) -> dict:
    """The summary of one entry: tg medians per engine, ratios, roofline shares."""
    tg = results.get("tg") or {}
    shares = {k: v["roofline_share"] for k, v in results.items()
              if isinstance(v, dict) and "roofline_share" in v}
    return {"tg_tok_s": {k: v["median"] for k, v in tg.get("tok_s", {}).items()},
            "tg_ratio": {k: v["median"] for k, v in tg.get("ratio", {}).items()},
            "tg_mode": tg.get("mode"), "roofline_share": shares,
            "read_bandwidth_gb_s": results.get("read_bandwidth_gb_s")}


def format_suite(summary: list[dict]) -> str:
    lines = ["| model | q | sparsa tg | peer | peer tg | sparsa/peer | % roofline (sparsa / "
             "peer) |", "|---|---|---|---|---|---|---|"]
    for r in summary:
        if "skipped" in r or "error" in r:
            lines.append(f"| {r['model']} | {r['quantization']} | "
                         f"{'skipped: ' + r['skipped'] if 'skipped' in r else r['error']} "
                         "| | | | |")
            continue
        s = r["tg_tok_s"].get("sparsa")
        sh = r["roofline_share"]
        for peer, ratio in r["tg_ratio"].items():
            lines.append(f"| {r['model']} | {r['quantization']} | {s:.1f} | {peer} | "
                         f"{r['tg_tok_s'][peer]:.1f} | {ratio:.2f}x | "
                         f"{100 * sh.get('sparsa', 0):.0f}% / {100 * sh.get(peer, 0):.0f}% |")
    return "\n".join(lines)
