"""Continuous batching scheduler (pure Python, no tensors).

Every step gets a token budget. Running sequences are served first (a decode costs one
token, an unfinished prompt costs its next chunk), then waiting ones are admitted in
policy order. When the KV pool runs out, the lowest-priority running sequence is
preempted: its blocks are freed and it is recomputed from scratch when readmitted.

With chunked prefill disabled a prefill is scheduled whole, so it waits until a step has
enough budget left for it. A sequence whose uncomputed tokens exceed the whole step budget
(a long prompt, or prompt plus output recomputed after preemption) could never run that
way, so it is split into budget-sized chunks after all rather than waiting forever.

With prefix caching on, an admitted sequence first adopts the cached blocks of its longest
known prefix and starts with that many tokens already computed, so only the rest (always
at least its last token, which yields the logits) is scheduled. A preempted sequence goes
through the same lookup when readmitted and usually finds its own blocks still cached.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sparsa.config import SchedulerConfig
from sparsa.core.block_manager import BlockManager
from sparsa.core.sequence import Sequence, SequenceStatus


@dataclass
class ScheduledSequence:
    seq: Sequence
    num_new_tokens: int

    @property
    def samples(self) -> bool:
        """The chunk reaches the end of the known tokens, so a next token is sampled."""
        seq = self.seq
        return seq.num_computed_tokens + self.num_new_tokens == \
            seq.num_tokens + len(seq.spec_token_ids)

    @property
    def num_verified(self) -> int:
        """Proposed tokens this chunk verifies (0 for plain decodes and prompt chunks)."""
        return len(self.seq.spec_token_ids) if self.samples else 0


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSequence] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager):
        self.config = config
        self.blocks = block_manager
        self.waiting: list[Sequence] = []
        self.running: list[Sequence] = []

    def _key(self, seq: Sequence):
        if self.config.policy == "priority":
            return (seq.priority, seq.arrival_time, seq.seq_id)
        return (seq.arrival_time, seq.seq_id)

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    def abort(self, seq: Sequence) -> None:
        if seq in self.running:
            self.running.remove(seq)
        if seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.free(seq)
        seq.status = SequenceStatus.FINISHED

    def finish(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.blocks.free(seq)
        seq.status = SequenceStatus.FINISHED

    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> None:
        self.running.remove(seq)
        self.blocks.free(seq)
        seq.clear_proposals()
        seq.num_computed_tokens = 0
        seq.num_preemptions += 1
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)
        out.preempted.append(seq)

    def _victim(self, exclude: list[Sequence]) -> Sequence | None:
        candidates = [s for s in self.running if s not in exclude]
        return max(candidates, key=self._key) if candidates else None

    def mark_computed(self, out: SchedulerOutput) -> None:
        """After the step ran: advance each scheduled sequence and register its newly
        completed blocks in the prefix cache. A chunk that verified proposals waits for
        `mark_verified`, which knows how many of them hold."""
        for item in out.scheduled:
            if item.num_verified:
                continue
            item.seq.num_computed_tokens += item.num_new_tokens
            self.blocks.register_computed(item.seq)
            self.blocks.release_out_of_window(item.seq)

    def mark_verified(self, item: ScheduledSequence, num_accepted: int) -> None:
        """After verification: the last sampled token and the first `num_accepted`
        proposals are computed; the rejected ones' K/V slots are given up (their trailing
        blocks freed, none of them ever registered in the prefix cache). The caller then
        clears `spec_token_ids` and outputs the accepted tokens."""
        seq = item.seq
        proposed = len(seq.spec_token_ids)
        if not 0 <= num_accepted <= proposed:
            raise ValueError(f"accepted {num_accepted} of {proposed} proposed tokens")
        seq.num_computed_tokens += item.num_new_tokens - (proposed - num_accepted)
        # the accepted ones stay readable (token_at) until the caller outputs them, so the
        # prefix cache can hash the blocks they complete
        if seq.spec_parents is not None:
            raise ValueError("a token tree's accepted path must be made a chain first")
        del seq.spec_token_ids[num_accepted:]
        self.blocks.trim(seq)
        self.blocks.register_computed(seq)
        self.blocks.release_out_of_window(seq)

    def _num_new_tokens(self, seq: Sequence, budget: int, n: int | None = None) -> int:
        """Tokens of `seq` to schedule with `budget` left this step; 0 means it must wait.
        `n` overrides the count of uncomputed tokens (a prefix-cache hit lowers it)."""
        n = seq.num_uncomputed_tokens if n is None else n
        if n <= budget:
            return n
        if self.config.enable_chunked_prefill or n > self.config.max_num_batched_tokens:
            return budget
        return 0

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        scheduled: list[Sequence] = []

        # 1. running sequences, best first so preemption hits the worst ones
        for seq in sorted(self.running, key=self._key):
            if seq not in self.running or budget <= 0:
                continue
            if seq.spec_token_ids and (seq.num_uncomputed_tokens > budget or not
                                       self.blocks.can_allocate(seq, seq.num_uncomputed_tokens)):
                seq.clear_proposals()  # proposals are optional: never worth a preemption
            n = self._num_new_tokens(seq, budget)
            if n == 0:
                continue
            while not self.blocks.can_allocate(seq, n):
                victim = self._victim(exclude=scheduled)
                if victim is None:
                    break
                self._preempt(victim, out)
                if victim is seq:
                    break
            if seq not in self.running or not self.blocks.can_allocate(seq, n):
                continue
            self.blocks.allocate(seq, n)
            out.scheduled.append(ScheduledSequence(seq, n))
            scheduled.append(seq)
            budget -= n

        # 2. admit waiting sequences, unless this step already had to preempt
        if not out.preempted:
            self.waiting.sort(key=self._key)
            while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
                seq = self.waiting[0]
                cached = self.blocks.find_cached_prefix(seq)
                num_cached = len(cached) * self.blocks.block_size
                n = self._num_new_tokens(seq, budget, seq.num_tokens - num_cached)
                if n == 0:
                    break
                if not self.blocks.can_allocate_with_prefix(seq, cached, n):
                    break
                self.waiting.pop(0)
                self.blocks.adopt_prefix(seq, cached)
                seq.num_computed_tokens = num_cached
                seq.num_cached_tokens = num_cached
                self.blocks.allocate(seq, n)
                seq.status = SequenceStatus.RUNNING
                self.running.append(seq)
                out.scheduled.append(ScheduledSequence(seq, n))
                budget -= n
        return out
