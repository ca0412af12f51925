"""The low-precision tier for on_miss="low_precision" (HOBBIT's idea, on a CPU).

At load time every routed expert is read once from the checkpoint (through the same
`ExpertReader`, so the corruption check runs on each) and quantized to int8 (per output
channel) or int4 (groups of `group_size`), with the schemes and kernels of
`sparsa.layers.quantization`. The compressed copies stay resident for the whole run, in their
own accounting (`nbytes`), outside the compute-ready cache's budget. When a layer needs an
expert that the cache does not have ready, `OffloadedExperts` computes that batch's rows with
the copy here (`int8_matmul` / `int4_matmul`) instead of waiting for the full-precision load,
which continues in the background so that later uses hit.

Layout: per expert w13 as [2I, H] (gate rows, then up rows) and w2 as [H, I], [out, in] as
`QuantizedExperts` keeps them.
"""

from __future__ import annotations

import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor

import torch
from torch.nn import functional as F

from sparsa.layers.quantization.matmul import int4_matmul, int8_matmul
from sparsa.layers.quantization.schemes import (
    dequantize_int4_packed,
    dequantize_int8,
    quantize_int4_packed,
    quantize_int8_padded,
)

METHODS = ("int8", "int4")


def _nbytes(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()


class LowPrecisionExperts:
    """Quantized copies of every (layer, expert), computed with on a cache miss."""

    def __init__(self, method: str, intermediate_size: int, group_size: int = 64,
                 clip_search: bool = True):
        if method not in METHODS:
            raise ValueError(f"low_precision must be one of {METHODS}; got {method!r}")
        self.method = method
        self.group_size = group_size
        self.clip_search = clip_search
        self.intermediate_size = intermediate_size
        # (layer, expert) -> ((w13 q, w13 scale | sm, w13 sm fp32 | None), (same for w2))
        self._experts: dict[tuple[int, int], tuple[tuple, tuple]] = {}
        self.nbytes = 0
        self.build_seconds = 0.0
        self.calls = 0  # expert_forward calls (one per substituted expert and batch)
        self.rows = 0  # token rows computed in low precision

    def __len__(self) -> int:
        return len(self._experts)

    def __contains__(self, key: tuple[int, int]) -> bool:
        return key in self._experts

    def _quantize(self, w_nk: torch.Tensor) -> tuple:
        if self.method == "int8":
            q, s = quantize_int8_padded(w_nk)
            return q, s, None
        q, sm = quantize_int4_packed(w_nk, self.group_size, self.clip_search)
        # Off the CPU the reference path runs on an fp32 copy of the (small) scale table.
        return q, sm, None if sm.device.type == "cpu" else sm.float()

    def add(self, layer: int, expert: int, w13: torch.Tensor, w2: torch.Tensor) -> None:
        """Quantize one expert given in FusedExperts' layout (w13 [H, 2I], w2 [I, H])."""
        self.add_out_in(layer, expert, w13.t(), w2.t())

    def add_out_in(self, layer: int, expert: int, w13: torch.Tensor, w2: torch.Tensor
                   ) -> None:
        """Quantize one expert given as [out, in]: w13 [2I, H] (gate rows, then up), w2
        [H, I]."""
        parts = (self._quantize(w13), self._quantize(w2))
        old = self._experts.get((layer, expert))
        if old is not None:
            self.nbytes -= sum(_nbytes(t) for p in old for t in p)
        self._experts[(layer, expert)] = parts
        self.nbytes += sum(_nbytes(t) for p in parts for t in p)

    def _mm(self, part: tuple, x: torch.Tensor) -> torch.Tensor:
        q, s, s32 = part
        if self.method == "int8":
            return int8_matmul(x, q, s)
        return int4_matmul(x, q, s, self.group_size, s32)

    def _dequantize(self, part: tuple, n: int, k: int) -> torch.Tensor:
        q, s, _ = part
        if self.method == "int8":
            return dequantize_int8(q[:, :k], s)
        return dequantize_int4_packed(q, s, n, k)

    def dequantized(self, layer: int, expert: int, hidden_size: int
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The weights this tier computes with, fp32 in FusedExperts' layout (w13 [H, 2I],
        w2 [I, H])."""
        w13, w2 = self._experts[(layer, expert)]
        inter = self.intermediate_size
        return (self._dequantize(w13, 2 * inter, hidden_size).t(),
                self._dequantize(w2, hidden_size, inter).t())

    def expert_forward(self, layer: int, expert: int, x: torch.Tensor) -> torch.Tensor:
        """Expert `expert` of `layer`'s SwiGLU over the rows of x, in x's dtype."""
        w13, w2 = self._experts[(layer, expert)]
        self.calls += 1
        self.rows += x.shape[0]
        h = self._mm(w13, x)[:, : 2 * self.intermediate_size]
        gate, up = h.chunk(2, dim=-1)
        return self._mm(w2, F.silu(gate) * up)

    @classmethod
    def build(cls, reader, keys, method: str, intermediate_size: int, group_size: int = 64,
              io_threads: int = 2) -> LowPrecisionExperts:
        """Read every expert in `keys` once through `reader` (reads run ahead on
        `io_threads` threads while the previous experts are quantized) and quantize it."""
        from tqdm import tqdm

        tier = cls(method, intermediate_size, group_size)
        t0 = time.perf_counter()
        keys = sorted(keys)
        window = max(2, 2 * io_threads)  # full-precision experts in memory at once, at most
        bar = tqdm(total=len(keys), desc=f"Low-precision ({method}) expert copies",
                   unit=" experts", disable=None, leave=False)
        with bar, ThreadPoolExecutor(io_threads, thread_name_prefix="sparsa-lowp-read") as pool:
            pending: deque = deque()
            it = iter(keys)
            for key in it:
                pending.append((key, pool.submit(reader.load, *key)))
                if len(pending) >= window:
                    break
            while pending:
                key, fut = pending.popleft()
                nxt = next(it, None)
                if nxt is not None:
                    pending.append((nxt, pool.submit(reader.load, *nxt)))
                w = fut.result()
                if len(w) == 3:  # the reader's native layout: gate, up, down as [out, in]
                    tier.add_out_in(*key, torch.cat(w[:2]), w[2])
                else:
                    tier.add(*key, *w)
                del w
                bar.update(1)
        tier.build_seconds = time.perf_counter() - t0
        return tier

    def report(self) -> dict:
        return {"low_precision": self.method if self.method == "int8"
                else f"int4-g{self.group_size}",
                "low_precision_bytes": self.nbytes, "low_precision_experts": len(self),
                "low_precision_build_s": self.build_seconds,
                "low_precision_rows": self.rows}


def parse_on_miss(spec: str) -> list[tuple[str, str]]:
    """Command-line lists of miss handlings to compare: "wait,int4,int8" ->
    [("wait", "int4"), ("low_precision", "int4"), ("low_precision", "int8")] as
    (on_miss, low_precision) pairs; "low_precision" alone means int4, "host" is Fiddler's
    compute-where-it-lives (needs a host tier)."""
    out = []
    for item in (s.strip() for s in spec.split(",")):
        if item in ("wait", "host"):
            out.append((item, "int4"))
        elif item in METHODS:
            out.append(("low_precision", item))
        elif item == "low_precision":
            out.append(("low_precision", "int4"))
        else:
            raise ValueError(f"--on-miss takes a comma-separated list of wait, host, int4, "
                             f"int8 (low precision on a miss); got {item!r}")
    if not out:
        raise ValueError("--on-miss is empty")
    return out
