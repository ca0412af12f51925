"""Paged KV block allocation: fixed-size blocks, per-sequence block tables, usage stats,
and automatic prefix caching.

Prefix caching: once every token of a full block has its K/V in the cache, the block is
registered under a hash of the whole token prefix it ends (a chain hash: the parent block's
hash plus this block's tokens), so a later sequence whose prompt starts with the same tokens
can take the block instead of recomputing it. Blocks are shared by reference count. When
the last user lets go, a registered block is not wiped but parked on an LRU list: it still
counts as free and is handed out (evicted, losing its hash) only when the plain free list
is empty, oldest first.
"""

from __future__ import annotations

import hashlib
from collections import Counter, OrderedDict, deque
from collections.abc import Sequence as Seq

from sparsa.core.sequence import Sequence

# A keyed cryptographic hash, not Python's hash(): tuple hashes of ints are easy to collide
# on purpose, and a collision would let one request read another request's K/V.
_HASH_BYTES = 16


def hash_block(parent: bytes | None, tokens: Seq[int]) -> bytes:
    h = hashlib.blake2b(parent or b"root", digest_size=_HASH_BYTES)
    h.update(b"".join(int(t).to_bytes(8, "little", signed=True) for t in tokens))
    return h.digest()


class NoFreeBlocksError(RuntimeError):
    pass


