"""The engine's side of speculative decoding: asking the proposer before a step, choosing
how many tokens each sequence gets, and judging proposals after it. Proposers are in
sparsa/spec/; the scheduler budgets proposals and rolls back rejected ones."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from sparsa.config.speculative import SpeculativeConfig
from sparsa.core.scheduler import SchedulerOutput
from sparsa.core.sequence import Sequence
from sparsa.spec.dynamic import SpecController
from sparsa.spec.proposers import make_proposer


class Speculation:
    def __init__(self, config: SpeculativeConfig, engine: Any):
        self.config = config
        self.proposer = make_proposer(config, engine)
        self.control = SpecController(config.num_speculative_tokens) if config.adaptive \
            else None
        # proposers that read each sequence's last hidden state (Medusa heads) take it here
        self._note_hidden = getattr(self.proposer, "note_hidden", None)
        # proposals made and accepted, steps that verified some, forward passes in all
        self.stats = {"proposed": 0, "accepted": 0, "verify_steps": 0, "passes": 0}

    def propose(self, running: list[Sequence], params_of: Callable[[Sequence], Any],
                max_model_len: int) -> None:
        """Proposals for the running sequences that are decoding, before scheduling (the
        scheduler budgets each one's proposals, and drops them where they do not fit).
        `params_of` gives a sequence's SamplingParams, or None where it must not
        speculate (gone, or held to a grammar whose masks proposals would need)."""
        live = {s.seq_id for s in running}
        self.proposer.retain(live)
        if self.control is not None:
            self.control.forget(live)
        cap = self.config.disable_by_batch_size
        if cap is not None and len(running) >= cap:
            return
        seqs, limits = [], []
        # the step as planned so far: a row and an expected token per running sequence,
        # plus what each proposal adds (the adaptive k prices the whole step)
        rows, tokens = len(running), float(len(running))
        for seq in running:
            p = params_of(seq)
            if (p is None or not p.speculate or seq.spec_token_ids
                    or seq.num_uncomputed_tokens != 1):
                continue
            left = p.max_tokens - len(seq.output_token_ids) if p.max_tokens is not None \
                else max_model_len
            # the step computes positions up to num_tokens - 1 + k, all inside the context
            k = min(self.config.num_speculative_tokens, left - 1,
                    max_model_len - seq.num_tokens)
            if self.control is not None and k >= 1:
                k = self.control.choose_k(seq.seq_id, rows, k, tokens)
                rows += k
                tokens += self.control.expected(seq.seq_id, k) - 1
            if k >= 1:
                seqs.append(seq)
                limits.append(k)
        if seqs:
            for seq, k, toks in zip(seqs, limits, self.proposer.propose(seqs, limits)):
                seq.spec_token_ids = list(toks[:k])

    @property
    def wants_hidden(self) -> bool:
        return self._note_hidden is not None

    def note_hidden(self, seq: Sequence, hidden: Any) -> None:
        """A sequence's latest final hidden state, for proposers that read it."""
        if self._note_hidden is not None and not seq.is_finished:
            self._note_hidden(seq.seq_id, hidden)

    def timed_step(self, sched: SchedulerOutput, started: float) -> None:
        """After a forward pass: count it, and time it when it was all decode rows."""
        self.stats["passes"] += 1
        if self.control is not None and all(it.num_new_tokens == 1 or it.num_verified
                                            for it in sched.scheduled):
            self.control.observe_step(sched.num_tokens, time.perf_counter() - started)

    def judge(self, seq: Sequence, sampled: list[int]) -> int:
        """How many of `seq`'s proposals hold, given the target's token at each of its
        rows. The target's tokens are sampled as usual, and proposals are accepted while
        they equal them, then the target's own token follows: for deterministic proposals
        (n-gram, greedy drafts) this is the rejection-sampling rule (accept with p/q, q
        one-hot; else draw from the residual), so the output follows the target's
        distribution exactly, and equals plain greedy decoding at T=0."""
        drafts = seq.spec_token_ids
        m = 0
        while m < len(drafts) and sampled[m] == drafts[m]:
            m += 1
        self.stats["proposed"] += len(drafts)
        self.stats["accepted"] += m
        self.stats["verify_steps"] += 1
        if self.control is not None:
            self.control.observe_verify(seq.seq_id, len(drafts), m)
        return m
