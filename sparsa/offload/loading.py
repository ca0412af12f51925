"""Load a model with its routed experts offloaded: everything else resident, experts read
from the checkpoint on demand through a budgeted `ExpertCache`; with int8/int4
quantization, from the quantized expert store (sparsa.offload.quantized_store) instead."""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from sparsa.config import OffloadConfig
from sparsa.layers.moe import FusedExperts
from sparsa.layers.quantization import QuantConfig
from sparsa.loader.safetensors_reader import CheckpointError, SafetensorsCheckpoint
from sparsa.offload.expert_cache import ExpertCache, ExpertLocation, ExpertReader
from sparsa.offload.expert_reader import LAYOUTS
from sparsa.offload.history_prefetch import HistoryPrefetcher
from sparsa.offload.host_tier import HostTier
from sparsa.offload.low_precision import LowPrecisionExperts
from sparsa.offload.offloaded_experts import LookaheadStats, install_offloading
from sparsa.offload.quantized_store import open_store
from sparsa.offload.store_base import ExpertSource

if TYPE_CHECKING:
    pass

_LAYER = re.compile(r"layers\.(\d+)\.")
log = logging.getLogger(__name__)


@dataclass
class OffloadState:
    cache: ExpertCache
    lookahead: LookaheadStats
    total_expert_bytes: int
    budget_bytes: int
    on_miss: str = "wait"
    low_precision: LowPrecisionExperts | None = None  # outside budget_bytes
    store: ExpertSource | None = None  # where experts are read from
    reserve_slabs: int = 0  # read buffers to map up front (reserve_buffers)
    io_threads: int = 1
    history: HistoryPrefetcher | None = None  # the model runner feeds it each step's rows
    history_stats: LookaheadStats | None = None
    host: HostTier | None = None  # host memory between the device cache and the disk

    def reserve_buffers(self) -> int:
        """Map the read buffers of every cached expert now, at load, instead of inside the
        first request's loads (the cache fills them during any prefill anyway): call once
        the rest of the model is in its final form, so the two never peak together.
        OffloadConfig.reserve_buffers=False leaves them to first use (reserve_slabs 0).
        Returns how many were mapped."""
        if not self.reserve_slabs:
            return 0
        reader = self.cache.reader
        return reader.pool.reserve(self.reserve_slabs, reader.slab_bytes,
                                   threads=max(1, min(self.io_threads, os.cpu_count() or 1)))

    def step_observers(self) -> list:
        """What the model runner tells about each step (sequence rows, token ids)."""
        out: list = [self.history] if self.history is not None else []
        if hasattr(self.cache.policy, "new_request"):
            out.append(RequestStarts(self.cache))
        return out

    def report(self) -> dict:
        d = self.cache.stats.as_dict()
        d.update(budget_bytes=self.budget_bytes, total_expert_bytes=self.total_expert_bytes,
                 capacity_experts=self.cache.capacity, resident_bytes=self.cache.used_bytes,
                 lookahead_recall=self.lookahead.recall,
                 lookahead_precision=self.lookahead.precision,
                 prefetch_evicts=self.cache.prefetch_evicts,
                 disk_bytes_read=self.cache.reader.bytes_read, on_miss=self.on_miss,
                 per_layer_capacity=self.cache.per_layer_capacity,
                 layer_peak_experts=self.cache.layer_peak)
        reader = self.cache.reader
        d.update(expert_layout=reader.layout, disk_read_seconds=reader.read_seconds,
                 disk_loads=reader.loads, slabs_mapped=reader.pool.allocated)
        if self.low_precision is not None:
            d.update(self.low_precision.report())
        if self.history is not None:
            d.update(history_recall=self.history_stats.recall,
                     history_precision=self.history_stats.precision)
        if self.store is not None:
            d.update(self.store.report())
        if self.host is not None:
            d.update(self.host.report())
        return d


class RequestStarts:
    """A step observer (the model runner's protocol) that tells the cache when a new request
    begins: at a step none of whose sequences ran in the step before. At batch 1 that is each
    request; in a continuous batch, whenever the running set has turned over entirely (until
    then the activation matrix is the union of the running requests')."""

    def __init__(self, cache: ExpertCache):
        self.cache = cache
        self._previous: set = set()

    def begin_step(self, segments, token_ids, positions=None) -> None:
        ids = {getattr(seq, "seq_id", id(seq)) for seq, _ in segments}
        if ids and ids.isdisjoint(self._previous):
            self.cache.begin_request()
        self._previous = ids

    def end_step(self) -> None:
        pass

    def abandon_step(self) -> None:
        pass


