"""The proposer a speculative config asks for."""

from __future__ import annotations

from sparsa.config.speculative import SpeculativeConfig
from sparsa.spec.base import Proposer
from sparsa.spec.ngram import NgramProposer


def make_proposer(config: SpeculativeConfig, engine) -> Proposer:
    """The proposer for `config`, beside the target `engine` (LLMEngine) it drafts for."""
    if config.method == "ngram":
        return NgramProposer(config.prompt_lookup_min, config.prompt_lookup_max)
    if config.method == "draft_model":
        from sparsa.spec.draft import DraftModelProposer

        runner = engine.runner
        return DraftModelProposer.load(config, engine.device, engine.hf_config.vocab_size,
                                       runner.block_size, _draft_blocks(config, engine),
                                       engine.max_model_len)
    if config.method == "medusa":
        from sparsa.spec.medusa import MedusaProposer

        hc = engine.hf_config
        medusa = MedusaProposer(config.model, engine.model, hc.hidden_size, hc.vocab_size,
                                engine.dtype)
        deepest = max((len(p) for p in config.token_tree or ()), default=0)
        if deepest > medusa.num_heads:
            raise ValueError(f"speculative_config token_tree is {deepest} deep; the Medusa "
                             f"heads in {config.model} guess {medusa.num_heads} positions")
        return medusa
    if config.method == "eagle":
        from sparsa.spec.eagle import EagleProposer

        hc = engine.hf_config
        return EagleProposer(config.model, engine.model, hc.hidden_size, hc.vocab_size,
                             engine.dtype, engine.device)
    if config.method == "self":
        from sparsa.spec.draft import DraftModelProposer
        from sparsa.spec.self_draft import cheaper_copy

        runner = engine.runner
        model = cheaper_copy(engine.model, config.draft_top_k, config.draft_layers)
        return DraftModelProposer(model, engine.dtype, engine.device, runner.block_size,
                                  _draft_blocks(config, engine), engine.max_model_len,
                                  f"self-draft (top-{config.draft_top_k} routing, "
                                  f"{config.draft_layers or 'all'} layers)")
    raise ValueError(f"no proposer for speculative method {config.method!r}")


def _draft_blocks(config: SpeculativeConfig, engine) -> int:
    """The draft's KV pool: as many blocks as the sequences that can speculate at once
    (below disable_by_batch_size, at most max_num_seqs) need for a whole context, never
    more than the target's pool (a self-draft's K/V are as large as the target's)."""
    runner = engine.runner
    seqs = engine.config.scheduler.max_num_seqs
    if config.disable_by_batch_size is not None:
        seqs = min(seqs, config.disable_by_batch_size - 1)
    per_seq = -(-engine.max_model_len // runner.block_size)
    return max(1, min(runner.num_blocks, max(seqs, 1) * per_seq))
