"""Scoring whole prompts on an idle engine: the logits or final hidden states at every
position, for parity tests, perplexity, cascades and training draft heads."""

from __future__ import annotations

import torch

from sparsa.core.scheduler import ScheduledSequence, SchedulerOutput
from sparsa.core.sequence import Sequence
from sparsa.engine.llm_engine import LLMEngine, compute_thread_modes


def prompt_logits(engine: LLMEngine, token_ids: list[int]) -> torch.Tensor:
    """Logits at every position of one prompt ([T, V] fp32): for parity tests and
    perplexity. Needs an idle engine (it borrows KV blocks for the duration)."""
    hidden = prompt_hidden(engine, token_ids)
    with torch.inference_mode():
        return engine.runner.model.compute_logits(hidden)


def prompt_hidden(engine: LLMEngine, token_ids: list[int]) -> torch.Tensor:
    """Final hidden states at every position of one prompt ([T, H]), as `prompt_logits`
    (for training heads on them)."""
    if engine.has_unfinished_requests():
        raise RuntimeError("scoring a prompt needs an idle engine")
    if len(token_ids) > engine.max_model_len:
        raise ValueError(f"{len(token_ids)} tokens exceed the context of {engine.max_model_len}")
    compute_thread_modes(engine.device)
    seq = Sequence("__score__", list(token_ids))
    engine.block_manager.allocate(seq, len(token_ids))
    try:
        runner = engine.runner
        sched = SchedulerOutput([ScheduledSequence(seq, len(token_ids))])
        input_ids, positions, meta, _, _ = runner._prepare(sched)
        with torch.inference_mode():
            return runner.model(input_ids, positions, meta)
    finally:
        engine.block_manager.free(seq)
