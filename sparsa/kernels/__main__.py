"""`python -m sparsa.kernels build`: compile the native kernels now (they otherwise build on
first use). `python -m sparsa.kernels tune [--threads N]`: measure the decode kernels' tiling
choices on this machine and cache the fastest (see `sparsa.kernels.tuning`). Both exit
non-zero when the kernels cannot be built, saying why."""

from __future__ import annotations

import argparse
import sys

from sparsa.kernels.build import _build_dir, load, unavailable_reason


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sparsa.kernels")
    p.add_argument("command", choices=("build", "tune"),
                   help="build: compile the kernels now; tune: measure rows per tile and "
                        "prefetch distance on this machine and cache the fastest")
    p.add_argument("-v", "--verbose", action="store_true")
    p.add_argument("--threads", type=int, default=0, help="tune at this thread count "
                   "(default: torch's, i.e. the cores)")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    mod = load(verbose=args.verbose, force=True)
    if mod is None:
        print(f"sparsa kernels: not built ({unavailable_reason()})", file=sys.stderr)
        return 1
    if args.command == "build":
        print(f"sparsa kernels: built in {_build_dir()}")
        return 0
    import torch

    from sparsa.kernels import tuning

    if args.threads < 0:
        p.error("--threads must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    choice, rates = tuning.tune(mod)
    print(f"kernel tuning at {torch.get_num_threads()} threads on {tuning.cpu_info()['model']} "
          f"(GB/s of weights, batch-1 GEMV; rows per tile:prefetch rows)")
    for kind, per in rates.items():
        cells = "  ".join(f"{r}:{pf} {v:5.1f}" for (r, pf), v in per.items())
        print(f"  {kind:<5} {cells}  -> {choice[kind][0]}:{choice[kind][1]}")
    print(f"cached in {tuning.cache_file()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
