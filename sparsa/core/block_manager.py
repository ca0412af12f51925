"""Paged KV block allocation: fixed-size blocks, per-sequence block tables, usage stats."""

from __future__ import annotations

from collections import Counter, deque

from sparsa.core.sequence import Sequence


class NoFreeBlocksError(RuntimeError):
    pass


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1 or block_size < 1:
            raise ValueError("num_blocks and block_size must be >= 1")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(num_blocks))
        self._ref_counts = [0] * num_blocks

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    def usage(self) -> float:
        return self.num_used_blocks / self.num_blocks

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def num_new_blocks(self, seq: Sequence, num_new_tokens: int) -> int:
        """Blocks `seq` must gain to hold its computed tokens plus `num_new_tokens` more."""
        need = self.blocks_for(seq.num_computed_tokens + num_new_tokens)
        return max(0, need - len(seq.block_table))

    def can_allocate(self, seq: Sequence, num_new_tokens: int) -> bool:
        return self.num_new_blocks(seq, num_new_tokens) <= len(self._free)

    def allocate(self, seq: Sequence, num_new_tokens: int) -> None:
        n = self.num_new_blocks(seq, num_new_tokens)
        if n > len(self._free):
            raise NoFreeBlocksError(f"need {n} blocks, {len(self._free)} free")
        for _ in range(n):
            b = self._free.popleft()
            self._ref_counts[b] = 1
            seq.block_table.append(b)

    def free(self, seq: Sequence) -> None:
        # Check every block before touching any, so a double free leaves the pool intact.
        drops = Counter(seq.block_table)
        for b, k in drops.items():
            if self._ref_counts[b] < k:
                raise RuntimeError(f"block {b} freed twice")
        # Release in reverse so the tail blocks (least likely to be shared later) go first.
        for b in reversed(seq.block_table):
            self._ref_counts[b] -= 1
            if self._ref_counts[b] == 0:
                self._free.append(b)
        seq.block_table = []