def _materialize_non_experts(model: nn.Module, device: torch.device) -> None:
    """Give every meta parameter outside the expert blocks real (uninitialized) storage;
    tied parameters stay tied."""
    done: dict[int, nn.Parameter] = {}
    for mod in model.modules():
        if isinstance(mod, FusedExperts):
            continue
        for name, p in list(mod._parameters.items()):
            if p is None or not p.is_meta:
                continue
            new = done.get(id(p))
            if new is None:
                new = nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device=device),
                                   requires_grad=False)
                done[id(p)] = new
            mod._parameters[name] = new


def expert_layout(budget_bytes: int, total_bytes: int, configured: str = "auto") -> str:
    """OffloadConfig.layout: "native" computes on the checkpoint's [out, in] tensors as
    read; "resident" transposes each load into FusedExperts' layout: ~50 ms of CPU per
    mixtral-mini expert, repaid only after ~100 uses (its GEMV is ~25% faster here) and
    bit-identical to the all-resident arithmetic. "auto" (default): resident when the
    budget holds every expert (each is loaded once), else native. SPARSA_OFFLOAD_LAYOUT,
    when set, overrides it (a debug switch for A/B runs without code changes)."""
    layout = os.environ.get("SPARSA_OFFLOAD_LAYOUT") or configured
    if layout == "auto":
        return "resident" if budget_bytes >= total_bytes else "native"
    if layout not in LAYOUTS:
        raise ValueError(f"SPARSA_OFFLOAD_LAYOUT must be one of auto, {', '.join(LAYOUTS)}; "
                         f"got {layout!r}")
    return layout


