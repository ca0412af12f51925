"""What a benchmark result has to say about the box it ran on: the CPU model and the SIMD
flags that decide which kernels run, the date, threads and library versions, and the memory
read bandwidth (the decode roofline) probed around the runs.

The read probe times a streaming read of a buffer much larger than the last-level cache at
the bench's thread count. It uses the native kernel module's ``read_bandwidth`` when the
extension has one (see ``NATIVE_READ_SPEC``), else a torch reduction (``int64`` sum) that
compiles to a vectorized streaming read. Each probe point takes several readings and keeps
their median and min-max; a run takes points before, between and after its measurements,
so the roofline it reports is the box's during the run, not a best case from before it.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

from sparsa.kernels import cpu

# The CPU flags (as lscpu / /proc/cpuinfo spell them) that select kernels here and in llama.cpp.
KEY_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx")

NATIVE_READ_SPEC = """\
double read_bandwidth(torch::Tensor buf, int64_t threads)
  buf: a contiguous CPU uint8 tensor (size a multiple of 64 bytes, 64-byte aligned start).
  Reads every byte of buf once with `threads` OpenMP threads (static split into contiguous
  chunks), 64-byte vector loads (AVX-512 where present, else AVX2), folded into an XOR/add
  accumulator that is returned via a volatile sink so the loads are not elided; no stores.
  Returns the seconds of that one pass (steady_clock around the parallel region only)."""


def parse_cpu(lscpu: str = "", cpuinfo: str = "") -> dict:
    """{"model": CPU model name, "flags": the KEY_FLAGS present} from `lscpu` output or, when
    that lacks them, /proc/cpuinfo text. "amx" stands for any amx_* flag."""
    return cpu.parse_cpu(lscpu, cpuinfo, KEY_FLAGS)


def cpu_info() -> dict:
    """parse_cpu of this machine (lscpu, falling back to /proc/cpuinfo)."""
    return cpu.cpu_info(KEY_FLAGS)


def environment(threads: int, llamacpp: str | None = None) -> dict:
    """The facts every result carries: CPU model and key flags, date and time (UTC), thread
    count, torch version and (when it ran) the llama.cpp version."""
    env = {"cpu": cpu_info(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "threads": threads, "torch": torch.__version__}
    if llamacpp:
        env["llama.cpp"] = llamacpp
    return env


def env_line(env: dict) -> str:
    cpu = env["cpu"]
    s = (f"{cpu['model']} [{' '.join(cpu['flags']) or 'no AVX2'}], {env['threads']} threads, "
         f"{env['date']}, torch {env['torch']}")
    return s + (f", llama.cpp {env['llama.cpp']}" if env.get("llama.cpp") else "")


def spread(values: list[float]) -> dict:
    """Median and min-max of `values` (and how many)."""
    if not values:
        raise ValueError("no values")
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "n": len(values)}


def fmt_spread(s: dict, scale: float = 1.0, digits: int = 1, unit: str = "") -> str:
    f = f"{{:.{digits}f}}"
    return (f"{f.format(s['median'] * scale)}{unit} "
            f"({f.format(s['min'] * scale)}-{f.format(s['max'] * scale)})")


def _native_reader() -> Callable[[torch.Tensor, int], float] | None:
    from sparsa import kernels

    ext = kernels.load()
    return getattr(ext, "read_bandwidth", None) if ext is not None else None


def _torch_read(buf: torch.Tensor, threads: int) -> float:
    x = buf.view(torch.int64)
    t = time.perf_counter()
    x.sum()
    return time.perf_counter() - t


class ReadProbe:
    """Read bandwidth at `threads` threads, probed at named points of a run.

    `point(label)` allocates the buffer (freed again after: a big model may need the RAM),
    warms it, takes `readings` timed passes and records their bandwidths; `summary()` gives
    the median and min-max over all readings of all points, and each point's own."""

    def __init__(self, threads: int, nbytes: int = 1 << 30, readings: int = 5,
                 reader: Callable[[torch.Tensor, int], float] | None = None,
                 use_native: bool = True):
        self.threads, self.nbytes, self.readings = threads, nbytes, readings
        if reader is not None:
            self.kind = getattr(reader, "__name__", "custom reader")
        else:
            reader = _native_reader() if use_native else None
            self.kind = "torch int64 sum" if reader is None else "native read_bandwidth"
        self.reader = reader or _torch_read
        self.points: list[tuple[str, list[float]]] = []

    def point(self, label: str) -> dict:
        old = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        try:
            buf = torch.ones(self.nbytes // 64 * 64, dtype=torch.uint8)
            self.reader(buf, self.threads)  # warm-up: page the buffer in
            bws = [buf.numel() / self.reader(buf, self.threads) for _ in range(self.readings)]
            del buf
        finally:
            torch.set_num_threads(old)
        self.points.append((label, bws))
        return spread(bws)

    def summary(self) -> dict:
        if not self.points:
            raise ValueError("no probe points taken")
        every = [b for _, bws in self.points for b in bws]
        return {**spread(every), "kind": self.kind, "threads": self.threads,
                "buffer_bytes": self.nbytes,
                "points": [{"at": lab, **spread(b)} for lab, b in self.points]}


def roofline_share(tok_s: float, bytes_per_token: float, bandwidth: float) -> float:
    """Fraction of the read roofline a decode rate reaches: tok/s x bytes per token / B/s."""
    return tok_s * bytes_per_token / bandwidth
