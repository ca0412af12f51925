"""What a proposer is: for each sequence, up to k guessed next tokens."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Collection
from collections.abc import Sequence as Seq

from sparsa.core.sequence import Sequence


class Proposer(ABC):
    """Guesses the tokens after each sequence's last one. A guess costs little next to a
    target pass; wrong guesses cost only their share of the verifying pass."""

    @abstractmethod
    def propose(self, seqs: Seq[Sequence], max_tokens: Seq[int]) -> list[list[int]]:
        """Up to max_tokens[i] proposals for seqs[i] (fewer, or none, when unsure)."""

    def retain(self, seq_ids: Collection[int]) -> None:
        """Forget any state of sequences not among `seq_ids` (the running ones)."""
        return None  # a stateless proposer keeps nothing
