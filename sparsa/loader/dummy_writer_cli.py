"""`sparsa write-dummy`: a dummy-weight checkpoint of a built-in config, on disk."""

from __future__ import annotations

import argparse
from collections.abc import Callable


def add_parser(sub, add_common: Callable, add_model_options: Callable) -> None:
    p = sub.add_parser(
        "write-dummy", help="write a random-weight checkpoint of a built-in config to disk",
        description="Sharded safetensors with the hub's tensor names (for models larger than "
                    "RAM: tensors are written one at a time).")
    add_common(p)
    p.add_argument("model", metavar="NAME", help="built-in config name, e.g. deepseek-v2-lite")
    p.add_argument("out", metavar="DIR")
    p.add_argument("--dtype", default="bfloat16", help="bfloat16 (default), float16, float32")
    p.add_argument("--shard-size", default="4GB")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from sparsa.loader.dummy_writer import write_dummy_checkpoint

    out = write_dummy_checkpoint(args.model, args.out, dtype=args.dtype,
                                 shard_size=args.shard_size, seed=args.seed)
    print(out)
    return 0
