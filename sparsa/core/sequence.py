"""A sequence: one sample of one request, with its tokens, progress and KV blocks."""

from __future__ import annotations

import enum
import itertools
import time
from dataclasses import dataclass, field
from typing import Any


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


_seq_counter = itertools.count()


@dataclass(eq=False)
class Sequence:
    request_id: str
    prompt_token_ids: list[int]
    params: Any = None  # SamplingParams; kept untyped so core/ stays free of model code
    priority: int = 0
    arrival_time: float = field(default_factory=time.monotonic)
    index: int = 0  # which of the request's n samples this is
    seq_id: int = field(default_factory=lambda: next(_seq_counter))
    output_token_ids: list[int] = field(default_factory=list)
    status: SequenceStatus = SequenceStatus.WAITING
    num_computed_tokens: int = 0  # tokens whose K/V are in the cache
    block_table: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    num_preemptions: int = 0
    # prefix caching: chain hashes of the full blocks seen so far (tokens never change, so
    # they are computed once), how many leading blocks are registered in the cache, and
    # how many prompt tokens the last admission found cached
    block_hashes: list[bytes] = field(default_factory=list, repr=False)
    num_registered_blocks: int = 0
    num_cached_tokens: int = 0
    # the logits of every prompt position are wanted (prompt logprobs): the prompt is
    # computed, not taken from the prefix cache, until they have been read
    needs_prompt_logits: bool = False
    # speculative decoding: proposed next tokens, computed (and verified) in the next step
    # after the last sampled token; they are not output until the target accepts them
    spec_token_ids: list[int] = field(default_factory=list)
    # a token tree's parents (index into spec_token_ids, -1: the last sampled token), in
    # topological order; None: the proposals are a chain
    spec_parents: list[int] | None = None

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_uncomputed_tokens(self) -> int:
        """Tokens the next steps must compute, proposed ones included."""
        return self.num_tokens + len(self.spec_token_ids) - self.num_computed_tokens

    def set_proposals(self, tokens: list[int], parents: list[int] | None = None) -> None:
        self.spec_token_ids = tokens
        self.spec_parents = parents

    def clear_proposals(self) -> None:
        self.spec_token_ids = []
        self.spec_parents = None

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED

    def token_at(self, i: int) -> int:
        p = len(self.prompt_token_ids)
        if i < p:
            return self.prompt_token_ids[i]
        i -= p
        out = self.output_token_ids
        return out[i] if i < len(out) else self.spec_token_ids[i - len(out)]
