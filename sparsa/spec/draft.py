"""Draft-model proposals: a smaller model with the target's vocabulary runs k greedy steps
for every speculating sequence at once, with its own paged KV cache. Each sequence has a
mirror here (the target's tokens as its prompt, its own proposals as output); when the
target rejects proposals, the mirror keeps the K/V of the tokens both agree on and
recomputes from there."""

from __future__ import annotations

import logging
from collections.abc import Collection
from collections.abc import Sequence as Seq

import torch

from sparsa.config import CacheConfig, ModelConfig
from sparsa.config.speculative import SpeculativeConfig
from sparsa.core.block_manager import BlockManager
from sparsa.core.scheduler import ScheduledSequence, SchedulerOutput
from sparsa.core.sequence import Sequence
from sparsa.spec.base import Proposer

log = logging.getLogger(__name__)


class _Mirror:
    def __init__(self, tokens: list[int]):
        self.seq = Sequence("draft", list(tokens))
        self.synced = len(tokens)  # tokens known equal to the target's


class DraftModelProposer(Proposer):
    """Proposals from `model` (any DecoderForCausalLM-like module with the target's
    vocabulary), greedy, with its own KV pool of `num_blocks` blocks."""

    def __init__(self, model, dtype: torch.dtype, device: torch.device, block_size: int,
                 num_blocks: int, max_len: int, name: str = "draft"):
        from sparsa.engine.model_runner import ModelRunner

        self.model = model
        self.max_len = max_len
        self.runner = ModelRunner(model, device, dtype,
                                  CacheConfig(block_size=block_size, num_blocks=num_blocks),
                                  max_len)
        self.blocks = BlockManager(num_blocks, block_size)
        self.mirrors: dict[int, _Mirror] = {}
        log.info("%s: %s, %d KV blocks", name, dtype, num_blocks)

    @classmethod
    def load(cls, config: SpeculativeConfig, device: torch.device, target_vocab: int,
             block_size: int, num_blocks: int, max_model_len: int) -> DraftModelProposer:
        """The draft `config.model`, loaded (in `config.quantization`'s form)."""
        from sparsa.loader.model_loader import load_model

        mc = ModelConfig(config.model, quantization=config.quantization,
                         max_model_len=max_model_len)
        model, resolved, dtype = load_model(mc, device)
        vocab = resolved.hf_config.vocab_size
        if vocab != target_vocab:
            raise ValueError(f"draft model {config.model} has a vocabulary of {vocab} tokens "
                             f"and the target {target_vocab}: a draft must share the "
                             "target's tokenizer")
        draft_len = getattr(resolved.hf_config, "max_position_embeddings", None) or max_model_len
        return cls(model, dtype, device, block_size, num_blocks,
                   min(draft_len, max_model_len), f"draft model {config.model}")

    def retain(self, seq_ids: Collection[int]) -> None:
        for sid in [s for s in self.mirrors if s not in seq_ids]:
            self.blocks.free(self.mirrors.pop(sid).seq)

    def _sync(self, target: Sequence) -> Sequence | None:
        tokens = target.all_token_ids
        if len(tokens) >= self.max_len:
            return None
        m = self.mirrors.get(target.seq_id)
        if m is None:
            m = self.mirrors[target.seq_id] = _Mirror(tokens)
            return m.seq
        d = m.seq
        mine = d.all_token_ids
        same = m.synced
        while same < min(len(mine), len(tokens)) and mine[same] == tokens[same]:
            same += 1
        d.prompt_token_ids, d.output_token_ids = list(tokens), []
        # keep the K/V both agree on; the last token is always run again for its logits
        d.num_computed_tokens = min(d.num_computed_tokens, same, len(tokens) - 1)
        self.blocks.trim(d)
        m.synced = len(tokens)
        return d

    @torch.inference_mode()
    def propose(self, seqs: Seq[Sequence], max_tokens: Seq[int]) -> list[list[int]]:
        drafts = [self._sync(s) for s in seqs]
        out: list[list[int]] = [[] for _ in seqs]
        active = [i for i, d in enumerate(drafts) if d is not None]
        for step in range(max(max_tokens, default=0)):
            sched, rows = SchedulerOutput(), {}
            for i in active:
                d = drafts[i]
                n = d.num_uncomputed_tokens
                if (step >= max_tokens[i] or d.num_tokens >= self.max_len
                        or not self.blocks.can_allocate(d, n)):
                    continue
                self.blocks.allocate(d, n)
                sched.scheduled.append(ScheduledSequence(d, n))
                rows[id(d)] = i
            if not sched.scheduled:
                break
            result = self.runner.execute(sched)
            picks = result.logits.argmax(dim=-1).tolist()
            for item in sched.scheduled:
                item.seq.num_computed_tokens += item.num_new_tokens
            for d, tok in zip(result.sampled, picks):
                d.output_token_ids.append(tok)
                out[rows[id(d)]].append(tok)
            active = [rows[id(it.seq)] for it in sched.scheduled]
        return out
