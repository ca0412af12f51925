"""Record the engine's routing decisions as a trace (``LLM(trace_experts="run.csv.gz")``).

`ExpertTracer` puts a forward pre-hook on the expert module of every MoE block: the block
calls ``self.experts(x, topk_weights, topk_ids)`` right after its router, so the hook sees
each layer's top-k ids whatever computes the experts (full precision, quantized, offloaded)
and never sees the gate-lookahead guesses the offloaded path makes with the *next* block's
router. With tracing off no hook exists and the engine does no extra work.

The model runner opens a step with the flat-token -> (sequence, position, token id) mapping
of the batch it prepared (:meth:`ExpertTracer.begin_step`); each hook then stashes that
step's (T, k) ids, a small CPU copy, and :meth:`end_step` files them. Rows are only turned
into text when written (:meth:`save`), so recording costs one copy per MoE layer and step.

What is recorded is what is computed: prompt tokens whose KV came from the prefix cache are
not, and a preempted sequence that is recomputed is recorded again (the loader keeps the
last row of a duplicated (prompt, layer, pos)). A request with ``n > 1`` samples records
each sample as prompt ``"<request id>.<index>"``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from sparsa.layers.moe import moe_blocks
from sparsa.offload.lab.trace import TraceRecorder

__all__ = ["ExpertTracer"]

log = logging.getLogger(__name__)



def sequence_label(seq: Any) -> str:
    """The trace's ``prompt`` value of a sequence: its request id (``id.index`` if n > 1)."""
    params = getattr(seq, "params", None)
    if params is not None and getattr(params, "n", 1) > 1:
        return f"{seq.request_id}.{seq.index}"
    return str(seq.request_id)


class _Step:
    __slots__ = ("counts", "ids", "labels", "positions", "token_ids")

    def __init__(self, labels, counts, positions, token_ids):
        self.labels: list[str] = labels
        self.counts: list[int] = counts
        self.positions = positions
        self.token_ids = token_ids
        self.ids: dict[int, torch.Tensor] = {}  # layer -> (T, k) int16 on the CPU


class ExpertTracer:
    """Collects (request, position, token, layer, top-k experts) for every computed token.

    ``token_text`` maps token ids to the file's token column (e.g. a tokenizer's
    ``convert_ids_to_tokens``); without it the id itself is written. ``path`` is where
    :meth:`save` writes by default.
    """

    def __init__(self, model: nn.Module, path: str | Path | None = None,
                 token_text: Callable[[list[int]], Sequence[Any]] | None = None):
        self.path = Path(path) if path is not None else None
        self.token_text = token_text
        self.layers: list[int] = []
        self._handles = []
        for layer, _, block in moe_blocks(model):
            self.layers.append(layer)
            self._handles.append(block.experts.register_forward_pre_hook(
                self._hook_for(layer), with_kwargs=True))
        if not self.layers:
            raise ValueError("trace_experts: this model has no MoE layers to trace")
        self._open: _Step | None = None
        self._steps: list[_Step] = []
        self._saved_steps = -1

    # ---- recording (called by the model runner and the hooks) -------------------------
    def _hook_for(self, layer: int):
        def hook(module, args, kwargs):
            step = self._open
            if step is not None:
                ids = args[2] if len(args) > 2 else kwargs["topk_ids"]
                step.ids[layer] = ids.detach().to("cpu", torch.int16)
            return None
        return hook

    def begin_step(self, segments: Sequence[tuple[Any, int]], token_ids: Sequence[int],
                   positions: Sequence[int]) -> None:
        """Open a step: ``segments`` are (sequence, number of its tokens) in the flat order
        of ``token_ids`` / ``positions`` (the batch the model is about to run)."""
        self._open = _Step([sequence_label(s) for s, _ in segments], [n for _, n in segments],
                           np.asarray(positions, dtype=np.int64),
                           np.asarray(token_ids, dtype=np.int64))

    def end_step(self) -> None:
        step, self._open = self._open, None
        if step is None or not step.ids:
            return
        n = len(step.positions)
        bad = [layer for layer, ids in step.ids.items() if ids.shape[0] != n]
        if bad:  # a block that did not route every token: the mapping would be wrong
            log.warning("expert trace: layers %s routed a different number of tokens than "
                        "the step has (%d); step dropped", bad, n)
            return
        self._steps.append(step)

    def abandon_step(self) -> None:
        self._open = None

    # ---- output -----------------------------------------------------------------------
    def __len__(self) -> int:
        """Rows recorded so far (one per computed token and MoE layer)."""
        return sum(len(s.positions) * len(s.ids) for s in self._steps)

    def _texts(self) -> dict[int, str]:
        ids = sorted({int(t) for s in self._steps for t in s.token_ids})
        texts: list[Any] = [None] * len(ids)
        if self.token_text is not None and ids:
            try:
                texts = list(self.token_text(ids))
            except Exception:  # a tokenizer smaller than the model's vocabulary, say
                log.warning("expert trace: token text unavailable; writing token ids")
        return {i: (str(t) if t is not None else str(i)) for i, t in zip(ids, texts)}

    def recorder(self) -> TraceRecorder:
        """Everything recorded so far, as a `TraceRecorder` (rows in recording order)."""
        texts = self._texts()
        rec = TraceRecorder(token_text=texts.__getitem__)
        for step in self._steps:
            start = 0
            for label, count in zip(step.labels, step.counts):
                sl = slice(start, start + count)
                pos, toks = step.positions[sl].tolist(), step.token_ids[sl].tolist()
                for layer in sorted(step.ids):
                    rec.record_batch(label, pos, toks, layer, step.ids[layer][sl])
                start += count
        return rec

    def save(self, path: str | Path | None = None, clear: bool = False) -> Path | None:
        """Write every row recorded so far (CSV, gzip'd for ``.gz``) to ``path`` (default:
        the tracer's own); returns the path, or None when nothing was recorded yet.
        ``clear`` forgets the rows afterwards (for long runs saved in parts)."""
        target = Path(path) if path is not None else self.path
        if target is None:
            raise ValueError("no trace path: pass one (or set trace_experts=)")
        if not self._steps:
            log.warning("expert trace: nothing recorded yet, %s not written", target)
            return None
        self.recorder().save(target)
        if path is None or target == self.path:
            self._saved_steps = len(self._steps)
        if clear:
            self._steps.clear()
            self._saved_steps = 0
        return target

    def flush_on_close(self) -> None:
        """Write to the tracer's path unless nothing new was recorded since the last write
        there (engine shutdown and interpreter exit call this)."""
        if self.path is not None and self._steps and self._saved_steps != len(self._steps):
            self.save()

    def remove(self) -> None:
        """Take the hooks off the model (the recorded rows stay)."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._open = None
