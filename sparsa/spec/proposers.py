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
        return DraftModelProposer(config, engine.device, engine.hf_config.vocab_size,
                                  runner.block_size, runner.num_blocks, engine.max_model_len)
    raise ValueError(f"no proposer for speculative method {config.method!r}")
