"""`sparsa prune`: write an MoE checkpoint with fewer experts per layer (lossy).

    sparsa prune MODEL --fraction 0.25 --calibration text.txt --out pruned/
    sparsa prune MODEL --count 2 --calibration text.txt --out merged/ --merge
    sparsa eval-ppl pruned/ --text held_out.txt          # what it cost

The experts' routing is recorded on the calibration text with the original model; pruning
drops each layer's least-used experts (router rows included), --merge groups similar
experts and averages each group into one instead. The output is a plain HF checkpoint
(transformers loads it too); `compression.json` in it records what was done.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from sparsa.config.compress import CRITERIA, GROUPINGS, ROUTER_RULES, SIMILARITIES

__all__ = ["add_parser", "run"]


def add_parser(subparsers: Any, add_common: Any = None,
               add_model_options: Any = None) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "prune", help="prune or merge an MoE checkpoint's experts into a new checkpoint",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    if add_common is not None:
        add_common(p)
    from sparsa.config.settings import add_model_argument

    add_model_argument(p, "HF MoE checkpoint folder (or hub id)")
    amount = p.add_mutually_exclusive_group(required=True)
    amount.add_argument("--fraction", type=float, help="share of each layer's experts removed")
    amount.add_argument("--count", type=int, help="experts removed per layer")
    p.add_argument("--calibration", required=True, metavar="TEXT",
                   help="UTF-8 text the routing statistics are recorded on")
    p.add_argument("--out", required=True, metavar="DIR", help="folder to write (new or empty)")
    p.add_argument("--merge", action="store_true",
                   help="merge similar experts instead of dropping the least used")
    p.add_argument("--calibration-tokens", type=int, default=None, metavar="N",
                   help="calibration tokens to run (default 8192)")
    p.add_argument("--criterion", choices=CRITERIA, default=None,
                   help="an expert's use: summed router weight (weight, default) or "
                        "tokens routed (frequency)")
    p.add_argument("--similarity", choices=SIMILARITIES, default=None,
                   help="--merge: compare experts by router logits (router, default), "
                        "outputs or mean output on calibration tokens")
    p.add_argument("--grouping", choices=GROUPINGS, default=None,
                   help="--merge: hierarchical clustering (default) or most-used centres")
    p.add_argument("--router", choices=ROUTER_RULES, default=None,
                   help="--merge: a merged expert's router row (default: mean)")
    p.add_argument("--no-align", dest="align", action="store_false", default=None,
                   help="--merge: average neurons without aligning them first")
    if add_model_options is not None:
        add_model_options(p)  # the weight form and device the calibration runs with
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from sparsa.compress.api import compress_checkpoint
    from sparsa.config import engine_config, engine_kwargs
    from sparsa.config.compress import CompressConfig
    from sparsa.engine.llm_engine import LLMEngine

    method = "merge" if args.merge else "prune"
    d: dict[str, Any] = {"calibration": args.calibration}
    for key in ("fraction", "count", "calibration_tokens", "criterion", "similarity",
                "grouping", "router", "align"):
        if getattr(args, key, None) is not None:
            d[key] = getattr(args, key)
    if method == "prune":
        given = [k for k in ("similarity", "grouping", "router", "align") if k in d]
        if given:
            raise ValueError(f"--{given[0].replace('_', '-')} is a --merge option")
    cfg = CompressConfig.from_dict(d, method)
    config = engine_config(args.model, **engine_kwargs(args))
    out = compress_checkpoint(config.model, cfg, args.out, LLMEngine, config.device)
    recipe = json.loads((out / "compression.json").read_text())
    e = recipe["experts"]
    print(f"{out}: {e['before']} -> {e['after']} experts per MoE layer "
          f"({'merged' if args.merge else 'pruned'} on {recipe['calibration_tokens_run']} "
          f"calibration tokens)")
    for layer, info in recipe["layers"].items():
        what = f"removed {info['removed']}" if "removed" in info else \
            "groups " + " ".join("+".join(map(str, g)) for g in info["groups"])
        print(f"  layer {layer}: {what}")
    return 0
