"""Scheduler: continuous batching, chunked prefill, preemption, policies, no leaks.

Pure Python: a tiny simulated engine drives the scheduler the way LLMEngine.step does
(schedule -> "model" -> num_computed_tokens += num_new_tokens -> sampled sequences get a
token, and finish after their max_tokens). The "model" writes every computed token into a
fake paged KV pool through the block table and reads each sequence's whole context back,
so a block shared by two live sequences, a lost block or a wrong recompute shows up.
"""

from __future__ import annotations

import random

import pytest

from sparsa.config import SchedulerConfig
from sparsa.core.block_manager import BlockManager
from sparsa.core.scheduler import ScheduledSequence, Scheduler, SchedulerOutput
from sparsa.core.sequence import Sequence, SequenceStatus


def fake_token(seq: Sequence, i: int) -> int:
    """The i-th generated token of `seq`: deterministic, so a duplicate or skip shows."""
    return (seq.seq_id * 7919 + i * 31) % 1000


class Sim:
    def __init__(
        self,
        num_blocks: int = 64,
        block_size: int = 4,
        budget: int = 64,
        max_num_seqs: int = 64,
        chunked: bool = True,
        policy: str = "fcfs",
    ):
        self.config = SchedulerConfig(
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=budget,
            enable_chunked_prefill=chunked,
            policy=policy,
        )
        self.bm = BlockManager(num_blocks, block_size)
        self.sched = Scheduler(self.config, self.bm)
        self.max_tokens: dict[int, int] = {}
        self.seqs: list[Sequence] = []
        self.finished: list[Sequence] = []
        self.aborted: list[Sequence] = []
        self.kv: dict[int, tuple[int, int, int]] = {}  # slot -> (seq_id, position, token)
        self.clock = 0.0
        self.steps = 0
        self.num_preempted = 0
        self.last_sampled: list[str] = []  # who got a token in the latest step

    # ---- requests ------------------------------------------------------------------
    def add(
        self,
        prompt_len: int,
        max_tokens: int = 4,
        priority: int = 0,
        name: str | None = None,
        arrival: float | None = None,
    ) -> Sequence:
        if arrival is None:
            self.clock += 1.0
            arrival = self.clock
        name = name or f"r{len(self.seqs)}"
        prompt = [(len(self.seqs) * 13 + j) % 997 for j in range(prompt_len)]
        seq = Sequence(name, prompt, priority=priority, arrival_time=arrival)
        self.max_tokens[seq.seq_id] = max_tokens
        self.seqs.append(seq)
        self.sched.add(seq)
        return seq

    def abort(self, seq: Sequence) -> None:
        self.sched.abort(seq)
        self.aborted.append(seq)

    # ---- stepping ------------------------------------------------------------------
    def step(self) -> SchedulerOutput:
        out = self.sched.schedule()
        self.steps += 1
        self.num_preempted += len(out.preempted)
        self.check(out)
        sampled = [item.seq for item in out.scheduled if item.samples]  # before advancing
        self.last_sampled = names(sampled)
        for item in out.scheduled:
            self._compute(item)
        for item in out.scheduled:
            item.seq.num_computed_tokens += item.num_new_tokens
        for seq in sampled:
            seq.output_token_ids.append(fake_token(seq, len(seq.output_token_ids)))
            if len(seq.output_token_ids) >= self.max_tokens[seq.seq_id]:
                seq.finish_reason = "length"
                self.sched.finish(seq)
                self.finished.append(seq)
        self.check_pool()
        return out

    def run(self, max_steps: int = 20_000) -> None:
        while self.sched.has_unfinished():
            out = self.step()
            assert not (out.is_empty and not out.preempted), (
                f"step {self.steps} did nothing with {self.sched.num_unfinished()} unfinished"
            )
            assert self.steps < max_steps, "no progress: livelock"

    def _slot(self, seq: Sequence, pos: int) -> int:
        bs = self.bm.block_size
        return seq.block_table[pos // bs] * bs + pos % bs

    def _compute(self, item: ScheduledSequence) -> None:
        """Write the chunk's K/V, then read back the whole context like attention would."""
        seq, n = item.seq, item.num_new_tokens
        start = seq.num_computed_tokens
        for pos in range(start, start + n):
            self.kv[self._slot(seq, pos)] = (seq.seq_id, pos, seq.token_at(pos))
        for pos in range(start + n):
            assert self.kv.get(self._slot(seq, pos)) == (seq.seq_id, pos, seq.token_at(pos)), (
                f"{seq.request_id}: KV of position {pos} lost or overwritten"
            )

    # ---- invariants ----------------------------------------------------------------
    def check(self, out: SchedulerOutput) -> None:
        cfg = self.config
        seqs = [item.seq for item in out.scheduled]
        assert len(seqs) == len({id(s) for s in seqs}), "a sequence scheduled twice in a step"
        assert out.num_tokens <= cfg.max_num_batched_tokens, "token budget overrun"
        assert len(self.sched.running) <= cfg.max_num_seqs
        assert len(self.sched.running) == len({id(s) for s in self.sched.running})
        assert not {id(s) for s in self.sched.running} & {id(s) for s in self.sched.waiting}
        for item in out.scheduled:
            seq, n = item.seq, item.num_new_tokens
            assert n >= 1
            assert n <= seq.num_uncomputed_tokens
            assert seq.status is SequenceStatus.RUNNING
            assert any(s is seq for s in self.sched.running)
            assert len(seq.block_table) == self.bm.blocks_for(seq.num_computed_tokens + n)
            assert item.samples == (seq.num_computed_tokens + n == seq.num_tokens)
            if not cfg.enable_chunked_prefill and seq.num_uncomputed_tokens <= (
                cfg.max_num_batched_tokens
            ):
                assert n == seq.num_uncomputed_tokens, "prefill split with chunking disabled"
        for seq in out.preempted:
            assert not any(s is seq for s in seqs), "a scheduled sequence was preempted"
            assert seq.status is SequenceStatus.WAITING
            assert any(s is seq for s in self.sched.waiting)
            assert seq.block_table == [] and seq.num_computed_tokens == 0
        self.check_pool()

    def check_pool(self) -> None:
        live = [b for s in self.sched.running for b in s.block_table]
        assert len(live) == len(set(live)), "a block owned by two sequences"
        assert self.bm.num_used_blocks == len(live), "leaked blocks"
        for s in self.sched.waiting:
            assert s.block_table == [] and s.num_computed_tokens == 0
            assert s.status is SequenceStatus.WAITING

    def assert_all_done(self) -> None:
        assert not self.sched.has_unfinished()
        assert self.sched.running == [] and self.sched.waiting == []
        assert self.bm.num_free_blocks == self.bm.num_blocks, "blocks leaked"
        assert self.bm.usage() == 0.0
        assert self.bm._ref_counts == [0] * self.bm.num_blocks
        aborted = {id(s) for s in self.aborted}
        for seq in self.seqs:
            assert seq.is_finished
            assert seq.block_table == []
            if id(seq) in aborted:
                continue
            want = self.max_tokens[seq.seq_id]
            assert seq.output_token_ids == [fake_token(seq, i) for i in range(want)], (
                f"{seq.request_id} did not get exactly its {want} tokens"
            )


def scheduled(out: SchedulerOutput) -> list[tuple[str, int]]:
    return [(item.seq.request_id, item.num_new_tokens) for item in out.scheduled]


def names(seqs: list[Sequence]) -> list[str]:
    return [s.request_id for s in seqs]


# ---- basics ------------------------------------------------------------------------


def test_empty_scheduler_schedules_nothing():
    sim = Sim()
    out = sim.sched.schedule()
    assert out.is_empty and out.num_tokens == 0 and out.preempted == []
    assert not sim.sched.has_unfinished()


def test_single_request_prefill_then_decodes():
    sim = Sim(block_size=4)
    a = sim.add(6, max_tokens=3, name="a")
    assert a.status is SequenceStatus.WAITING and sim.sched.num_unfinished() == 1
    out = sim.step()
    assert scheduled(out) == [("a", 6)]
    assert sim.last_sampled == ["a"]
    assert a.status is SequenceStatus.RUNNING and len(a.block_table) == 2
    assert scheduled(sim.step()) == [("a", 1)]
    assert scheduled(sim.step()) == [("a", 1)]
    assert a.is_finished and a.finish_reason == "length"
    sim.assert_all_done()


def test_samples_only_at_the_end_of_known_tokens():
    seq = Sequence("a", [1, 2, 3, 4, 5], arrival_time=0.0)
    assert not ScheduledSequence(seq, 3).samples
    assert ScheduledSequence(seq, 5).samples
    seq.num_computed_tokens = 3
    assert ScheduledSequence(seq, 2).samples
    seq.num_computed_tokens = 5
    seq.output_token_ids.append(9)
    assert ScheduledSequence(seq, 1).samples


def test_token_budget_respected_every_step():
    sim = Sim(budget=12, block_size=4, num_blocks=256)
    for i in range(10):
        sim.add(5 + i, max_tokens=6)
    first = sim.step()
    assert first.num_tokens == 12
    assert scheduled(first) == [("r0", 5), ("r1", 6), ("r2", 1)]  # r2 gets the leftover
    while sim.sched.has_unfinished():
        out = sim.step()
        assert 0 < out.num_tokens <= 12
    sim.assert_all_done()


# ---- continuous batching -----------------------------------------------------------


def test_new_requests_join_a_running_batch_and_finished_ones_leave():
    sim = Sim(budget=64, block_size=4)
    a = sim.add(4, max_tokens=4, name="a")
    assert scheduled(sim.step()) == [("a", 4)]
    assert scheduled(sim.step()) == [("a", 1)]
    b = sim.add(3, max_tokens=5, name="b")
    out = sim.step()
    assert scheduled(out) == [("a", 1), ("b", 3)]  # b's prefill rides along a's decode
    assert names(sim.sched.running) == ["a", "b"]
    out = sim.step()
    assert scheduled(out) == [("a", 1), ("b", 1)]
    assert a.is_finished  # a's 4th token
    assert names(sim.sched.running) == ["b"]
    assert sim.bm.num_used_blocks == len(b.block_table) == 1
    c = sim.add(2, max_tokens=1, name="c")
    out = sim.step()
    assert scheduled(out) == [("b", 1), ("c", 2)]
    assert c.is_finished and len(c.output_token_ids) == 1  # joined and left in one step
    assert names(sim.sched.running) == ["b"]
    sim.run()
    sim.assert_all_done()


def test_requests_arriving_every_step():
    sim = Sim(budget=16, block_size=4, num_blocks=64)
    rng = random.Random(7)
    for _ in range(40):
        sim.add(rng.randint(1, 12), max_tokens=rng.randint(1, 8))
        sim.step()
    sim.run()
    sim.assert_all_done()


# ---- chunked prefill ---------------------------------------------------------------


def test_chunked_prefill_splits_a_long_prompt():
    sim = Sim(budget=8, block_size=4, chunked=True)
    a = sim.add(20, max_tokens=2, name="a")
    assert scheduled(sim.step()) == [("a", 8)] and sim.last_sampled == []
    assert a.num_computed_tokens == 8 and len(a.block_table) == 2 and a.output_token_ids == []
    assert scheduled(sim.step()) == [("a", 8)] and sim.last_sampled == []
    assert len(a.block_table) == 4 and a.output_token_ids == []
    assert scheduled(sim.step()) == [("a", 4)] and sim.last_sampled == ["a"]
    assert len(a.block_table) == 5 and len(a.output_token_ids) == 1
    assert scheduled(sim.step()) == [("a", 1)]
    sim.assert_all_done()


def test_chunked_prefill_mixes_with_decodes():
    sim = Sim(budget=8, block_size=4, chunked=True)
    sim.add(2, max_tokens=10, name="d")
    sim.step()
    b = sim.add(20, max_tokens=1, name="b")
    assert scheduled(sim.step()) == [("d", 1), ("b", 7)]
    assert scheduled(sim.step()) == [("d", 1), ("b", 7)]
    out = sim.step()
    assert scheduled(out) == [("d", 1), ("b", 6)]
    assert out.num_tokens == 7 and sim.last_sampled == ["d", "b"]
    assert b.is_finished
    sim.run()
    sim.assert_all_done()


def test_chunked_prefill_of_two_prompts_in_one_step():
    sim = Sim(budget=10, block_size=4, chunked=True)
    sim.add(6, max_tokens=1, name="a")
    sim.add(9, max_tokens=1, name="b")
    assert scheduled(sim.step()) == [("a", 6), ("b", 4)]
    assert scheduled(sim.step()) == [("b", 5)]
    sim.assert_all_done()


# ---- chunked prefill disabled ------------------------------------------------------


def test_no_chunking_prompt_waits_until_the_step_has_room():
    sim = Sim(budget=8, block_size=4, chunked=False)
    for name, max_tokens in (("a", 2), ("b", 10), ("c", 10)):
        sim.add(2, max_tokens=max_tokens, name=name)
    d = sim.add(6, max_tokens=2, name="d")
    e = sim.add(1, max_tokens=2, name="e")
    out = sim.step()
    # 6 tokens of prefill leave 2: d (6) must wait whole, and e queues behind it (FCFS)
    assert scheduled(out) == [("a", 2), ("b", 2), ("c", 2)]
    assert d.status is SequenceStatus.WAITING and d.num_computed_tokens == 0
    assert d.block_table == []
    out = sim.step()  # a finishes here
    assert scheduled(out) == [("a", 1), ("b", 1), ("c", 1)]  # 5 left < 6: still waiting
    assert sim.sched.waiting == [d, e]
    out = sim.step()
    assert scheduled(out) == [("b", 1), ("c", 1), ("d", 6)]  # 6 left: d whole, e waits
    assert e.status is SequenceStatus.WAITING
    sim.run()
    sim.assert_all_done()


def test_no_chunking_prompt_as_large_as_the_budget_runs_alone():
    sim = Sim(budget=8, block_size=4, chunked=False)
    sim.add(8, max_tokens=3, name="a")
    assert scheduled(sim.step()) == [("a", 8)]
    sim.run()
    sim.assert_all_done()


def test_no_chunking_big_prompt_behind_decodes_does_not_starve():
    """While the budget-sized prompt waits, nobody is admitted ahead of it, so the
    running decodes drain and it eventually gets a whole step."""
    sim = Sim(budget=8, block_size=4, chunked=False)
    for _ in range(3):
        sim.add(1, max_tokens=5)
    big = sim.add(8, max_tokens=2, name="big")
    for _ in range(5):
        sim.add(1, max_tokens=5)
    sim.run(max_steps=100)
    sim.assert_all_done()
    assert big.num_preemptions == 0


def test_no_chunking_prompt_larger_than_the_budget_is_split_rather_than_stuck():
    """Regression: with chunked prefill disabled, a prompt longer than
    max_num_batched_tokens was never scheduled and the engine loop spun forever. It is
    now split into budget-sized chunks (the only way it can ever run)."""
    sim = Sim(budget=8, block_size=4, chunked=False)
    a = sim.add(20, max_tokens=3, name="a")
    assert scheduled(sim.step()) == [("a", 8)]
    assert scheduled(sim.step()) == [("a", 8)]
    assert scheduled(sim.step()) == [("a", 4)] and sim.last_sampled == ["a"]
    sim.run(max_steps=20)
    sim.assert_all_done()
    assert len(a.output_token_ids) == 3


def test_no_chunking_oversized_prompt_never_exceeds_the_budget_with_others():
    sim = Sim(budget=8, block_size=4, chunked=False)
    sim.add(2, max_tokens=12, name="d")
    sim.step()
    sim.add(19, max_tokens=2, name="big")
    out = sim.step()
    assert scheduled(out) == [("d", 1), ("big", 7)]
    sim.run(max_steps=50)
    sim.assert_all_done()


def test_no_chunking_recompute_longer_than_budget_resumes():
    """Regression: with chunked prefill disabled, a sequence preempted after generating
    enough tokens that prompt + output exceeded max_num_batched_tokens could never be
    readmitted (livelock: empty steps forever). It is now recomputed in chunks."""
    sim = Sim(budget=8, block_size=4, num_blocks=4, chunked=False)
    b = sim.add(4, max_tokens=8, name="b")
    a = sim.add(6, max_tokens=8, name="a")
    preempted_at = None
    while sim.sched.has_unfinished():
        out = sim.step()
        if out.preempted:
            assert names(out.preempted) == ["a"]
            preempted_at = a.num_tokens
        assert not (out.is_empty and not out.preempted)
        assert sim.steps < 60, "preempted sequence never resumed"
    assert preempted_at is not None and preempted_at > 8  # recompute bigger than the budget
    assert a.num_preemptions == 1 and b.num_preemptions == 0
    sim.assert_all_done()


# ---- max_num_seqs ------------------------------------------------------------------


def test_max_num_seqs_caps_the_running_batch():
    sim = Sim(budget=64, max_num_seqs=2)
    a = sim.add(3, max_tokens=2, name="a")
    sim.add(3, max_tokens=4, name="b")
    c = sim.add(3, max_tokens=2, name="c")
    sim.add(3, max_tokens=2, name="d")
    out = sim.step()
    assert scheduled(out) == [("a", 3), ("b", 3)]
    assert names(sim.sched.waiting) == ["c", "d"]
    out = sim.step()  # a finishes with its 2nd token; nobody was admitted meanwhile
    assert scheduled(out) == [("a", 1), ("b", 1)] and a.is_finished
    out = sim.step()
    assert scheduled(out) == [("b", 1), ("c", 3)]
    assert c.status is SequenceStatus.RUNNING and len(sim.sched.running) == 2
    while sim.sched.has_unfinished():
        sim.step()
        assert len(sim.sched.running) <= 2
    sim.assert_all_done()


def test_max_num_seqs_one_serves_requests_one_at_a_time():
    sim = Sim(budget=64, max_num_seqs=1)
    for _ in range(5):
        sim.add(4, max_tokens=3)
    order = []
    while sim.sched.has_unfinished():
        out = sim.step()
        assert len(out.scheduled) == 1
        if not order or order[-1] != out.scheduled[0].seq.request_id:
            order.append(out.scheduled[0].seq.request_id)
    assert order == ["r0", "r1", "r2", "r3", "r4"]
    sim.assert_all_done()


# ---- admission order ---------------------------------------------------------------


def finish_order(sim: Sim) -> list[str]:
    sim.run()
    sim.assert_all_done()
    return names(sim.finished)


def test_fcfs_admits_in_arrival_order():
    sim = Sim(budget=64, max_num_seqs=1, policy="fcfs")
    # added out of arrival order, and with priorities that FCFS must ignore
    sim.add(3, max_tokens=2, priority=0, name="third", arrival=3.0)
    sim.add(3, max_tokens=2, priority=9, name="first", arrival=1.0)
    sim.add(3, max_tokens=2, priority=5, name="second", arrival=2.0)
    assert finish_order(sim) == ["first", "second", "third"]


def test_priority_admits_lower_priority_values_first():
    sim = Sim(budget=64, max_num_seqs=1, policy="priority")
    sim.add(3, max_tokens=2, priority=3, name="p3", arrival=1.0)
    sim.add(3, max_tokens=2, priority=1, name="p1-late", arrival=4.0)
    sim.add(3, max_tokens=2, priority=2, name="p2", arrival=2.0)
    sim.add(3, max_tokens=2, priority=1, name="p1-early", arrival=3.0)
    sim.add(3, max_tokens=2, priority=-1, name="p-1", arrival=5.0)
    assert finish_order(sim) == ["p-1", "p1-early", "p1-late", "p2", "p3"]


def test_priority_admission_within_a_step():
    sim = Sim(budget=8, policy="priority")
    sim.add(4, max_tokens=1, priority=2, name="low")
    sim.add(4, max_tokens=1, priority=0, name="high")
    sim.add(4, max_tokens=1, priority=1, name="mid")
    assert scheduled(sim.step()) == [("high", 4), ("mid", 4)]
    assert scheduled(sim.step()) == [("low", 4)]
    sim.assert_all_done()


# ---- preemption --------------------------------------------------------------------


def test_preemption_fcfs_victim_is_the_latest_arrival():
    # 3 blocks of 4 tokens: a (4 tokens) needs a 2nd block for its first decode
    sim = Sim(num_blocks=3, block_size=4, budget=64, policy="fcfs")
    a = sim.add(4, max_tokens=3, name="a")
    b = sim.add(2, max_tokens=3, name="b")
    c = sim.add(2, max_tokens=3, name="c")
    assert scheduled(sim.step()) == [("a", 4), ("b", 2), ("c", 2)]
    assert sim.bm.num_free_blocks == 0
    c_blocks = list(c.block_table)
    out = sim.step()
    assert names(out.preempted) == ["c"]
    assert scheduled(out) == [("a", 1), ("b", 1)]  # no admission in a step that preempted
    assert c_blocks[0] in a.block_table  # c's block went to a
    assert c.status is SequenceStatus.WAITING and sim.sched.waiting == [c]
    assert c.block_table == [] and c.num_computed_tokens == 0 and c.num_preemptions == 1
    assert len(c.output_token_ids) == 1  # generated tokens are kept, only K/V is dropped
    assert c.num_uncomputed_tokens == 3
    out = sim.step()  # a and b finish here
    assert scheduled(out) == [("a", 1), ("b", 1)]
    assert a.is_finished and b.is_finished
    out = sim.step()
    assert scheduled(out) == [("c", 3)]  # recompute prompt + the token it already had
    assert sim.last_sampled == ["c"] and len(c.output_token_ids) == 2
    sim.run()
    sim.assert_all_done()
    assert a.num_preemptions == b.num_preemptions == 0


def test_preemption_priority_victim_is_the_largest_priority_value():
    sim = Sim(num_blocks=3, block_size=4, budget=64, policy="priority")
    a = sim.add(4, max_tokens=3, priority=0, name="a", arrival=3.0)
    b = sim.add(2, max_tokens=3, priority=5, name="b", arrival=1.0)  # earliest, but worst
    c = sim.add(2, max_tokens=3, priority=1, name="c", arrival=2.0)
    assert scheduled(sim.step()) == [("a", 4), ("c", 2), ("b", 2)]
    out = sim.step()
    assert names(out.preempted) == ["b"]
    assert scheduled(out) == [("a", 1), ("c", 1)]
    assert b.block_table == [] and b.num_computed_tokens == 0
    assert b.status is SequenceStatus.WAITING and b.num_preemptions == 1
    sim.run()
    sim.assert_all_done()
    assert a.num_preemptions == c.num_preemptions == 0


def test_preemption_fcfs_same_setup_picks_latest_even_if_it_is_the_requester():
    """With FCFS the latest arrival loses, even when it is the one asking for a block."""
    sim = Sim(num_blocks=3, block_size=4, budget=64, policy="fcfs")
    a = sim.add(4, max_tokens=3, priority=0, name="a", arrival=3.0)
    sim.add(2, max_tokens=3, priority=5, name="b", arrival=1.0)
    sim.add(2, max_tokens=3, priority=1, name="c", arrival=2.0)
    assert scheduled(sim.step()) == [("b", 2), ("c", 2), ("a", 4)]
    out = sim.step()
    assert names(out.preempted) == ["a"]
    assert scheduled(out) == [("b", 1), ("c", 1)]
    assert a.num_preemptions == 1 and sim.bm.num_free_blocks == 1
    sim.run()
    sim.assert_all_done()


def test_preemption_evicts_several_victims_until_the_request_fits():
    sim = Sim(num_blocks=4, block_size=4, budget=64, policy="fcfs")
    a = sim.add(4, max_tokens=6, name="a")
    sim.step()
    a_first_block = list(a.block_table)
    assert sim.bm.num_free_blocks == 3
    others = [sim.add(2, max_tokens=8) for _ in range(3)]
    sim.step()  # a decodes into its 2nd block; the three small ones take the other 2...
    assert len(a.block_table) == 2 and a.block_table[:1] == a_first_block
    assert names(sim.sched.running) == ["a", "r1", "r2"]
    assert names(sim.sched.waiting) == ["r3"]
    while not a.is_finished:
        out = sim.step()
        if out.preempted:
            # victims are always the latest arrivals, never a
            assert all(s is not a for s in out.preempted)
    sim.run()
    sim.assert_all_done()
    assert a.num_preemptions == 0
    assert sum(s.num_preemptions for s in others) >= 1


def test_preempted_sequence_resumes_and_finishes_with_all_tokens():
    sim = Sim(num_blocks=6, block_size=2, budget=16, policy="fcfs")
    seqs = [sim.add(3, max_tokens=8) for _ in range(4)]
    sim.run(max_steps=500)
    sim.assert_all_done()  # checks every sequence has exactly its 8 tokens, in order
    assert sim.num_preempted >= 1
    assert any(s.num_preemptions for s in seqs)


def test_preempted_chunked_prefill_restarts_from_zero():
    sim = Sim(num_blocks=5, block_size=4, budget=8, chunked=True)
    a = sim.add(4, max_tokens=12, name="a")
    sim.step()
    b = sim.add(16, max_tokens=2, name="b")
    assert scheduled(sim.step()) == [("a", 1), ("b", 7)]
    assert b.num_computed_tokens == 7 and len(b.block_table) == 2
    # b's next chunk needs 2 more blocks, only 1 is free: b is the latest, so it yields
    out = sim.step()
    assert scheduled(out) == [("a", 1)] and out.preempted == [b]
    assert b.num_computed_tokens == 0 and b.block_table == [] and b.output_token_ids == []
    assert sim.bm.num_used_blocks == len(a.block_table) == 2
    sim.run()
    sim.assert_all_done()
    assert a.num_preemptions == 0


# ---- abort -------------------------------------------------------------------------


def test_abort_frees_blocks_of_running_and_waiting_sequences():
    sim = Sim(num_blocks=8, block_size=4, budget=64, max_num_seqs=2)
    a = sim.add(8, max_tokens=10, name="a")
    b = sim.add(5, max_tokens=10, name="b")
    c = sim.add(3, max_tokens=2, name="c")
    sim.step()
    assert sim.bm.num_used_blocks == 2 + 2
    sim.abort(a)
    assert a.is_finished and a.block_table == []
    assert sim.bm.num_used_blocks == 2
    assert names(sim.sched.running) == ["b"]
    sim.abort(c)  # still waiting
    assert c.is_finished and names(sim.sched.waiting) == []
    sim.abort(c)  # aborting twice is harmless
    sim.abort(a)
    assert sim.bm.num_used_blocks == 2
    sim.run()
    sim.assert_all_done()
    assert len(b.output_token_ids) == 10 and a.output_token_ids == [fake_token(a, 0)]


def test_abort_a_preempted_sequence():
    sim = Sim(num_blocks=3, block_size=4, budget=64)
    sim.add(4, max_tokens=3, name="a")
    sim.add(2, max_tokens=3, name="b")
    c = sim.add(2, max_tokens=3, name="c")
    sim.step()
    out = sim.step()
    assert out.preempted == [c]
    sim.abort(c)
    assert c.is_finished and c not in sim.sched.waiting
    sim.run()
    sim.assert_all_done()


def test_finish_frees_blocks():
    sim = Sim(num_blocks=4, block_size=4)
    a = sim.add(7, max_tokens=100, name="a")
    sim.step()
    assert sim.bm.num_used_blocks == 2
    sim.sched.finish(a)
    assert a.is_finished and a.block_table == [] and sim.bm.num_used_blocks == 0
    assert not sim.sched.has_unfinished()


# ---- randomized: no leak, no livelock ----------------------------------------------

CONFIGS = [
    # (seed, num_blocks, block_size, budget, max_num_seqs, chunked, policy)
    (0, 8, 4, 16, 8, True, "fcfs"),
    (1, 8, 4, 16, 8, True, "priority"),
    (2, 6, 2, 7, 4, True, "fcfs"),
    (3, 10, 4, 32, 64, False, "fcfs"),
    (4, 10, 4, 32, 64, False, "priority"),
    (5, 12, 2, 5, 3, True, "priority"),
    (6, 9, 4, 12, 16, False, "fcfs"),  # prompts longer than the budget, chunking off
    (7, 16, 1, 3, 64, True, "fcfs"),
    (8, 7, 8, 64, 2, True, "priority"),
    (9, 5, 8, 40, 64, False, "priority"),
]


@pytest.mark.parametrize("seed, num_blocks, block_size, budget, max_num_seqs, chunked, policy",
                         CONFIGS)
def test_random_workload_finishes_everything_without_leaks(
    seed, num_blocks, block_size, budget, max_num_seqs, chunked, policy
):
    rng = random.Random(seed)
    sim = Sim(num_blocks, block_size, budget, max_num_seqs, chunked, policy)
    capacity = num_blocks * block_size

    def add_random():
        # each request fits the pool alone: it computes at most prompt + max_tokens - 1
        prompt = rng.randint(1, min(30, capacity - 1))
        max_tokens = rng.randint(1, min(20, capacity - prompt + 1))
        sim.add(prompt, max_tokens=max_tokens, priority=rng.randint(0, 3))

    for _ in range(10):
        add_random()
    pending = 70
    while sim.sched.has_unfinished() or pending:
        if pending and rng.random() < 0.4:
            for _ in range(min(pending, rng.randint(1, 3))):
                add_random()
                pending -= 1
        if rng.random() < 0.02:
            live = sim.sched.running + sim.sched.waiting
            if live:
                sim.abort(rng.choice(live))
        if sim.sched.has_unfinished():
            out = sim.step()
            assert not (out.is_empty and not out.preempted), "idle step with work left"
        assert sim.steps < 20_000, "livelock"
    sim.assert_all_done()
    assert len(sim.finished) + len(sim.aborted) == len(sim.seqs)
    assert sim.num_preempted > 0, "config too roomy to exercise preemption"


@pytest.mark.parametrize("chunked", [True, False])
@pytest.mark.parametrize("policy", ["fcfs", "priority"])
def test_every_request_finishes_when_the_pool_fits_only_the_largest(chunked, policy):
    rng = random.Random(42)
    block_size = 4
    reqs = [(rng.randint(1, 24), rng.randint(1, 16)) for _ in range(30)]
    largest = max(p + m - 1 for p, m in reqs)
    num_blocks = -(-largest // block_size)
    sim = Sim(num_blocks, block_size, budget=16, chunked=chunked, policy=policy)
    for i, (p, m) in enumerate(reqs):
        sim.add(p, max_tokens=m, priority=i % 4)
    sim.run(max_steps=5_000)
    sim.assert_all_done()
    assert sim.num_preempted > 0


def test_a_request_filling_the_whole_pool_finishes_among_others():
    sim = Sim(num_blocks=4, block_size=4, budget=8)
    sim.add(3, max_tokens=6)
    big = sim.add(10, max_tokens=7, name="big")  # 16 computed tokens = the whole pool
    sim.add(2, max_tokens=6)
    sim.run(max_steps=200)
    sim.assert_all_done()
    assert len(big.output_token_ids) == 7
