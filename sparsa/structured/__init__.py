"""Structured output: generation held to a JSON schema, a regex, a list of choices or a
grammar, by masking the logits of every step with what the grammar engine (llguidance,
the one vLLM and llama.cpp use) allows next.

`GuidedDecoding` is the request's constraint (vLLM's `GuidedDecodingParams`), set as
`SamplingParams(guided_decoding=...)`; `Guides` holds the engine's tokenizer view and one
matcher per constrained sequence.
"""

from sparsa.structured.guided import GuidedDecoding
from sparsa.structured.matcher import Guides

__all__ = ["GuidedDecoding", "Guides"]
