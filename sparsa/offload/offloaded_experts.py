"""Expert offloading in the engine: MoE blocks whose experts come from an `ExpertCache`.

`OffloadedExperts` replaces a block's `FusedExperts`. When its layer runs it first starts
loads for every expert its tokens need (all misses in parallel on the I/O threads), then,
with gate lookahead on, applies the NEXT MoE layer's router to this layer's input and
prefetches the experts it picks (mixtral-offloading's trick: the residual stream changes
little between adjacent layers), and only then computes, expert by expert, waiting for each
load as it needs it. The grouping is FusedExperts' own (`GroupedExperts`). With the reader's
"resident" layout the arithmetic is FusedExperts' too (x @ W on [in, out] weights), so outputs
are bit-identical to the all-resident model; with the "native" layout (no transpose per
load; the default unless every expert fits the budget) experts compute with F.linear on the
checkpoint's [out, in] tensors, which rounds differently in the last bits (~1e-6 relative).

With a `HistoryPrefetcher` (prefetch "history" or "lookahead+history") the layer also
reports its routing to it and prefetches the history predictor's guesses for the next layer;
those are scored separately in `HistoryStats` (and together in `LookaheadStats`).

With a `LowPrecisionExperts` tier (on_miss="low_precision") an expert that is not ready when
its turn comes is computed with its quantized copy instead of waiting; its load goes on.

With a `HostTier` and on_miss="host" (Fiddler) an expert that is not on the device when its
turn comes but is in host memory is computed there, on the CPU, for a batch of up to
`host_compute_max_rows` rows; its copy to the device goes on. On a CPU-only machine the
host copy computes with the same arithmetic as the native layout's device copy.

With int8/int4 quantization the cache holds one-expert `QuantizedExperts` read from the
quantized expert store; each is computed with the kernel path the all-resident quantized
block takes for the whole batch (`QuantizedExperts.moe_path`: the fused native MoE kernel at
decode), so outputs match it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from sparsa.layers.moe import GroupedExperts, moe_blocks
from sparsa.layers.quantization import QuantizedExperts
from sparsa.layers.quantization.matmul import bf16_matmul
from sparsa.offload.expert_cache import ExpertCache
from sparsa.offload.history_prefetch import HistoryPrefetcher
from sparsa.offload.host_tier import HostTier
from sparsa.offload.low_precision import LowPrecisionExperts


@dataclass
class LookaheadStats:
    predicted: int = 0  # experts predicted for the next layer
    needed: int = 0  # experts the next layer then used
    correct: int = 0  # needed and predicted

    @property
    def recall(self) -> float:
        return self.correct / self.needed if self.needed else 0.0

    @property
    def precision(self) -> float:
        return self.correct / self.predicted if self.predicted else 0.0

    def score(self, predicted: set[int] | None, needed: list[int]) -> None:
        if predicted is not None:
            self.needed += len(needed)
            self.correct += len(predicted.intersection(needed))


class _CallState:
    """What one forward of an `OffloadedExperts` leaves for the next (a plain object:
    nn.Module's __setattr__ costs microseconds per assignment)."""

    __slots__ = ("batch", "history_predicted", "predicted", "protect")

    def __init__(self):
        self.predicted: set[int] | None = None  # what the previous layer prefetched for us
        self.history_predicted: set[int] | None = None  # the history predictor's part of it
        self.protect: set[tuple[int, int]] = set()
        self.batch: tuple[torch.Tensor, torch.Tensor] | None = None


class OffloadedExperts(GroupedExperts):
    def __init__(self, layer: int, num_experts: int, hidden_size: int, intermediate_size: int,
                 cache: ExpertCache, lookahead: LookaheadStats | None = None,
                 low_precision: LowPrecisionExperts | None = None, lookahead_extra: int = 0,
                 history: HistoryPrefetcher | None = None,
                 history_stats: LookaheadStats | None = None, history_topk: int = 0,
                 gate_lookahead: bool = True, host: HostTier | None = None,
                 host_compute_max_rows: int = 0):
        super().__init__()
        self.layer = layer
        self.num_experts = num_experts
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.cache = cache
        self.lookahead = lookahead
        self.low_precision = low_precision
        self.host = host  # computes misses it holds (on_miss="host"), when set
        self.host_compute_max_rows = host_compute_max_rows
        # experts beyond the next router's top-k to prefetch (its next most likely ones)
        self.lookahead_extra = lookahead_extra
        self.gate_lookahead = gate_lookahead and lookahead is not None
        self.history = history
        self.history_stats = history_stats
        self.history_topk = history_topk  # per token; 0: the router's k
        # Set by install_offloading (`link`): the next MoE block (for its router) and its
        # experts, as submodules and as a plain tuple (nn.Module's attribute lookup of a
        # submodule costs ~0.4 us, and forward runs once per layer per token).
        self.next_block: nn.Module | None = None
        self.next_experts: OffloadedExperts | None = None
        self._next: tuple[nn.Module, OffloadedExperts] | None = None
        self._call = _CallState()  # per-forward state, off nn.Module's __setattr__

    def link(self, next_block: nn.Module, next_experts: OffloadedExperts) -> None:
        self.next_block, self.next_experts = next_block, next_experts
        self._next = (next_block, next_experts)

    def forward(self, x: torch.Tensor, topk_weights: torch.Tensor,
                topk_ids: torch.Tensor) -> torch.Tensor:
        # Load in the order GroupedExperts will consume: slot order at batch 1, else by id.
        needed = topk_ids[0].tolist() if topk_ids.shape[0] == 1 else \
            sorted(set(topk_ids.reshape(-1).tolist()))
        call, layer, cache = self._call, self.layer, self.cache
        if self.lookahead is not None:
            self.lookahead.score(call.predicted, needed)
        if self.history_stats is not None:
            self.history_stats.score(call.history_predicted, needed)
        call.predicted = call.history_predicted = None
        call.protect = protect = {(layer, e) for e in needed}
        cache.prefetch(layer, needed, protect, guess=False)
        if self.history is not None:
            self.history.observe(layer, topk_ids)
        if self._next is not None and (self.lookahead is not None or self.history is not None):
            nxt = self._next[1]
            guess = set(self._guess_next(x)) if self.gate_lookahead else set()
            if self.history is not None:
                k = self.history_topk or topk_ids.shape[-1]
                mine = set(self.history.predict(nxt.layer, k))
                nxt._call.history_predicted = mine
                self.history_stats.predicted += len(mine)
                guess |= mine
            nxt._call.predicted = guess
            if self.lookahead is not None:
                self.lookahead.predicted += len(guess)
            cache.prefetch(nxt.layer, sorted(guess), protect)
        call.batch = (x, topk_ids)  # what picks a quantized expert's kernel path
        if topk_ids.shape[0] == 1:
            # Decode at batch 1 with every expert resident (any budget that holds the
            # working set): one locked cache call for the layer instead of an acquire and a
            # release per expert, then GroupedExperts' batch-1 sum without its per-expert
            # dispatch. The cache bookkeeping is acquire's, expert by expert, in slot order.
            weights = cache.acquire_resident(layer, needed)
            if weights is not None:
                try:
                    return self._resident_decode(weights, x, topk_weights, topk_ids)
                finally:
                    cache.release_many(layer, needed)
                    protect.clear()
        return super().forward(x, topk_weights, topk_ids)

    def _resident_decode(self, weights: list, x: torch.Tensor, topk_weights: torch.Tensor,
                         topk_ids: torch.Tensor) -> torch.Tensor:
        """One token, its k experts' weights in slot order: what GroupedExperts' batch-1
        path computes (sum over slots in order, each output times its routing weight),
        rounding for rounding. Quantized experts on the fused-kernel path get their routing
        weight passed to the kernel, which forms w * y once per element, as y * w does."""
        first = weights[0]
        if isinstance(first, QuantizedExperts) and topk_weights.dtype == torch.float32 \
                and first.moe_path(x, topk_ids, num_experts=self.num_experts) == "fused":
            tw = topk_weights.reshape(-1, 1)  # [k, 1]: row j is slot j's weight as [1, 1]
            out = first.fused_moe(x, tw[0:1], _ONLY_EXPERT)
            for j in range(1, len(weights)):
                out += weights[j].fused_moe(x, tw[j:j + 1], _ONLY_EXPERT)
            return out
        w = topk_weights[0].to(x.dtype)
        out = self._compute(first, x) * w[0]
        for j in range(1, len(weights)):
            out = out + self._compute(weights[j], x) * w[j]
        return out

    def _guess_next(self, x: torch.Tensor) -> list[int]:
        """The next MoE layer's router on this layer's input: its top-k, plus the next
        `lookahead_extra` experts by router score (more recall, less precision)."""
        block = self._next[0]
        _, nxt = block.route(x, guess=True)
        guess = set(nxt.reshape(-1).tolist())
        gate = getattr(block, "gate", None)
        if self.lookahead_extra and gate is not None:
            logits = gate(x)
            k = min(logits.shape[-1], nxt.shape[-1] + self.lookahead_extra)
            guess.update(torch.topk(logits, k, dim=-1).indices.reshape(-1).tolist())
        return sorted(guess)

    def expert_forward(self, e: int, x: torch.Tensor) -> torch.Tensor:
        # Experts run in ascending id order, the order the loads above were issued in; one
        # that is done is unprotected at once, so a batch needing more experts than the
        # budget holds streams them through the cache instead of deadlocking.
        lowp = self.low_precision
        protect = self._call.protect
        host = self.host if x.shape[0] <= self.host_compute_max_rows else None
        if host is not None:
            return self._forward_or_on_host(host, e, x)
        weights = self.cache.acquire(self.layer, e, protect, wait=lowp is None)
        if weights is None:  # not ready: the low-precision copy, while the load goes on
            protect.discard((self.layer, e))
            return lowp.expert_forward(self.layer, e, x)
        try:
            return self._compute(weights, x)
        finally:
            self.cache.release(self.layer, e)
            protect.discard((self.layer, e))

    def _forward_or_on_host(self, host: HostTier, e: int, x: torch.Tensor) -> torch.Tensor:
        """Fiddler: the device copy if it is ready; else the host tier's, computed on the
        CPU, if the tier holds it (the device load goes on); else wait for the device copy."""
        layer = self.layer
        held: list = []

        def take_host(key: tuple[int, int]) -> bool:
            raw = host.acquire(*key)
            if raw is not None:
                held.append(raw)
            return raw is not None

        weights = self.cache.acquire(layer, e, self._call.protect, wait=False,
                                     can_skip=take_host)
        try:
            if weights is None:
                host.count_compute(x.shape[0])
                return self._on_host(held[0], x)
            return self._compute(weights, x)
        finally:
            if weights is not None:
                self.cache.release(layer, e)
            if held:
                host.release(layer, e)
            self._call.protect.discard((layer, e))

    def _on_host(self, raw: tuple[torch.Tensor, ...], x: torch.Tensor) -> torch.Tensor:
        """One expert on the CPU from its host tensors over x's rows, in fp32 unless x is
        fp32 on the CPU already; back on x's device. The tensors are as read: (gate, up,
        down) [out, in] from the checkpoint, or a store's packed bytes, which `assemble`
        turns into CPU weights (quantized views of the host copy; decompressed ones)."""
        on_cpu = x.device.type == "cpu"
        xc = x if on_cpu and x.dtype == torch.float32 else x.to("cpu", torch.float32)
        reader = self.cache.reader
        weights = reader.assemble(raw) if reader.layout == "packed" else raw
        batch = None
        if not on_cpu:  # the kernel path the CPU would take for this batch
            batch = (xc, self._call.batch[1].cpu())
        y = self._compute(weights, xc, batch)
        return y if y.device == x.device and y.dtype == x.dtype else y.to(x.device, x.dtype)

    def _compute(self, weights, x: torch.Tensor, batch: tuple | None = None) -> torch.Tensor:
        """One expert's SwiGLU over the rows of x, from the weights the cache holds (or the
        host tier's; `batch`: the (x, topk_ids) that pick a quantized kernel path, when not
        the layer's own)."""
        if isinstance(weights, QuantizedExperts):  # one expert from the quantized store
            path = weights.moe_path(*(batch or self._call.batch), num_experts=self.num_experts)
            return weights.expert_rows(path, 0, x)
        if len(weights) == 3 and weights[0].dtype == torch.bfloat16 \
                and x.dtype == torch.float32 and x.device.type == "cpu":
            # bf16 experts in [out, in]: the bf16 weight form's matmul (the native kernel
            # widens each weight to fp32 in registers). Upcasting whole experts per call
            # cost ~13x more here, and its fresh 11-35 MB temporaries fragmented glibc's
            # heap until RSS outgrew RAM (DeepSeek-V2-Lite bf16, 25% budget: 24 GiB).
            gate, up, down = weights
            return bf16_matmul(F.silu(bf16_matmul(x, gate)) * bf16_matmul(x, up), down)
        if weights[0].dtype != x.dtype:  # stored narrower than compute (bf16): exact upcast
            weights = tuple(w.to(x.dtype) for w in weights)
        if len(weights) == 3:  # the checkpoint's [out, in] tensors, as loaded
            gate, up, down = weights
            return F.linear(F.silu(F.linear(x, gate)) * F.linear(x, up), down)
        w13, w2 = weights  # FusedExperts' [in, out] layout
        gate, up = (x @ w13).chunk(2, dim=-1)
        return (F.silu(gate) * up) @ w2

    def extra_repr(self) -> str:
        return (f"layer={self.layer}, num_experts={self.num_experts}, "
                f"hidden_size={self.hidden_size}, intermediate_size={self.intermediate_size}")


# the expert index of a one-expert block, as the fused kernel's [1, 1] id tensor
_ONLY_EXPERT = torch.zeros(1, 1, dtype=torch.int64)


def install_offloading(model: nn.Module, cache: ExpertCache, lookahead: bool,
                       low_precision: LowPrecisionExperts | None = None,
                       lookahead_extra: int = 0, history: HistoryPrefetcher | None = None,
                       history_topk: int = 0, host: HostTier | None = None,
                       host_compute_max_rows: int = 0
                       ) -> tuple[LookaheadStats, LookaheadStats]:
    """Swap every block's FusedExperts (its parameters may be on the meta device: they are
    never materialized) for OffloadedExperts over `cache` (and `low_precision` for misses).
    With `host`, misses the host tier holds compute on the CPU for batches of up to
    `host_compute_max_rows` rows. Returns the stats of all prefetch guesses (as
    "lookahead") and of the history predictor's alone."""
    stats = LookaheadStats() if lookahead or history is not None else None
    hstats = LookaheadStats()
    blocks = moe_blocks(model)
    new: list[OffloadedExperts] = []
    for layer, _, block in blocks:
        old = block.experts
        block.experts = OffloadedExperts(layer, old.num_experts, old.hidden_size,
                                         old.intermediate_size, cache, stats, low_precision,
                                         lookahead_extra if lookahead else 0, history,
                                         hstats if history is not None else None, history_topk,
                                         gate_lookahead=lookahead, host=host,
                                         host_compute_max_rows=host_compute_max_rows)
        new.append(block.experts)
    for i in range(len(blocks) - 1):
        new[i].link(blocks[i + 1][2], new[i + 1])
    return stats or LookaheadStats(), hstats
