"""`sparsa bench profile-decode MODEL [-q int8] [--threads N]`: where a batch-1 decode
step's time goes.

Decodes `--tokens` tokens greedily twice: once plain (the step time), once with a timer
around every call into the native kernel module. It prints the time per step of each native
op and the rest (Python, torch ops, scheduling, sampling). The timers cost ~0.5 us a call,
so the second pass runs a little slower. Pin the process (`taskset -c 0`, `--threads 1`)
when other jobs share the cores.
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict


def profile(llm, tokens: int) -> dict:
    from sparsa import SamplingParams, kernels

    sp = SamplingParams(temperature=0, max_tokens=tokens + 1, ignore_eos=True)
    llm.generate([[1]], sp)  # warm-up

    def per_step() -> float:
        m = llm.generate([[1]], sp)[0].metrics
        return (m["finished_time"] - m["first_token_time"]) / tokens

    step = per_step()
    ext = kernels.load()
    spent: dict[str, float] = defaultdict(float)
    calls: dict[str, int] = defaultdict(int)
    originals = {}
    for name in dir(ext):
        f = getattr(ext, name)
        if name.startswith("_") or not callable(f):
            continue
        originals[name] = f

        def timed(*a, _f=f, _n=name):
            t = time.perf_counter()
            try:
                return _f(*a)
            finally:
                spent[_n] += time.perf_counter() - t
                calls[_n] += 1

        setattr(ext, name, timed)
    try:
        per_step()
    finally:
        for name, f in originals.items():
            setattr(ext, name, f)
    steps = tokens + 1  # the prefill's calls are counted too: one more "step"
    ops = {n: (spent[n] / steps, calls[n] / steps) for n in spent}
    native = sum(v for v, _ in ops.values())
    return {"step_s": step, "native_s": native, "other_s": step - native, "ops": ops}


def main(argv: list[str] | None = None) -> int:
    from sparsa.config import add_engine_arguments, engine_kwargs
    from sparsa.config.settings import add_model_argument, model_from_args

    ap = argparse.ArgumentParser(prog="sparsa bench profile-decode",
                                 description=__doc__.splitlines()[0])
    add_model_argument(ap)
    ap.add_argument("--tokens", type=int, default=128)
    add_engine_arguments(ap, defaults={"dtype": "float32", "quantization": "int8",
                                       "kv_cache_memory": "256MiB"})
    args = ap.parse_args(argv)
    model_from_args(args)
    from sparsa import LLM, kernels

    if not kernels.available():
        raise SystemExit("native kernels unavailable: nothing to time")
    llm = LLM(args.model, **engine_kwargs(args))
    r = profile(llm, args.tokens)
    print(f"step {r['step_s'] * 1e6:.0f} us: native kernels {r['native_s'] * 1e6:.0f} us, "
          f"everything else {r['other_s'] * 1e6:.0f} us")
    for name, (s, n) in sorted(r["ops"].items(), key=lambda kv: -kv[1][0]):
        print(f"  {name:24s} {s * 1e6:8.1f} us per step  ({n:.1f} calls)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
