"""Adaptive speculation: how many tokens to propose for each sequence, from what the
engine observes. A proposal of k tokens that are each accepted with probability a yields
E(k) = (1 - a^(k+1)) / (1 - a) tokens per step (the target's own token included), and the
step costs t(rows + k) instead of t(rows); k is the one with the most tokens per second,
0 (no proposal) when none beats a plain step. `a` is counted per sequence (accepted
proposals over tried ones), t per number of rows in an all-decode step, both as moving
averages; rows never timed yet are priced from the nearest timed one."""

from __future__ import annotations

# Prior belief: proposals are right half the time, and each extra row costs a fifth of a
# one-row step (a memory-bound decode); both give way to what is measured.
_PRIOR_HITS, _PRIOR_TRIES = 1.0, 2.0
_ROW_COST = 0.2
_DECAY = 0.9  # weight of the past in the moving averages
# A sequence not worth speculating for still tries one proposal every this many steps, so
# its acceptance can recover (text that starts repeating, say).
_PROBE_EVERY = 8


class SpecController:
    def __init__(self, max_k: int):
        self.max_k = max_k
        self.seconds: dict[int, float] = {}  # rows in an all-decode step -> its time
        self.hits: dict[int, float] = {}
        self.tries: dict[int, float] = {}
        self.skipped: dict[int, int] = {}

    def observe_step(self, rows: int, seconds: float) -> None:
        old = self.seconds.get(rows)
        self.seconds[rows] = seconds if old is None else _DECAY * old + (1 - _DECAY) * seconds

    def observe_verify(self, seq_id: int, proposed: int, accepted: int) -> None:
        # accepted proposals were tried and held; the first rejected one was tried and
        # failed; proposals after it were never tried
        tried = accepted + (1 if accepted < proposed else 0)
        self.hits[seq_id] = _DECAY * self.hits.get(seq_id, _PRIOR_HITS) + accepted
        self.tries[seq_id] = _DECAY * self.tries.get(seq_id, _PRIOR_TRIES) + tried

    def forget(self, keep: set[int]) -> None:
        for sid in [s for s in self.hits if s not in keep]:
            self.hits.pop(sid, None)
            self.tries.pop(sid, None)
            self.skipped.pop(sid, None)

    def acceptance(self, seq_id: int) -> float:
        return self.hits.get(seq_id, _PRIOR_HITS) / self.tries.get(seq_id, _PRIOR_TRIES)

    def _time(self, rows: int) -> float:
        if rows in self.seconds:
            return self.seconds[rows]
        if not self.seconds:
            return 1.0 + _ROW_COST * (rows - 1)
        near = min(self.seconds, key=lambda r: abs(r - rows))
        return self.seconds[near] * (1.0 + _ROW_COST * (rows - 1)) / (1.0 + _ROW_COST * (near - 1))

    def expected(self, seq_id: int, k: int) -> float:
        """Tokens a step yields for this sequence with k proposals (its own one included)."""
        a = min(self.acceptance(seq_id), 0.99)
        return (1 - a ** (k + 1)) / (1 - a)

    def choose_k(self, seq_id: int, rows: int, limit: int, tokens: float | None = None
                 ) -> int:
        """Proposals for one sequence, given the step so far: `rows` decode rows that
        yield `tokens` expected tokens (batch 1: one row, one token). k is the one that
        gives the whole step the most tokens per second, so in a batch one sequence's
        extra rows are charged for slowing every other row down too."""
        tokens = float(rows) if tokens is None else tokens
        best_k, best = 0, tokens / self._time(rows)
        for k in range(1, min(self.max_k, limit) + 1):
            rate = (tokens + self.expected(seq_id, k) - 1) / self._time(rows + k)
            if rate > best:
                best_k, best = k, rate
        if best_k == 0 and limit >= 1:
            n = self.skipped.get(seq_id, 0) + 1
            self.skipped[seq_id] = n % _PROBE_EVERY
            if n >= _PROBE_EVERY:
                return 1
        return best_k
