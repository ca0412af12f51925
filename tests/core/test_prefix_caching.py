"""Automatic prefix caching in the block manager and scheduler, without a model.

A simulated engine drives the scheduler like LLMEngine.step (schedule -> write K/V ->
mark_computed -> sample). The fake KV pool stores (position, token) per slot and every
scheduled chunk reads its whole context back, so a cached block with the wrong contents,
a block reused while still shared, or a lost block shows up as a wrong read.
"""

from __future__ import annotations

import random

import pytest

from sparsa.config import SchedulerConfig
from sparsa.core.block_manager import BlockManager, hash_block
from sparsa.core.scheduler import Scheduler
from sparsa.core.sequence import Sequence


class Sim:
    def __init__(self, num_blocks=32, block_size=4, budget=64, chunked=True, caching=True,
                 max_num_seqs=64):
        self.bm = BlockManager(num_blocks, block_size, enable_prefix_caching=caching)
        cfg = SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=budget,
                              enable_chunked_prefill=chunked)
        self.sched = Scheduler(cfg, self.bm)
        self.kv: dict[int, tuple[int, int]] = {}
        self.max_tokens: dict[int, int] = {}
        self.computed_prefill = 0  # prompt/recompute tokens actually run through the "model"
        self.preemptions = 0
        self.clock = 0.0

    def add(self, prompt: list[int], max_tokens: int = 3, name: str = "r") -> Sequence:
        self.clock += 1
        seq = Sequence(name, list(prompt), arrival_time=self.clock)
        self.max_tokens[seq.seq_id] = max_tokens
        self.sched.add(seq)
        return seq

    def step(self):
        out = self.sched.schedule()
        self.preemptions += len(out.preempted)
        bs = self.bm.block_size
        sampled = [it.seq for it in out.scheduled if it.samples]
        for it in out.scheduled:
            seq, start, n = it.seq, it.seq.num_computed_tokens, it.num_new_tokens
            if n > 1:
                self.computed_prefill += n
            for pos in range(start, start + n):
                self.kv[seq.block_table[pos // bs] * bs + pos % bs] = (pos, seq.token_at(pos))
            for pos in range(start + n):
                got = self.kv.get(seq.block_table[pos // bs] * bs + pos % bs)
                assert got == (pos, seq.token_at(pos)), f"{seq.request_id}: bad KV at {pos}"
        self.sched.mark_computed(out)
        for seq in sampled:
            # deterministic "greedy" token: a function of the context only
            seq.output_token_ids.append(sum(seq.all_token_ids[-3:]) % 97)
            if len(seq.output_token_ids) >= self.max_tokens[seq.seq_id]:
                self.sched.finish(seq)
        check_invariants(self.bm, self.sched.running)
        return out

    def run(self, max_steps=10_000):
        steps = 0
        while self.sched.has_unfinished():
            self.step()
            steps += 1
            assert steps < max_steps, "livelock"


def check_invariants(bm: BlockManager, running: list[Sequence]) -> None:
    refs = [0] * bm.num_blocks
    for s in running:
        for b in s.block_table:
            refs[b] += 1
    assert refs == bm._ref_counts, "reference counts disagree with the live block tables"
    free, evictable = set(bm._free), set(bm._evictable)
    assert len(free) == len(bm._free) and not free & evictable
    for b in range(bm.num_blocks):
        assert (refs[b] == 0) == (b in free or b in evictable), f"block {b} leaked or live+free"
    for h, b in bm._cached.items():
        assert bm._block_hash[b] == h
    assert all(bm._block_hash[b] is not None for b in evictable)


def assert_all_free(bm: BlockManager) -> None:
    assert bm.num_free_blocks == bm.num_blocks
    assert all(r == 0 for r in bm._ref_counts)


def test_chain_hash_depends_on_the_whole_prefix():
    a = hash_block(None, [1, 2, 3, 4])
    assert a == hash_block(None, [1, 2, 3, 4])
    assert hash_block(a, [5, 6, 7, 8]) != hash_block(None, [5, 6, 7, 8])
    assert hash_block(a, [5, 6, 7, 8]) != hash_block(hash_block(None, [0, 2, 3, 4]),
                                                     [5, 6, 7, 8])


def test_second_request_reuses_the_shared_prefix():
    sim = Sim(block_size=4)
    shared = list(range(10, 22))  # 3 full blocks
    a = sim.add(shared + [1, 2], name="a")
    sim.step()  # a's prompt (14 tokens) runs whole
    b = sim.add(shared + [3, 4, 5], name="b")
    out = sim.step()
    item = next(it for it in out.scheduled if it.seq is b)
    assert b.num_cached_tokens == 12 and item.num_new_tokens == 3
    assert a.block_table[:3] == b.block_table[:3]
    assert all(sim.bm._ref_counts[x] == 2 for x in a.block_table[:3])
    sim.run()
    assert_all_free(sim.bm)
    assert sim.bm.prefix_hit_tokens == 12


def test_block_aligned_prompt_recomputes_its_last_block():
    sim = Sim(block_size=4)
    prompt = list(range(30, 38))  # exactly 2 blocks
    sim.add(prompt)
    sim.run()
    b = sim.add(prompt)
    out = sim.step()
    # only the first block can be reused: the last token must run to produce logits
    assert b.num_cached_tokens == 4 and out.scheduled[0].num_new_tokens == 4
    sim.run()
    assert_all_free(sim.bm)


def test_off_switch_never_hits():
    sim = Sim(caching=False)
    for _ in range(3):
        sim.add(list(range(40, 60)))
        sim.run()
    assert sim.bm.prefix_hit_tokens == 0 and sim.bm.num_cached_blocks == 0
    assert len(sim.bm._evictable) == 0
    assert_all_free(sim.bm)


def test_free_cached_blocks_are_evicted_lru_after_the_free_list():
    bm = BlockManager(4, 2, enable_prefix_caching=True)
    old, new = Sequence("old", [1, 2, 3]), Sequence("new", [5, 6, 7])
    for s in (old, new):
        bm.allocate(s, 3)
        s.num_computed_tokens = 3
        bm.register_computed(s)  # first block (2 tokens) of each is cached
    bm.free(old)
    bm.free(new)
    assert bm.num_cached_blocks == 2 and bm.num_free_blocks == 4
    old_block = bm._cached[hash_block(None, [1, 2])]
    # the two never-cached blocks are used first, then the least recently freed one
    s = Sequence("x", list(range(100, 106)))
    bm.allocate(s, 6)
    assert old_block in s.block_table
    assert bm.num_cached_blocks == 1
    assert bm.find_cached_prefix(Sequence("y", [5, 6, 9])) != []
    assert bm.find_cached_prefix(Sequence("z", [1, 2, 9])) == []


def test_cached_blocks_in_the_lru_count_toward_admission():
    bm = BlockManager(3, 2, enable_prefix_caching=True)
    a = Sequence("a", [1, 2, 3, 4, 5])
    bm.allocate(a, 5)
    a.num_computed_tokens = 5
    bm.register_computed(a)
    bm.free(a)
    b = Sequence("b", [1, 2, 3, 4, 9])
    hit = bm.find_cached_prefix(b)
    assert len(hit) == 2
    # reviving 2 cached blocks + 1 new block = all 3 free blocks
    assert bm.can_allocate_with_prefix(b, hit, 1)
    assert not bm.can_allocate_with_prefix(b, hit, 3)
    bm.adopt_prefix(b, hit)
    b.num_computed_tokens = 4
    bm.allocate(b, 1)
    assert bm.num_free_blocks == 0 and len(set(b.block_table)) == 3


def test_reset_prefix_cache():
    sim = Sim()
    sim.add(list(range(20)))
    sim.run()
    assert sim.bm.num_cached_blocks > 0
    sim.bm.reset_prefix_cache()
    assert sim.bm.num_cached_blocks == 0
    assert_all_free(sim.bm)
    assert len(sim.bm._free) == sim.bm.num_blocks


def _workload(seed: int, n: int = 40):
    rng = random.Random(seed)
    systems = [[rng.randrange(1000) for _ in range(rng.choice([4, 9, 16, 23]))]
               for _ in range(3)]
    reqs = []
    for _ in range(n):
        prefix = rng.choice(systems) if rng.random() < 0.8 else []
        suffix = [rng.randrange(1000) for _ in range(rng.randrange(1, 12))]
        reqs.append((prefix + suffix, rng.randrange(1, 8)))
    return reqs


def _run_workload(reqs, caching, **kw):
    sim = Sim(caching=caching, **kw)
    seqs = []
    rng = random.Random(1)
    pending = list(reqs)
    while pending or sim.sched.has_unfinished():
        for _ in range(rng.randrange(0, 4)):  # requests join a running batch
            if pending:
                prompt, mt = pending.pop(0)
                seqs.append(sim.add(prompt, mt, name=f"r{len(seqs)}"))
        if sim.sched.has_unfinished():
            sim.step()
    assert_all_free(sim.bm)
    return [s.output_token_ids for s in seqs], sim


@pytest.mark.parametrize("chunked", [True, False])
@pytest.mark.parametrize("num_blocks,budget", [(64, 64), (14, 16), (12, 8)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_shared_prefix_workload_same_outputs_no_leaks(chunked, num_blocks, budget,
                                                              seed):
    reqs = _workload(seed)
    off, sim_off = _run_workload(reqs, caching=False, num_blocks=num_blocks, budget=budget,
                                 chunked=chunked)
    on, sim_on = _run_workload(reqs, caching=True, num_blocks=num_blocks, budget=budget,
                               chunked=chunked)
    assert on == off
    assert sim_on.bm.prefix_hit_tokens > 0
    assert sim_on.computed_prefill < sim_off.computed_prefill


def test_preempted_sequence_finds_its_own_blocks_again():
    # 6 blocks of 4: two long sequences cannot both grow to their full length
    sim = Sim(num_blocks=6, block_size=4, budget=32)
    a = sim.add(list(range(100, 110)), max_tokens=8, name="a")
    b = sim.add(list(range(200, 209)), max_tokens=8, name="b")
    sim.run()
    assert sim.preemptions > 0
    assert sim.bm.prefix_hit_tokens > 0, "the readmitted sequence recomputed everything"
    assert len(a.output_token_ids) == 8 and len(b.output_token_ids) == 8
    assert_all_free(sim.bm)


def test_abort_of_a_sharing_sequence_keeps_the_other_intact():
    sim = Sim(block_size=4)
    shared = list(range(50, 62))
    a = sim.add(shared + [1], max_tokens=6, name="a")
    sim.step()
    b = sim.add(shared + [2], max_tokens=6, name="b")
    sim.step()
    assert a.block_table[:3] == b.block_table[:3]
    sim.sched.abort(a)
    sim.run()  # b keeps reading the shared blocks; the sim checks their contents
    assert len(b.output_token_ids) == 6
    assert_all_free(sim.bm)
