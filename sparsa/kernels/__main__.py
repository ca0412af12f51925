"""`python -m sparsa.kernels build`: compile the native kernels now (they otherwise build on
first use). Exits non-zero when they cannot be built, saying why."""

from __future__ import annotations

import sys

from sparsa.kernels import _build_dir, load, unavailable_reason


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] != ["build"]:
        print("usage: python -m sparsa.kernels build [-v]", file=sys.stderr)
        return 2
    mod = load(verbose="-v" in argv, force=True)
    if mod is None:
        print(f"sparsa kernels: not built ({unavailable_reason()})", file=sys.stderr)
        return 1
    print(f"sparsa kernels: built in {_build_dir()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
