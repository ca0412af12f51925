"""BlockManager: paged KV block allocation, pure Python."""

from __future__ import annotations

import random

import pytest

from sparsa.core.block_manager import BlockManager, NoFreeBlocksError
from sparsa.core.sequence import Sequence


def make_seq(n_prompt: int = 1, name: str = "r") -> Sequence:
    return Sequence(name, list(range(n_prompt)), arrival_time=0.0)


def check_pool(bm: BlockManager, seqs: list[Sequence]) -> None:
    """Live tables are disjoint, and together with the free list cover the pool exactly."""
    live = [b for s in seqs for b in s.block_table]
    assert len(live) == len(set(live)), "a block is owned twice"
    free = list(bm._free)
    assert len(free) == len(set(free)), "a block is on the free list twice"
    assert not set(live) & set(free), "a live block is on the free list"
    assert sorted(live + free) == list(range(bm.num_blocks))
    assert bm.num_used_blocks == len(live)
    assert bm.num_free_blocks == len(free)


def test_rejects_empty_pool_or_block():
    with pytest.raises(ValueError):
        BlockManager(0, 16)
    with pytest.raises(ValueError):
        BlockManager(4, 0)


@pytest.mark.parametrize(
    "tokens, blocks", [(0, 0), (1, 1), (3, 1), (4, 1), (5, 2), (8, 2), (9, 3), (17, 5)]
)
def test_blocks_for_rounds_up(tokens, blocks):
    assert BlockManager(10, 4).blocks_for(tokens) == blocks


@pytest.mark.parametrize("n_tokens, blocks", [(1, 1), (4, 1), (5, 2), (12, 3), (13, 4)])
def test_allocation_rounds_up_to_whole_blocks(n_tokens, blocks):
    bm = BlockManager(8, 4)
    seq = make_seq(n_tokens)
    assert bm.num_new_blocks(seq, n_tokens) == blocks
    bm.allocate(seq, n_tokens)
    assert len(seq.block_table) == blocks
    assert bm.num_used_blocks == blocks
    assert bm.num_free_blocks == 8 - blocks
    check_pool(bm, [seq])


def test_incremental_allocation_as_sequence_grows():
    bm = BlockManager(8, 4)
    seq = make_seq(5)
    bm.allocate(seq, 5)  # prompt of 5 -> 2 blocks
    assert len(seq.block_table) == 2
    first_two = list(seq.block_table)
    seq.num_computed_tokens = 5
    # decodes at positions 5, 6, 7 fit in block 2; position 8 needs a third block
    for expected in (2, 2, 2, 3, 3, 3, 3, 4):
        assert bm.num_new_blocks(seq, 1) == expected - len(seq.block_table)
        bm.allocate(seq, 1)
        seq.num_computed_tokens += 1
        assert len(seq.block_table) == expected
    assert seq.block_table[:2] == first_two, "growing must not move existing blocks"
    check_pool(bm, [seq])


def test_chunked_allocation_matches_one_shot():
    bm = BlockManager(16, 4)
    seq = make_seq(23)
    for chunk in (7, 7, 7, 2):
        bm.allocate(seq, chunk)
        seq.num_computed_tokens += chunk
        assert len(seq.block_table) == bm.blocks_for(seq.num_computed_tokens)
    assert len(seq.block_table) == 6
    # allocating for tokens that already have room is a no-op
    bm.allocate(seq, 1)
    assert len(seq.block_table) == 6


def test_free_returns_every_block_and_clears_table():
    bm = BlockManager(10, 4)
    a, b = make_seq(9, "a"), make_seq(13, "b")
    bm.allocate(a, 9)
    bm.allocate(b, 13)
    assert bm.num_used_blocks == 3 + 4
    check_pool(bm, [a, b])
    bm.free(a)
    assert a.block_table == []
    assert bm.num_used_blocks == 4
    check_pool(bm, [a, b])
    bm.free(b)
    assert bm.num_free_blocks == 10
    assert bm.num_used_blocks == 0
    assert bm.usage() == 0.0
    check_pool(bm, [a, b])


def test_freeing_a_sequence_without_blocks_is_a_noop():
    bm = BlockManager(4, 4)
    seq = make_seq(3)
    bm.free(seq)
    bm.allocate(seq, 3)
    bm.free(seq)
    bm.free(seq)  # table already cleared: nothing left to release
    assert bm.num_free_blocks == 4


def test_double_free_raises():
    bm = BlockManager(4, 4)
    seq = make_seq(8)
    bm.allocate(seq, 8)
    stale = list(seq.block_table)
    bm.free(seq)
    seq.block_table = stale
    with pytest.raises(RuntimeError, match="freed twice"):
        bm.free(seq)
    assert bm.num_free_blocks == 4


