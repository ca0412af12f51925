"""Prompt lookup (n-gram) proposals: text that repeats (a passage being copied, edited or
quoted, code, lists) continues the way it did the last time."""

from __future__ import annotations

from collections.abc import Sequence as Seq

import numpy as np

from sparsa.core.sequence import Sequence
from sparsa.spec.base import Proposer


def _matches(t: np.ndarray, n_min: int, n_max: int) -> list[int]:
    """End positions of earlier occurrences of the suffix of `t`, best first: the longest
    (n_max down to n_min tokens), then the latest."""
    size = len(t)
    if size < n_min + 1:
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
    good = np.flatnonzero(length >= n_min)
    order = np.lexsort((-ends[good], -length[good]))  # longest first, then latest
    return ends[good][order].tolist()


def lookup(tokens: Seq[int] | np.ndarray, k: int, n_min: int, n_max: int) -> list[int]:
    """The k tokens after the latest earlier occurrence of the longest suffix of `tokens`
    (n_max down to n_min tokens long) that occurred before; [] when none did."""
    t = np.asarray(tokens, dtype=np.int64)
    if k < 1:
        return []
    ends = _matches(t, n_min, n_max)
    return t[ends[0] + 1:ends[0] + 1 + k].tolist() if ends else []


def lookup_tree(tokens: Seq[int] | np.ndarray, shape: Seq[tuple[int, ...]], n_min: int,
                n_max: int) -> tuple[list[int], list[int]]:
    """A token tree of the continuations of every earlier occurrence of the suffix: a
    node's rank among its siblings is the rank of the best occurrence that continues that
    way. Only nodes whose rank path is in `shape` are kept, in `shape`'s order."""
    t = np.asarray(tokens, dtype=np.int64)
    depth = max(len(p) for p in shape)
    ranks: dict[tuple[int, ...], int] = {}  # rank path -> token
    children: dict[tuple[int, ...], dict[int, int]] = {}  # rank path -> token -> rank
    wanted = set(shape)
    for end in _matches(t, n_min, n_max)[:64]:
        path: tuple[int, ...] = ()
        for tok in t[end + 1:end + 1 + depth].tolist():
            kids = children.setdefault(path, {})
            if tok not in kids:
                kids[tok] = len(kids)
            path = (*path, kids[tok])
            if path not in wanted:
                break
            ranks[path] = tok
    index: dict[tuple[int, ...], int] = {}
    toks: list[int] = []
    parents: list[int] = []
    for p in shape:
        if p in ranks and (len(p) == 1 or p[:-1] in index):
            index[p] = len(toks)
            toks.append(ranks[p])
            parents.append(index[p[:-1]] if len(p) > 1 else -1)
    return toks, parents


class NgramProposer(Proposer):
    def __init__(self, n_min: int, n_max: int):
        self.n_min, self.n_max = n_min, n_max

    def propose_tree(self, seqs: Seq[Sequence], shape: Seq[tuple[int, ...]]
                     ) -> list[tuple[list[int], list[int]]]:
        return [lookup_tree(s.all_token_ids, shape, self.n_min, self.n_max) for s in seqs]

    def propose(self, seqs: Seq[Sequence], max_tokens: Seq[int]) -> list[list[int]]:
        return [lookup(s.all_token_ids, k, self.n_min, self.n_max)
                for s, k in zip(seqs, max_tokens)]
