"""Per-sequence grammar state: a bitmask of allowed tokens before each sample, the sampled
token fed back after."""

from __future__ import annotations

from typing import Any

import torch

from sparsa.structured.guided import GuidedDecoding


class Guides:
    """The engine's constrained sequences (seq_id -> llguidance matcher), over one
    tokenizer (its llguidance view is built on first use: ~0.3 s for 49k tokens)."""

    def __init__(self, tokenizer: Any, vocab_size: int, eos_ids: list[int] | None = None):
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.eos_ids = eos_ids or None
        self._ll: Any = None
        self.matchers: dict[int, Any] = {}

    def _ll_tokenizer(self) -> Any:
        if self._ll is None:
            import llguidance.hf

            self._ll = llguidance.hf.from_tokenizer(self.tokenizer, n_vocab=self.vocab_size,
                                                    eos_token=self.eos_ids)
        return self._ll

    def add(self, seq_id: int, guide: GuidedDecoding) -> None:
        import llguidance

        if self.tokenizer is None:
            raise ValueError("guided_decoding needs the model's tokenizer; this model has none")
        m = llguidance.LLMatcher(self._ll_tokenizer(), guide.grammar_text(), log_level=0)
        if m.is_error():
            raise ValueError(f"guided_decoding: {m.get_error()}")
        self.matchers[seq_id] = m

    def drop(self, seq_id: int) -> None:
        self.matchers.pop(seq_id, None)

    def mask(self, logits: torch.Tensor, seq_ids: list[int]) -> None:
        """Set to -inf, in place, the logits of tokens each constrained row's grammar does
        not allow next (rows of other sequences are left alone)."""
        import llguidance.torch as llt

        rows = [(i, self.matchers[s]) for i, s in enumerate(seq_ids) if s in self.matchers]
        if not rows:
            return
        bitmask = llt.allocate_token_bitmask(len(rows), self.vocab_size)
        for j, (_, m) in enumerate(rows):
            llt.fill_next_token_bitmask(m, bitmask, j)
        with torch.inference_mode():  # the runner's logits are inference tensors
            idx = torch.tensor([i for i, _ in rows], device=logits.device)
            sub = logits[idx].float()
            llt.apply_token_bitmask_inplace(sub, bitmask.to(sub.device))
            logits[idx] = sub.to(logits.dtype)

    def advance(self, seq_id: int, token: int) -> bool:
        """Feed the sampled token; True when the grammar is complete (the sequence ends)."""
        m = self.matchers.get(seq_id)
        if m is None:
            return False
        if not m.consume_token(token):
            raise RuntimeError(f"guided_decoding: token {token} refused ({m.get_error()})")
        return m.is_stopped()