def test_double_free_leaves_pool_intact():
    """Regression: a stale table used to release a block now owned by someone else before
    noticing the double free, putting a live block on the free list."""
    bm = BlockManager(3, 4)
    a = make_seq(8, "a")
    bm.allocate(a, 8)  # blocks 0, 1
    stale = list(a.block_table)
    bm.free(a)
    b = make_seq(8, "b")
    bm.allocate(b, 8)  # block 2 plus the tail block a released first
    assert b.block_table == [2, stale[1]]
    a.block_table = stale  # stale[1] is b's now, stale[0] is free
    with pytest.raises(RuntimeError, match="freed twice"):
        bm.free(a)
    # nothing was released: b still owns both its blocks and only stale[0] is free
    assert list(bm._free) == [stale[0]]
    a.block_table = []
    check_pool(bm, [a, b])
    c = make_seq(8, "c")
    with pytest.raises(NoFreeBlocksError):
        bm.allocate(c, 8)


def test_duplicate_block_in_one_table_is_a_double_free():
    bm = BlockManager(4, 4)
    seq = make_seq(4)
    bm.allocate(seq, 4)
    seq.block_table = seq.block_table * 2
    with pytest.raises(RuntimeError, match="freed twice"):
        bm.free(seq)
    assert bm.num_used_blocks == 1


def test_no_free_blocks_error_when_over_capacity():
    bm = BlockManager(4, 4)
    a = make_seq(12, "a")
    bm.allocate(a, 12)  # 3 of 4 blocks
    b = make_seq(8, "b")
    assert not bm.can_allocate(b, 8)
    assert bm.can_allocate(b, 4)
    with pytest.raises(NoFreeBlocksError):
        bm.allocate(b, 8)
    # a failed allocation takes nothing
    assert b.block_table == []
    assert bm.num_free_blocks == 1
    assert issubclass(NoFreeBlocksError, RuntimeError)
    bm.allocate(b, 4)
    assert bm.num_free_blocks == 0
    with pytest.raises(NoFreeBlocksError):
        bm.allocate(make_seq(1), 1)
    check_pool(bm, [a, b])


def test_single_sequence_can_fill_the_whole_pool():
    bm = BlockManager(5, 4)
    seq = make_seq(20)
    assert bm.can_allocate(seq, 20)
    assert not bm.can_allocate(seq, 21)
    bm.allocate(seq, 20)
    assert bm.usage() == 1.0
    assert bm.num_free_blocks == 0


def test_usage_numbers():
    bm = BlockManager(8, 2)
    assert (bm.num_used_blocks, bm.num_free_blocks, bm.usage()) == (0, 8, 0.0)
    a = make_seq(3, "a")
    bm.allocate(a, 3)
    assert (bm.num_used_blocks, bm.num_free_blocks, bm.usage()) == (2, 6, 0.25)
    b = make_seq(4, "b")
    bm.allocate(b, 4)
    assert (bm.num_used_blocks, bm.num_free_blocks, bm.usage()) == (4, 4, 0.5)
    c = make_seq(7, "c")
    bm.allocate(c, 7)
    assert (bm.num_used_blocks, bm.num_free_blocks, bm.usage()) == (8, 0, 1.0)
    bm.free(b)
    assert (bm.num_used_blocks, bm.num_free_blocks, bm.usage()) == (6, 2, 0.75)


def test_freed_blocks_are_reused():
    bm = BlockManager(2, 4)
    for i in range(10):
        seq = make_seq(8, str(i))
        bm.allocate(seq, 8)
        assert sorted(seq.block_table) == [0, 1]
        bm.free(seq)
    assert bm.num_free_blocks == 2


def test_random_allocate_free_never_leaks():
    rng = random.Random(1234)
    bm = BlockManager(32, 4)
    live: list[Sequence] = []
    for step in range(3000):
        if live and rng.random() < 0.3:
            seq = live.pop(rng.randrange(len(live)))
            bm.free(seq)
        elif live and rng.random() < 0.5:
            seq = rng.choice(live)
            n = rng.randint(1, 9)
            if bm.can_allocate(seq, n):
                bm.allocate(seq, n)
                seq.num_computed_tokens += n
            else:
                with pytest.raises(NoFreeBlocksError):
                    bm.allocate(seq, n)
        else:
            seq = make_seq(1, f"s{step}")
            n = rng.randint(1, 20)
            if bm.can_allocate(seq, n):
                bm.allocate(seq, n)
                seq.num_computed_tokens += n
                live.append(seq)
        for s in live:
            assert len(s.block_table) == bm.blocks_for(s.num_computed_tokens)
        check_pool(bm, live)
    for seq in live:
        bm.free(seq)
    assert bm.num_free_blocks == 32
    assert bm._ref_counts == [0] * 32
