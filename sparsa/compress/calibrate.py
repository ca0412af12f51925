"""Routing statistics on calibration text, recorded with Sparsa's own engine.

The text runs through the model as prompts that are only prefilled (batched by the
engine's scheduler); a forward pre-hook on every MoE block's experts (the block calls
``experts(x, weights, ids)`` right after its router, as the expert tracer relies on) adds
up, per layer, each expert's token count and summed router weight and, for merging, keeps
the experts' inputs of evenly spaced tokens (to compare the experts' outputs or router
logits on them later).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sparsa.config import CacheConfig, DeviceConfig, EngineConfig, ModelConfig
from sparsa.config.compress import CompressConfig
from sparsa.sampling_params import SamplingParams

log = logging.getLogger(__name__)


@dataclass
class LayerStats:
    """One MoE layer's routing on the calibration tokens."""

    counts: torch.Tensor  # [E] float64: tokens routed to each expert
    weights: torch.Tensor  # [E] float64: each expert's summed router weight
    samples: torch.Tensor | None = None  # [S, H] fp32: the experts' inputs at sampled tokens

    def usage(self, criterion: str) -> torch.Tensor:
        """Each expert's use by `criterion` ("frequency" or "weight")."""
        return self.counts if criterion == "frequency" else self.weights


@dataclass
class Calibration:
    tokens: int  # tokens run
    layers: dict[int, LayerStats]  # by layer index


def calibration_windows(tokenizer, path: str, n_tokens: int, window: int,
                        setting: str) -> list[list[int]]:
    """At least `n_tokens` tokens of the text at `path` as windows of at most `window`:
    each blank-line-separated block is a document (BOS first), cut into windows."""
    text = Path(path).read_text(encoding="utf-8", errors="replace")
    bos = getattr(tokenizer, "bos_token_id", None)
    windows: list[list[int]] = []
    total = 0
    for block in text.split("\n\n"):
        block = block.strip()
        if not block:
            continue
        ids = ([bos] if bos is not None else []) + tokenizer.encode(
            block, add_special_tokens=False)
        for start in range(0, len(ids), window):
            w = ids[start:start + window]
            if len(w) >= 2:  # a lone token would not be a prompt worth running
                windows.append(w)
                total += len(w)
            if total >= n_tokens:
                return windows
    raise ValueError(f"{setting} calibration text {path} has only {total} tokens; "
                     f"calibration_tokens asks for {n_tokens}: give a longer text or a "
                     "smaller calibration_tokens")


def _engine(engine_cls: Callable[[EngineConfig], Any], mc: ModelConfig,
            device: DeviceConfig | None, window: int):
    """An engine on the original checkpoint in its own weight form (offloading kept, as
    the model may only fit that way), with a KV pool for a few windows at a time."""
    cache = CacheConfig()
    blocks = 4 * math.ceil(window / cache.block_size) + 4
    calib = dataclasses.replace(mc, quantization=None, max_model_len=window)
    return engine_cls(EngineConfig(model=calib, cache=CacheConfig(num_blocks=blocks),
                                   device=device or DeviceConfig()))


@torch.inference_mode()
def calibrate(engine_cls: Callable[[EngineConfig], Any], mc: ModelConfig,
              cfg: CompressConfig, num_experts: int, window: int,
              device: DeviceConfig | None = None) -> Calibration:
    """Run `cfg.calibration_tokens` tokens of `cfg.calibration` through the model `mc`
    names, as prompts of at most `window` tokens, on an engine of `engine_cls` (the
    engine class: passed in, since the engine itself calls this module), and record every
    MoE layer's routing (and, when merging, sampled inputs)."""
    from sparsa.layers.moe import moe_blocks

    engine = None
    try:
        engine = _engine(engine_cls, mc, device, window)
        if engine.tokenizer is None:
            raise ValueError(f"{cfg.setting} calibration needs the model's tokenizer; "
                             f"{mc.model} has none")
        windows = calibration_windows(engine.tokenizer, cfg.calibration,
                                      cfg.calibration_tokens, engine.max_model_len - 1,
                                      cfg.setting)  # room for the token each one samples
        total = sum(len(w) for w in windows)
        stride = max(1, total // cfg.similarity_tokens) if cfg.method == "merge" else 0
        recorders = {layer: _Recorder(num_experts, stride)
                     for layer, _, _ in moe_blocks(engine.model)}
        handles = [block.experts.register_forward_pre_hook(recorders[layer], with_kwargs=True)
                   for layer, _, block in moe_blocks(engine.model)]
        if not recorders:
            raise ValueError(f"{cfg.setting}: {mc.model} has no MoE layers")
        try:
            # prefill only (one token each): every prompt token is routed once
            params = SamplingParams(temperature=0, max_tokens=1)
            for w in windows:
                engine.add_request(w, params)
            while engine.has_unfinished_requests():
                engine.step()
        finally:
            for h in handles:
                h.remove()
        log.info("calibration: %d tokens of %s in %d windows", total, cfg.calibration,
                 len(windows))
        return Calibration(total, {layer: r.stats(cfg.similarity_tokens)
                                   for layer, r in recorders.items()})
    finally:
        if engine is not None:
            engine.shutdown()


class _Recorder:
    """The forward pre-hook on a block's experts, called as ``experts(x, weights, ids)``:
    adds up each expert's tokens and router weight, and keeps the input rows of every
    `stride`-th token the layer sees (none when 0)."""

    def __init__(self, num_experts: int, stride: int):
        self.num_experts, self.stride = num_experts, stride
        self.counts = torch.zeros(num_experts, dtype=torch.float64)
        self.weights = torch.zeros(num_experts, dtype=torch.float64)
        self.seen = 0
        self.rows: list[torch.Tensor] = []

    def stats(self, max_samples: int) -> LayerStats:
        samples = torch.cat(self.rows)[:max_samples] if self.rows else None
        return LayerStats(self.counts, self.weights, samples)

    def __call__(self, module, args, kwargs):
        x = args[0] if args else kwargs["x"]
        w = args[1] if len(args) > 1 else kwargs["topk_weights"]
        ids = args[2] if len(args) > 2 else kwargs["topk_ids"]
        flat = ids.reshape(-1).to("cpu", torch.long)
        self.counts += torch.bincount(flat, minlength=self.num_experts).double()
        self.weights.index_add_(0, flat, w.reshape(-1).to("cpu", torch.float64))
        if self.stride:
            pos = torch.arange(self.seen, self.seen + x.shape[0])
            pick = (pos % self.stride == 0).nonzero().flatten()
            if len(pick):
                self.rows.append(x.detach()[pick.to(x.device)].to("cpu", torch.float32))
        self.seen += x.shape[0]
        return None
