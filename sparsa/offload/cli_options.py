"""The expert-offloading options that `sparsa generate / serve / trace / bench` share, and
their mapping to `OffloadConfig` fields."""

from __future__ import annotations

import argparse
from typing import Any

from sparsa.config import ENGINE_POLICIES, PREFETCH_CHOICES


def positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def add_offload_options(p: argparse.ArgumentParser) -> None:
    o = p.add_argument_group("expert offloading (MoE models)")
    o.add_argument("--expert-memory", default=None, metavar="SIZE",
                   help="keep routed experts on disk and at most SIZE of them in memory, e.g. "
                        "25%% (of all expert bytes), 4GiB, or auto (what the machine has "
                        "available after the rest of the model; default: every expert "
                        "resident)")
    o.add_argument("--offload-policy", default="lru", choices=list(ENGINE_POLICIES),
                   help="eviction policy of the expert cache (activation: MoE-Infinity's, "
                        "needs --offload-predictor-trace)")
    o.add_argument("--offload-prefetch", default="lookahead", choices=list(PREFETCH_CHOICES),
                   help="lookahead: the next layer's router on this layer's input; history: "
                        "predictors fit on --offload-predictor-trace; or both")
    o.add_argument("--offload-predictor-trace", default=None, metavar="TRACE",
                   help="a routing trace of this model (sparsa trace) for history prefetch")
    o.add_argument("--offload-history-topk", type=positive_int, default=None, metavar="K",
                   help="experts per token history prefetch loads (default: the router's k)")
    o.add_argument("--offload-on-miss", default="wait", choices=["wait", "int4", "int8", "host"],
                   help="wait for a missing expert's load (exact), compute it with an "
                        "int4/int8 copy kept in RAM (HOBBIT; lossy), or, with "
                        "--offload-host-memory, on the CPU from its host copy (Fiddler)")
    o.add_argument("--offload-host-memory", default=None, metavar="SIZE",
                   help="a host-memory tier of experts between the device cache and the disk "
                        "(pinned on CUDA), e.g. 16GiB, 50%% of the expert bytes, or auto "
                        "(the host memory available at load, less a reserve)")
    o.add_argument("--offload-host-compute-rows", type=positive_int, default=4, metavar="N",
                   help="with --offload-on-miss host: the most rows a miss computes on the CPU")
    o.add_argument("--offload-capacity", default="global", choices=["global", "per_layer"],
                   help="one pool of experts for all layers, or an equal share per MoE layer")
    o.add_argument("--offload-io-threads", type=positive_int, default=2,
                   help="background threads reading experts")
    o.add_argument("--offload-store-dir", default=None, metavar="DIR",
                   help="with -q int8/int4: where the quantized expert store is built on "
                        "first use and reused (default: $SPARSA_EXPERT_STORE, else "
                        "~/.cache/sparsa/experts)")
    o.add_argument("--offload-compression", default="none", choices=["none", "zstd"],
                   help="zstd: read experts from a lossless store of zstd-compressed byte "
                        "planes, written on first use to --offload-store-dir (~0.68x the "
                        "bytes of a bf16 checkpoint; not with -q int8/int4)")



def offload_fields(args: argparse.Namespace) -> dict[str, Any]:
    """OffloadConfig fields from the --expert-memory / --offload-* options ({} when off)."""
    if getattr(args, "expert_memory", None) is None:
        return {}
    miss = args.offload_on_miss
    return dict(expert_memory=args.expert_memory, policy=args.offload_policy,
                prefetch=args.offload_prefetch, predictor_trace=args.offload_predictor_trace,
                history_topk=args.offload_history_topk,
                on_miss=miss if miss in ("wait", "host") else "low_precision",
                low_precision=miss if miss in ("int4", "int8") else "int4",
                io_threads=args.offload_io_threads,
                store_dir=getattr(args, "offload_store_dir", None),
                host_memory=args.offload_host_memory,
                host_compute_max_rows=args.offload_host_compute_rows,
                compression=getattr(args, "offload_compression", "none"),
                capacity=getattr(args, "offload_capacity", "global"))
