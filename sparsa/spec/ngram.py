"""Prompt lookup (n-gram) proposals: text that repeats (a passage being copied, edited or
quoted, code, lists) continues the way it did the last time."""

from __future__ import annotations

from collections.abc import Sequence as Seq

import numpy as np

from sparsa.core.sequence import Sequence
from sparsa.spec.base import Proposer


def lookup(tokens: Seq[int] | np.ndarray, k: int, n_min: int, n_max: int) -> list[int]:
    """The k tokens after the latest earlier occurrence of the longest suffix of `tokens`
    (n_max down to n_min tokens long) that occurred before; [] when none did."""
    t = np.asarray(tokens, dtype=np.int64)
    size = len(t)
    if k < 1 or size < n_min + 1:
        return []
    # candidates: earlier positions holding the last token (each could end a match)
    ends = np.flatnonzero(t[:size - 1] == t[-1])
    if ends.size == 0:
        return []
    length = np.ones(ends.size, dtype=np.int64)
    alive = np.ones(ends.size, dtype=bool)
    for d in range(1, min(n_max, size - 1)):
        back = ends - d
        ok = alive & (back >= 0)
        ok[ok] = t[back[ok]] == t[size - 1 - d]
        length += ok
        alive = ok
        if not alive.any():
            break
    best = int(length.max())
    if best < n_min:
        return []
    end = int(ends[np.flatnonzero(length == best)[-1]])  # the latest of the longest
    return t[end + 1:end + 1 + k].tolist()


class NgramProposer(Proposer):
    def __init__(self, n_min: int, n_max: int):
        self.n_min, self.n_max = n_min, n_max

    def propose(self, seqs: Seq[Sequence], max_tokens: Seq[int]) -> list[list[int]]:
        return [lookup(s.all_token_ids, k, self.n_min, self.n_max)
                for s, k in zip(seqs, max_tokens)]