# a block-table entry whose block was given back (it left every layer's sliding window)
RELEASED = -1


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = False,
                 sliding_window: int | None = None):
        if num_blocks < 1 or block_size < 1:
            raise ValueError("num_blocks and block_size must be >= 1")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        # every layer attends only to its last `sliding_window` positions: blocks behind
        # that are given back as a sequence moves on (None: keep every block)
        self.sliding_window = sliding_window
        self._free: deque[int] = deque(range(num_blocks))  # free and holding nothing
        self._ref_counts = [0] * num_blocks
        # prefix cache: hash -> block, block -> hash, and free-but-cached blocks in LRU order
        self._cached: dict[bytes, int] = {}
        self._block_hash: list[bytes | None] = [None] * num_blocks
        self._evictable: OrderedDict[int, None] = OrderedDict()
        self.prefix_query_tokens = 0  # prompt tokens looked up in the prefix cache
        self.prefix_hit_tokens = 0  # of which were found

    # ---- accounting -----------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self._free) + len(self._evictable)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    @property
    def num_cached_blocks(self) -> int:
        return len(self._cached)

    def usage(self) -> float:
        return self.num_used_blocks / self.num_blocks

    def prefix_hit_rate(self) -> float:
        return self.prefix_hit_tokens / self.prefix_query_tokens if self.prefix_query_tokens \
            else 0.0

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def num_new_blocks(self, seq: Sequence, num_new_tokens: int) -> int:
        """Blocks `seq` must gain to hold its computed tokens plus `num_new_tokens` more."""
        need = self.blocks_for(seq.num_computed_tokens + num_new_tokens)
        return max(0, need - len(seq.block_table))

    def can_allocate(self, seq: Sequence, num_new_tokens: int) -> bool:
        return self.num_new_blocks(seq, num_new_tokens) <= self.num_free_blocks

    # ---- allocation -----------------------------------------------------------------
    def _take_free_block(self) -> int:
        if self._free:
            b = self._free.popleft()
        else:
            b, _ = self._evictable.popitem(last=False)  # least recently used
            h = self._block_hash[b]
            self._block_hash[b] = None
            if h is not None and self._cached.get(h) == b:
                del self._cached[h]
        self._ref_counts[b] = 1
        return b

    def allocate(self, seq: Sequence, num_new_tokens: int) -> None:
        n = self.num_new_blocks(seq, num_new_tokens)
        if n > self.num_free_blocks:
            raise NoFreeBlocksError(f"need {n} blocks, {self.num_free_blocks} free")
        for _ in range(n):
            seq.block_table.append(self._take_free_block())

    def trim(self, seq: Sequence) -> None:
        """Free the blocks past those that hold `seq`'s computed tokens (rejected
        proposals' slots: never registered, so never shared)."""
        keep = max(self.blocks_for(seq.num_computed_tokens), seq.num_registered_blocks)
        while len(seq.block_table) > keep:
            b = seq.block_table.pop()
            self._ref_counts[b] -= 1
            if self._ref_counts[b] == 0:
                self._free.append(b)

    def release_out_of_window(self, seq: Sequence) -> None:
        """With a sliding window: give back the leading blocks no later query of `seq` can
        see (a query at position q sees q - window + 1 .. q; the next one is at
        num_computed_tokens). Their table entries become RELEASED; registered ones stay in
        the prefix cache, as any freed block does."""
        w = self.sliding_window
        if w is None:
            return
        first_needed = seq.num_computed_tokens - w + 1
        table = seq.block_table
        for i in range(min(max(first_needed, 0) // self.block_size, len(table))):
            b = table[i]
            if b == RELEASED:
                continue
            table[i] = RELEASED
            self._unref(b)

    def _unref(self, b: int) -> None:
        """One user fewer for block b; the last one parks a registered block on the LRU
        list (its prefix stays findable) and puts any other back on the free list."""
        self._ref_counts[b] -= 1
        if self._ref_counts[b] == 0:
            if self._block_hash[b] is not None:
                self._evictable[b] = None
            else:
                self._free.append(b)

    def free(self, seq: Sequence) -> None:
        # Check every block before touching any, so a double free leaves the pool intact.
        drops = Counter(b for b in seq.block_table if b != RELEASED)
        for b, k in drops.items():
            if self._ref_counts[b] < k:
                raise RuntimeError(f"block {b} freed twice")
        # Release in reverse so the tail blocks (least likely to be shared later) are the
        # first to be evicted from the LRU list.
        for b in reversed(seq.block_table):
            if b != RELEASED:
                self._unref(b)
        seq.block_table = []
        seq.num_registered_blocks = 0

    # ---- prefix caching -------------------------------------------------------------
    def _block_hashes(self, seq: Sequence, num_full_blocks: int) -> list[bytes]:
        """Chain hashes of the first `num_full_blocks` blocks of `seq`, memoized on it
        (tokens never change once written, so neither do the hashes)."""
        hashes = seq.block_hashes
        bs = self.block_size
        while len(hashes) < num_full_blocks:
            i = len(hashes)
            toks = [seq.token_at(j) for j in range(i * bs, (i + 1) * bs)]
            hashes.append(hash_block(hashes[-1] if hashes else None, toks))
        return hashes

    def find_cached_prefix(self, seq: Sequence) -> list[int]:
        """Cached blocks holding the longest known prefix of `seq` (a pure lookup).

        The last token is never taken from the cache: the step needs to run it to get the
        logits of the next token, so at most (num_tokens - 1) // block_size blocks match.
        A sequence that needs the logits of its whole prompt takes nothing.
        """
        if not self.enable_prefix_caching or seq.block_table or seq.needs_prompt_logits:
            return []
        limit = (seq.num_tokens - 1) // self.block_size
        blocks: list[int] = []
        for h in self._block_hashes(seq, limit):
            b = self._cached.get(h)
            if b is None:
                break
            blocks.append(b)
        return blocks

    def can_allocate_with_prefix(self, seq: Sequence, cached: list[int],
                                 num_new_tokens: int) -> bool:
        """Like can_allocate for a sequence about to adopt `cached` as its first blocks:
        reviving a cached block that sits on the LRU list uses up one free block too."""
        revive = sum(1 for b in cached if self._ref_counts[b] == 0)
        need = self.blocks_for(len(cached) * self.block_size + num_new_tokens) - len(cached)
        return need + revive <= self.num_free_blocks

    def adopt_prefix(self, seq: Sequence, cached: list[int]) -> None:
        """Give an empty sequence the cached blocks of its prefix (ref counted)."""
        if seq.block_table:
            raise RuntimeError("adopt_prefix needs a sequence without blocks")
        for b in cached:
            if self._ref_counts[b] == 0:
                del self._evictable[b]
            self._ref_counts[b] += 1
            seq.block_table.append(b)
        seq.num_registered_blocks = len(cached)
        if self.enable_prefix_caching:
            # the hit rate counts what a lookup could find: every token but the last
            self.prefix_query_tokens += seq.num_tokens - 1
            self.prefix_hit_tokens += len(cached) * self.block_size

    def register_computed(self, seq: Sequence) -> None:
        """Register the blocks of `seq` that have become full and computed since last time.

        Called after a step has written their K/V, never at allocation: a block must not be
        found by another sequence before its contents exist.
        """
        if not self.enable_prefix_caching:
            return
        full = min(seq.num_computed_tokens // self.block_size, len(seq.block_table))
        if full <= seq.num_registered_blocks:
            return
        hashes = self._block_hashes(seq, full)
        for i in range(seq.num_registered_blocks, full):
            b, h = seq.block_table[i], hashes[i]
            if b == RELEASED:
                continue
            # The same prefix may have been computed twice (two requests admitted in one
            # step); the first copy stays the cached one and this one stays private.
            if h not in self._cached and self._block_hash[b] is None:
                self._cached[h] = b
                self._block_hash[b] = h
        seq.num_registered_blocks = full

    def reset_prefix_cache(self) -> None:
        """Forget every cached prefix (blocks in use keep their contents)."""
        for b in list(self._evictable):
            self._free.append(b)
        self._evictable.clear()
        self._cached.clear()
        self._block_hash = [None] * self.num_blocks