def load_offloaded(model: nn.Module, model_dir: Path, oc: OffloadConfig, dtype: torch.dtype,
                   device: torch.device, quant: QuantConfig | None = None) -> OffloadState:
    """`quant` (method int8, int4 or bf16): the experts are cached, read and computed quantized,
    exactly as `quantize_model` quantizes the all-resident model's experts."""
    from sparsa.loader.weights import load_weights

    experts = [m for m in model.modules() if isinstance(m, FusedExperts)]
    if not experts:
        raise ValueError("expert offloading needs an MoE model; this one has no experts")
    _materialize_non_experts(model, device)
    ckpt = SafetensorsCheckpoint(model_dir)
    sink: dict = {}
    load_weights(model, ckpt, expert_sink=sink)
    parts: dict[tuple[int, int], dict] = {}
    for (target, e, which), name in sink.items():
        m = _LAYER.search(target + ".")
        if m is None:
            raise CheckpointError(f"cannot tell the layer of expert tensor {name!r}")
        parts.setdefault((int(m.group(1)), e), {})[which] = ckpt.locate(name)
    locations = {}
    for key, p in parts.items():
        if set(p) != {"gate", "up", "down"}:
            raise CheckpointError(f"layer {key[0]} expert {key[1]} lacks "
                                  f"{sorted({'gate', 'up', 'down'} - set(p))}")
        locations[key] = ExpertLocation(p["gate"], p["up"], p["down"])
    ref = experts[0]
    store = None
    quantized = quant is not None and quant.method in ("int8", "int4", "bf16")  # a store
    if quantized and oc.compression != "none":
        raise ValueError(f"offload compression={oc.compression!r} is for full-precision "
                         f"experts; {quant.method} experts have their own (quantized) store")
    if quantized:
        # The budget counts quantized bytes: "25%" is a quarter of the quantized experts.
        store = open_store(ckpt.files, locations, quant, dtype, ref.hidden_size,
                           ref.intermediate_size, oc.store_dir, oc.direct_io,
                           model_name=Path(model_dir).name)
        expert_bytes = store.expert_bytes
        total = len(locations) * expert_bytes
        budget = _expert_budget(oc, total, expert_bytes, device)
        reader = ExpertReader(store.locations, dtype, oc.direct_io, device, layout="packed",
                              assemble=store.assemble)
    else:
        # Keep experts in the checkpoint's dtype when it is narrower than the compute dtype
        # (bf16 on disk, fp32 compute on CPU): twice the experts fit the budget, and
        # upcasting at use is exact, so outputs equal the all-resident model's.
        disk_dtype = next(iter(locations.values())).gate.dtype
        store_dtype = disk_dtype if disk_dtype.is_floating_point and \
            disk_dtype.itemsize < dtype.itemsize else dtype
        expert_bytes = 3 * ref.hidden_size * ref.intermediate_size * store_dtype.itemsize
        total = len(locations) * expert_bytes
        budget = _expert_budget(oc, total, expert_bytes, device)
        if oc.compression != "none":
            # the budget still counts decompressed bytes (what the cache holds)
            # zstandard is needed only here (a GPU image without it still offloads)
            from sparsa.offload.compressed_store import open_compressed_store

            store = open_compressed_store(ckpt.files, locations, oc.compression,
                                          store_dtype, oc.store_dir, oc.direct_io,
                                          model_name=Path(model_dir).name)
            reader = ExpertReader(store.locations, store_dtype, oc.direct_io, device,
                                  layout="packed", assemble=store.assemble,
                                  slab_bytes=store.out_bytes)
            store.attach(reader)
        else:
            reader = ExpertReader(locations, store_dtype, oc.direct_io, device,
                                  layout=expert_layout(budget, total, oc.layout))
    if quantized and oc.on_miss == "low_precision":  # (a bf16 form chosen at load too)
        raise ValueError(f"on_miss='low_precision' computes misses with int4/int8 copies of "
                         f"full-precision experts; {quant.method} experts come from the "
                         "quantized store already: use on_miss='wait' or 'host'")
    host = None
    if oc.host_memory is not None:
        # the tier holds experts as read from disk (the checkpoint's or the store's bytes,
        # laid out as in the reader's buffer)
        host_total = len(locations) * reader.raw_bytes
        free = None
        if oc.host_memory == "auto":
            free = _host_free_bytes(budget if device.type == "cpu" else 0)
            if free < reader.raw_bytes:
                raise ValueError(f"host_memory='auto': {free / 2**30:.2f} GiB of host memory "
                                 "left after the reserve holds no expert; set host_memory "
                                 "to a size")
        host = HostTier(reader, min(oc.host_budget_bytes(host_total, free), host_total),
                        reader.raw_bytes)
    num_layers = max(k[0] for k in locations) + 1
    moe_layers = sorted({k[0] for k in locations})
    # one routing trace serves history prefetch and the activation policy's library
    train = _predictor_trace(oc, ref.num_experts) \
        if oc.history or oc.policy == "activation" else None
    policy = _activation_policy(train, oc, moe_layers, num_layers) \
        if oc.policy == "activation" else oc.policy
    substitutes = oc.on_miss in ("low_precision", "host")
    per_layer = 0
    if oc.capacity == "per_layer":
        per_layer = budget // expert_bytes // len(moe_layers)
        if per_layer < 1:
            raise ValueError(f"capacity='per_layer': the budget holds "
                             f"{budget // expert_bytes} experts, fewer than one for each of "
                             f"the {len(moe_layers)} MoE layers; raise expert_memory")
    cache = ExpertCache(reader, num_layers, ref.num_experts, expert_bytes, budget,
                        policy=policy, io_threads=oc.io_threads,
                        max_inflight=oc.io_threads if substitutes else None,
                        prefetch_evicts=oc.prefetch_evicts,
                        loader=host.load if host is not None else None,
                        guess_when_idle=oc.prefetch_when_idle, per_layer_capacity=per_layer)
    # Slabs for every cached expert (loads in flight included) plus the resident layout's
    # read buffers, one per I/O thread: after warm-up no load maps fresh memory. With a
    # host tier the cached experts are copies (or, on the CPU, views of the tier's buffers).
    cpu = device.type == "cpu"
    reserve = cache.capacity + oc.io_threads if cpu and host is None else 0
    reader.set_pool_slabs(reserve or oc.io_threads)
    lowp = None
    if oc.on_miss == "low_precision":
        # every expert read once now (its bytes count in disk_bytes_read), kept compressed
        lowp = LowPrecisionExperts.build(reader, locations, oc.low_precision,
                                         ref.intermediate_size, oc.low_precision_group_size,
                                         io_threads=oc.io_threads)
    history = HistoryPrefetcher(train, moe_layers, ref.num_experts) if oc.history else None
    stats, hstats = install_offloading(model, cache, lookahead=oc.lookahead,
                                       low_precision=lowp, lookahead_extra=oc.lookahead_extra,
                                       history=history, history_topk=oc.history_topk or 0,
                                       host=host if oc.on_miss == "host" else None,
                                       host_compute_max_rows=oc.host_compute_max_rows)
    _log_offload(oc, locations, expert_bytes, budget, cache, reader, store, host)
    return OffloadState(cache, stats, total, budget, oc.on_miss, lowp, store,
                        reserve_slabs=reserve if oc.reserve_buffers else 0,
                        io_threads=oc.io_threads, history=history,
                        history_stats=hstats if history is not None else None, host=host)


