"""`sparsa cache-sim`: replay a routing trace through cache policies and predictors.

    sparsa cache-sim                                  # shared DeepSeek-V2-Lite heldout split
    sparsa cache-sim --capacity 6 --policy lru --predictor combined --prefetch 6
    sparsa cache-sim --capacity 156 --global --policy lru --predictor combined --prefetch 12
    sparsa cache-sim --sweep 6,10,13,16,19,26,32,48 --plot hit_rate.png
    sparsa cache-sim --trace run.csv.gz --train run_train.csv.gz   # Sparsa's own traces

Policies and predictors are fit on ``--train`` only (default: the shared train split when the
trace is the shared heldout one); the report is on ``--trace``.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import hmac
import json
import os
import pickle
import secrets
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from sparsa.offload.activation_policy import ActivationAware, activation_library
from sparsa.offload.lab.cache_sim import DSV2_LITE_EXPERT_BYTES, BandwidthModel, simulate
from sparsa.offload.lab.learned_eviction import (
    NextUseModel,
    ScorePolicy,
    next_use_scores,
    oracle_next_scores,
)
from sparsa.offload.lab.neural_predictor import NeuralPredictor
from sparsa.offload.lab.predictors import (
    CombinedPredictor,
    CooccurrencePredictor,
    Predictor,
    PrevTokenPredictor,
    TokenAffinityPredictor,
    predict_trace,
)
from sparsa.offload.lab.trace import Trace, load_trace
from sparsa.offload.policies import CachePolicy, LearnedRF, make_policy

__all__ = ["add_parser", "run"]

ALL_POLICIES = ("lru", "lfu", "lrfu", "arc", "activation", "learned", "belady")
# not in the default "all" set: nextuse trains a network on first use (minutes; then cached),
# oracle1 is an offline bound (knows the next token's experts at each layer) for analysis
EXTRA_POLICIES = ("nextuse", "oracle1")
NEEDS_TRAIN = ("activation", "learned", "nextuse")
PREDICTORS = {"cooc": CooccurrencePredictor, "token": TokenAffinityPredictor,
              "prev": PrevTokenPredictor, "combined": CombinedPredictor,
              "neural": NeuralPredictor}


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.replace(",", " ").split()]


def add_parser(subparsers: Any, add_common: Any = None,
               add_model_options: Any = None) -> argparse.ArgumentParser:
    """Register `cache-sim` on the `sparsa` command's subparsers (the signature of
    sparsa.cli's external commands; ``add_common`` adds --debug/--verbose)."""
    p = subparsers.add_parser(
        "cache-sim", help="replay an expert-routing trace through cache policies",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    if add_common is not None:
        add_common(p)
    p.add_argument("--trace", default=None,
                   help="trace to report on (default: the shared deepseek-v2-lite heldout)")
    p.add_argument("--train", default=None,
                   help="trace to fit policies/predictors on (default: the shared train "
                        "split when --trace is the default)")
    p.add_argument("--policy", default="all",
                   help=f"comma-separated, or all: {', '.join(ALL_POLICIES)}; also "
                        f"{', '.join(EXTRA_POLICIES)}")
    p.add_argument("--capacity", type=_ints, default=None,
                   help="experts resident per layer (or in all with --global); several "
                        "comma-separated values allowed (default: 10%%, 20%%, 30%%)")
    p.add_argument("--global", dest="global_", action="store_true",
                   help="one pool shared by all layers instead of per-layer capacity")
    p.add_argument("--predictor", default="none", choices=["none", *PREDICTORS],
                   help="prefetch with this predictor")
    p.add_argument("--prefetch", type=int, default=None,
                   help="experts prefetched per layer (default: the routing top-k)")
    p.add_argument("--lookahead", type=int, default=1,
                   help="predict layer l when layer l-D has finished (default 1)")
    p.add_argument("--expert-bytes", type=float, default=DSV2_LITE_EXPERT_BYTES)
    p.add_argument("--bandwidth", type=float, default=3.0e9, help="load bandwidth, bytes/s")
    p.add_argument("--compute-ms", type=float, default=5.0, help="compute time per layer")
    p.add_argument("--sweep", type=_ints, default=None,
                   help="capacities for the hit-rate curve (implies --plot)")
    p.add_argument("--plot", default=None, help="PNG path for hit rate vs cache size")
    p.add_argument("--json", action="store_true", help="print results as JSON")
    p.add_argument("--no-cache", action="store_true",
                   help="refit predictors and learned policies instead of reusing the fits "
                        "cached under ~/.cache/sparsa/offload")
    p.set_defaults(func=run)
    return p


def _default_paths(args: argparse.Namespace) -> tuple[Path, Path | None]:
    from sparsa.tokenizer import shared_dir

    base = shared_dir() / "traces" / "deepseek-v2-lite"
    if args.trace is None:
        trace = base / "heldout.csv.gz"
        if not trace.is_file():
            raise ValueError(f"{trace} not found: pass --trace or set SPARSA_SHARED")
        train = Path(args.train) if args.train else base / "train.csv.gz"
        return trace, train
    return Path(args.trace), Path(args.train) if args.train else None


def _cached(key: str, train_path: Path | None, fit: Callable[[], Any], enabled: bool) -> Any:
    """Fits are pure functions of the training file and their settings, and take a minute
    or two on the full train split, so they are pickled by (file, size, mtime, settings).
    Pickle runs code, so a cache file is unpickled only if it carries an HMAC made with this
    user's key (`_cache_key`): only files this code wrote are loaded; others are refit."""
    if not enabled or train_path is None:
        return fit()
    st = train_path.stat()
    ident = f"{train_path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{key}"
    root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "sparsa" / "offload"
    f = root / (hashlib.sha256(ident.encode()).hexdigest()[:24] + ".fit")
    secret = _cache_key(root)
    if f.is_file() and secret is not None:
        data = f.read_bytes()
        tag, payload = data[:32], data[32:]
        if hmac.compare_digest(tag, hmac.new(secret, payload, "sha256").digest()):
            with contextlib.suppress(Exception):
                return pickle.loads(payload)
    obj = fit()
    if secret is not None:
        with contextlib.suppress(OSError):
            payload = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
            tmp = f.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_bytes(hmac.new(secret, payload, "sha256").digest() + payload)
            tmp.replace(f)
    return obj


def _cache_key(root: Path) -> bytes | None:
    """This user's secret for the fit cache (created on first use, readable by the user
    only); None when it cannot be kept (then nothing is cached)."""
    path = root / ".key"
    try:
        root.mkdir(parents=True, exist_ok=True)
        if not path.is_file():
            fd = os.open(path.with_suffix(f".{os.getpid()}"), os.O_WRONLY | os.O_CREAT |
                         os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as fh:
                fh.write(secrets.token_bytes(32))
            os.replace(path.with_suffix(f".{os.getpid()}"), path)
        if path.stat().st_mode & 0o077:
            return None  # others could read it, and so forge cache files
        key = path.read_bytes()
        return key if len(key) == 32 else None
    except OSError:
        return None


def _policies(names: list[str], train: Trace | None, train_path: Path | None,
              cache: bool, trace: Trace) -> list[CachePolicy]:
    out: list[CachePolicy] = []
    for name in names:
        if name in NEEDS_TRAIN and train is None:
            print(f"sparsa cache-sim: skipping {name}: it needs --train", file=sys.stderr)
            continue
        if name == "activation":
            out.append(ActivationAware(activation_library(train)))  # type: ignore[arg-type]
        elif name == "learned":
            out.append(_cached("learned-rf-v1", train_path, lambda: _fit_learned(train),
                               cache))
        elif name == "nextuse":
            model = _cached("nextuse-v1", train_path,
                            lambda: NextUseModel().fit(train),  # type: ignore[arg-type]
                            cache)
            out.append(ScorePolicy(next_use_scores(model, trace), "nextuse"))
        elif name == "oracle1":
            out.append(ScorePolicy(oracle_next_scores(trace), "oracle1"))
        else:
            out.append(make_policy(name))
    return out


def _fit_learned(train: Trace) -> LearnedRF:
    first = np.zeros(train.num_tokens, dtype=bool)
    first[train.prompt_starts()] = True
    return LearnedRF.fit(train.experts, first, train.num_experts)


def _row(r: Any, belady: dict[int, float]) -> str:
    b = belady.get(r.capacity)
    rel = f"{r.hit_rate / b:6.3f}" if b else "     -"
    pf = (f"{r.prefetch_precision:6.3f} {r.prefetch_recall:6.3f}" if r.predicted
          else "     -      -")
    return (f"{r.policy:<11} {r.prefetch:>3} {r.capacity:>5} {r.hit_rate:8.4f} {rel} {pf} "
            f"{r.bytes_loaded / 1e9 / max(r.requests, 1) * 1e3:9.3f} "
            f"{1e3 * r.stall_s_per_token:9.1f} {r.replay_seconds:7.1f}")


def run(args: argparse.Namespace) -> int:
    t_start = time.perf_counter()
    trace_path, train_path = _default_paths(args)
    train = load_trace(train_path) if train_path is not None else None
    trace = load_trace(trace_path, vocab=train.vocab if train is not None else None,
                       num_experts=train.num_experts if train is not None else None)
    e = trace.num_experts
    names = list(ALL_POLICIES) if args.policy == "all" else args.policy.split(",")
    for n in names:
        if n not in ALL_POLICIES + EXTRA_POLICIES:
            raise ValueError(f"unknown policy {n!r}; choose from "
                             f"{', '.join(ALL_POLICIES + EXTRA_POLICIES)}")
    scale = trace.num_layers if args.global_ else 1
    caps = args.sweep or args.capacity or [max(trace.top_k, round(f * e) * scale)
                                           for f in (0.1, 0.2, 0.3)]
    caps = sorted({max(c, trace.top_k) for c in caps})
    bw = BandwidthModel(args.expert_bytes, args.bandwidth, args.compute_ms / 1e3)

    prefetch = None
    if args.predictor != "none":
        if train is None:
            raise ValueError("--predictor needs --train (predictors are fit on it)")
        def fit() -> Predictor:
            p: Predictor = PREDICTORS[args.predictor]()
            if isinstance(p, (CombinedPredictor, NeuralPredictor)):
                p.lookahead = args.lookahead
            return p.fit(train)  # type: ignore[arg-type]

        # neural v2: the prompt_neighbours features (2026-12-01)
        version = "v2"
        pred = _cached(f"{args.predictor}-{version}-la{args.lookahead}", train_path, fit,
                       not args.no_cache)
        m = args.prefetch or trace.top_k
        prefetch = predict_trace(pred, trace, m, args.lookahead)

    results = []
    belady: dict[int, float] = {}
    # with a predictor and a sweep, the demand-only curves are replayed too, for comparison
    modes = [None, prefetch] if prefetch is not None and args.sweep else [prefetch]
    for pol in _policies(names, train, train_path, not args.no_cache, trace):
        for pf in modes:
            rs = simulate(trace, pol, caps, per_layer=not args.global_, prefetch=pf,
                          bandwidth=bw, lookahead=args.lookahead)
            results.extend(rs)
            if pol.name == "belady" and pf is None:
                belady = {r.capacity: r.hit_rate for r in rs}
    if prefetch is not None and "belady" in names and not belady:  # the demand bound
        belady = {r.capacity: r.hit_rate for r in simulate(
            trace, make_policy("belady"), caps, per_layer=not args.global_)}
    total = time.perf_counter() - t_start

    if args.json:
        print(json.dumps({"trace": str(trace_path), "train": str(train_path),
                          "predictor": args.predictor, "lookahead": args.lookahead,
                          "belady_demand": belady, "seconds": total,
                          "results": [r.as_dict() for r in results]}, indent=2))
    else:
        where = "global" if args.global_ else "per layer"
        print(f"trace {trace_path} ({trace.num_tokens} tokens x {trace.num_layers} layers, "
              f"top-{trace.top_k} of {e}); capacity {where}; predictor {args.predictor}"
              + (f" (prefetch {prefetch.shape[2]}, lookahead {args.lookahead})"
                 if prefetch is not None else ""))
        print("policy      pf capacity hit_rate xBelady  prec  recall GB/1k-req "
              "stall_ms/tok replay_s")
        for r in results:
            print(_row(r, belady))
        print(f"(Belady = demand-paging optimum; stall from {bw.bandwidth / 1e9:g} GB/s, "
              f"{bw.expert_bytes / 1e6:.1f} MB experts, {1e3 * bw.compute_s:g} ms/layer; "
              f"total {total:.1f} s)")
    plot = args.plot or ("cache_sim_hit_rate.png" if args.sweep else None)
    if plot:
        _plot(results, plot, args, trace)
        print(f"plot: {plot}", file=sys.stderr)
    return 0


def _plot(results: list[Any], path: str, args: argparse.Namespace, trace: Trace) -> None:
    from sparsa.extras import require

    matplotlib = require("matplotlib", "plot", "cache-sim --plot")

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    denom = trace.num_experts * (trace.num_layers if args.global_ else 1)
    for name, pf in dict.fromkeys((r.policy, r.prefetch) for r in results):
        rs = sorted((r for r in results if (r.policy, r.prefetch) == (name, pf)),
                    key=lambda r: r.capacity)
        label = name + (f" + {args.predictor} prefetch" if pf else "")
        ax.plot([100 * r.capacity / denom for r in rs], [r.hit_rate for r in rs],
                marker="o" if not pf else "s", ls="--" if name == "belady" else "-",
                label=label)
    ax.set_xlabel("experts resident (% of " + ("all" if args.global_ else "each layer's")
                  + " experts)")
    ax.set_ylabel("hit rate")
    title = "expert cache hit rate"
    if args.predictor != "none":
        title += f", prefetch: {args.predictor}"
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
