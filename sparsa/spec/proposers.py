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
                                       runner.block_size, runner.num_blocks,
                                       engine.max_model_len)
    if config.method == "medusa":
        from sparsa.spec.medusa import MedusaProposer

        hc = engine.hf_config
        return MedusaProposer(config.model, engine.model, hc.hidden_size, hc.vocab_size,
                              engine.dtype)
    if config.method == "self":
        from sparsa.spec.draft import DraftModelProposer
        from sparsa.spec.self_draft import cheaper_copy

        runner = engine.runner
        model = cheaper_copy(engine.model, config.draft_top_k, config.draft_layers)
        return DraftModelProposer(model, engine.dtype, engine.device, runner.block_size,
                                  runner.num_blocks, engine.max_model_len,
                                  f"self-draft (top-{config.draft_top_k} routing, "
                                  f"{config.draft_layers or 'all'} layers)")
    raise ValueError(f"no proposer for speculative method {config.method!r}")