def _log_offload(oc: OffloadConfig, locations: dict, expert_bytes: int, budget: int,
                 cache: ExpertCache, reader: ExpertReader, store, host) -> None:
    """The -v lines of what offloading decided: budget, where experts come from, policy."""
    mib = 2 ** 20
    total = len(locations) * expert_bytes
    log.info("offload: %d routed experts of %.2f MiB (%.1f MiB in all); expert_memory=%s "
             "-> budget %.1f MiB, %d experts cached (%.0f%%)", len(locations),
             expert_bytes / mib, total / mib, oc.expert_memory, budget / mib, cache.capacity,
             100 * cache.capacity / max(1, len(locations)))
    log.info("offload: experts read from %s, layout %s, %d I/O threads; policy %s, on a miss "
             "%s%s%s", type(store).__name__ if store is not None else "the checkpoint",
             reader.layout, oc.io_threads, oc.policy, oc.on_miss,
             f", host tier {host.budget_bytes / mib:.1f} MiB ({host.capacity} experts)"
             if host is not None else "",
             f", history prefetch (top {oc.history_topk})" if oc.history else "")


def _available_bytes(device: torch.device) -> int:
    from sparsa.engine.model_runner import total_memory_bytes

    return total_memory_bytes(device)


def _host_free_bytes(claimed: int) -> int:
    """Host memory for host_memory='auto': what is available now, less max(2 GiB, 10%) and
    `claimed` (the device cache's budget when the device is the CPU: not yet allocated)."""
    return _after_reserve(_available_bytes(torch.device("cpu"))) - claimed


def _after_reserve(avail: int) -> int:
    """What an "auto" budget may take of `avail` bytes: all but max(2 GiB, 10%), kept for
    the KV cache and working memory."""
    return avail - max(2 << 30, avail // 10)


def _expert_budget(oc: OffloadConfig, total: int, expert_bytes: int,
                   device: torch.device) -> int:
    """The budget in bytes, at most every expert's; "auto" measures what is available now
    (the non-expert weights are loaded) and keeps a reserve for the KV cache and working
    memory (max(2 GiB, 10%)) and one read buffer per I/O thread."""
    if oc.expert_memory != "auto":
        return min(oc.budget_bytes(total), total)
    avail = _available_bytes(device)
    free = _after_reserve(avail) - oc.io_threads * expert_bytes
    if free < expert_bytes:
        raise ValueError(f"expert_memory='auto': {avail / 2**30:.2f} GiB available, which "
                         f"leaves no room for one expert ({expert_bytes / 2**20:.1f} MiB) "
                         "after the reserve; set expert_memory to a size")
    return min(oc.budget_bytes(total, available=free), total)


def _predictor_trace(oc: OffloadConfig, num_experts: int):
    from sparsa.offload.lab.trace import load_trace

    path = Path(oc.predictor_trace)
    if not path.is_file():
        raise FileNotFoundError(f"predictor trace {str(path)!r} not found (record one with "
                                "`sparsa trace MODEL --out FILE`)")
    try:
        return load_trace(path, num_experts=num_experts)
    except ValueError as e:
        raise ValueError(f"predictor trace {str(path)!r}: {e}") from None


def _activation_policy(train, oc: OffloadConfig, moe_layers: list[int], num_layers: int):
    """MoE-Infinity's policy over the cache's slots (every layer index x expert), its
    library the per-prompt activation matrices of `predictor_trace` (whose layer j is the
    j-th MoE layer)."""
    from sparsa.offload.activation_policy import ActivationAware, activation_library

    if train.num_layers != len(moe_layers):
        raise ValueError(f"predictor trace {oc.predictor_trace!r} has {train.num_layers} MoE "
                         f"layers; the model has {len(moe_layers)}")
    lib = activation_library(train)
    full = np.zeros((len(lib), num_layers, lib.shape[2]), dtype=lib.dtype)
    full[:, moe_layers, :] = lib
    return ActivationAware(full)
