"""The proposer a speculative config asks for."""

from __future__ import annotations

from sparsa.config.speculative import SpeculativeConfig
from sparsa.spec.base import Proposer
from sparsa.spec.ngram import NgramProposer


def make_proposer(config: SpeculativeConfig) -> Proposer:
    if config.method == "ngram":
        return NgramProposer(config.prompt_lookup_min, config.prompt_lookup_max)
    raise ValueError(f"no proposer for speculative method {config.method!r}")
