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
from sparsa.spec import tree
from sparsa.spec.dynamic import SpecController
from sparsa.spec.proposers import make_proposer


class Speculation:
    def __init__(self, config: SpeculativeConfig, engine: Any):
        self.config = config
        self.proposer = make_proposer(config, engine)
        # a token tree's shape (rank paths), or None for chains
        self.shape = [tuple(p) for p in config.token_tree] if config.token_tree else None
        self.control = SpecController(config.num_speculative_tokens) if config.adaptive \
            else None
        # proposers that read the target's hidden states (Medusa, EAGLE) take them here;
        # those that read every position's (EAGLE) get the prompt's too
        self._note_hidden = getattr(self.proposer, "note_hidden", None)
        engine.runner.keep_prompt_hidden = bool(getattr(self.proposer, "wants_prompt_hidden",
                                                        False))
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
        if not seqs:
            return
        if self.shape is not None:
            for seq, k, (toks, parents) in zip(seqs, limits,
                                               self.proposer.propose_tree(seqs, self.shape)):
                toks, parents = tree.prune(toks, parents, k)
                seq.set_proposals(toks, None if tree.is_chain(parents) else parents)
            return
        for seq, k, toks in zip(seqs, limits, self.proposer.propose(seqs, limits)):
            seq.set_proposals(list(toks[:k]))

    @property
    def wants_hidden(self) -> bool:
        return self._note_hidden is not None

    def note_hidden(self, seq: Sequence, hidden: Any, first_pos: int) -> None:
        """Final hidden states [r, H] of `seq` at positions first_pos .. first_pos + r - 1
        (the state at p is the one whose LM head scores token p + 1), for proposers that
        read them. Positions come in order; a repeated one (recomputation after a
        preemption) replaces what the proposer had from there on."""
        if self._note_hidden is not None and not seq.is_finished:
            self._note_hidden(seq.seq_id, hidden, first_pos)

    def timed_step(self, sched: SchedulerOutput, started: float) -> None:
        """After a forward pass: count it, and time it when it was all decode rows."""
        self.stats["passes"] += 1
        if self.control is not None and all(it.num_new_tokens == 1 or it.num_verified
                                            for it in sched.scheduled):
            self.control.observe_step(sched.num_tokens, time.perf_counter() - started)

    @staticmethod
    def row_context(seq: Sequence, row: int) -> list[int]:
        """The proposals a verifying sequence's row `row` comes after (row 0: none): the
        first `row` of a chain, or the path to node row - 1 of a tree."""
        if seq.spec_parents is None:
            return seq.spec_token_ids[:row]
        return [seq.spec_token_ids[n] for n in tree.path_to(seq.spec_parents, row - 1)]

    def judge(self, seq: Sequence, sampled: list[int]) -> list[int]:
        """Which of `seq`'s proposals hold, given the target's token at each of its rows
        (row 0 after the last token, row 1 + i after proposal i): the accepted nodes, in
        order. The target's tokens are sampled as usual; a proposal is accepted when it
        equals the target's token at its parent, then the target's own token follows. For
        deterministic proposals (n-gram, greedy drafts and heads, chains or trees) this is
        the rejection-sampling rule (accept with p/q, q one-hot; else draw from the
        residual), so the output follows the target's distribution exactly, and equals
        plain greedy decoding at T=0."""
        drafts = seq.spec_token_ids
        if seq.spec_parents is None:
            m = 0
            while m < len(drafts) and sampled[m] == drafts[m]:
                m += 1
            path = list(range(m))
        else:
            path = tree.walk(drafts, seq.spec_parents, sampled)
        self.stats["proposed"] += len(drafts)
        self.stats["accepted"] += len(path)
        self.stats["verify_steps"] += 1
        if self.control is not None:
            self.control.observe_verify(seq.seq_id, len(drafts), len(path))
        return path

    @staticmethod
    def chain_path(seq: Sequence, path: list[int], runner: Any) -> None:
        """A token tree's accepted path becomes the chain plain decoding would have made:
        its nodes' K/V move (in `runner`'s pools) to the slots after the last token, and its
        tokens lead the proposals (the scheduler keeps the first len(path) of them)."""
        root = seq.num_computed_tokens  # the last sampled token's slot; node i is in root+1+i
        moved = [(root + 1 + n, root + 1 + d) for d, n in enumerate(path) if n != d]
        if moved:
            runner.move_kv(seq, [a for a, _ in moved], [b for _, b in moved])
        toks = seq.spec_token_ids
        chosen = set(path)
        seq.set_proposals([toks[n] for n in path]
                          + [t for n, t in enumerate(toks) if n not in chosen])
