"""A request-level cascade (FrugalGPT style): a small model answers first, and a request
escalates to the large model when the small model's confidence in its own answer (the
geometric mean probability of the tokens it chose) is below a threshold. Lossy by design:
`sparsa bench cascade` reports the escalation rate, the time, and the quality cost
(agreement with the large model's own answers, the large model's perplexity of the
answers given)."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

from sparsa.outputs import RequestOutput
from sparsa.sampling_params import SamplingParams


def confidence(out: RequestOutput) -> float:
    """Geometric mean probability of the chosen tokens of the first sample (1.0 for an
    empty answer)."""
    c = out.outputs[0]
    lps = [e[t] for e, t in zip(c.logprobs or [], c.token_ids) if e and t in e]
    return math.exp(sum(lps) / len(lps)) if lps else 1.0


@dataclass
class CascadeOutput:
    outputs: list[RequestOutput]  # the answer given for each prompt
    escalated: list[bool]  # whether the large model gave it
    confidences: list[float]  # the small model's confidence in its own answer


class Cascade:
    """`Cascade(small, large, threshold)`: two `LLM`s sharing a tokenizer; threshold 0
    never escalates, above 1 always does."""

    def __init__(self, small: Any, large: Any, threshold: float):
        if not 0.0 <= threshold <= 1.0 + 1e-9 and threshold != math.inf:
            raise ValueError(f"threshold must be in [0, 1] (or inf); got {threshold}")
        vs, vl = small.engine.hf_config.vocab_size, large.engine.hf_config.vocab_size
        if vs != vl:
            raise ValueError(f"the small model's vocabulary ({vs}) differs from the large "
                             f"one's ({vl}): a cascade needs one tokenizer")
        self.small, self.large, self.threshold = small, large, threshold

    def generate(self, prompts: list, params: SamplingParams | None = None) -> CascadeOutput:
        params = params or SamplingParams()
        asked = replace(params, logprobs=params.logprobs or 0)  # the small one's confidence
        first = self.small.generate(prompts, asked)
        conf = [confidence(o) for o in first]
        esc = [c < self.threshold for c in conf]
        redo = [p for p, e in zip(prompts, esc) if e]
        again = iter(self.large.generate(redo, params) if redo else [])
        if params.logprobs is None:  # asked for the confidence only, not for the caller
            for o in first:
                for c in o.outputs:
                    c.logprobs, c.cumulative_logprob = None, None
        outs = [next(again) if e else o for o, e in zip(first, esc)]
        return CascadeOutput(outs, esc, conf)
