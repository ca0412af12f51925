"""Sparsa: an inference engine for Mixture-of-Experts and dense LLMs."""

from sparsa.outputs import CompletionOutput, RequestOutput
from sparsa.sampling_params import SamplingParams

__version__ = "0.1.0"


def __getattr__(name: str):
    # Importing LLM pulls in torch and transformers; keep `import sparsa` cheap otherwise.
    if name == "LLM":
        from sparsa.llm import LLM

        return LLM
    raise AttributeError(name)


__all__ = ["LLM", "CompletionOutput", "RequestOutput", "SamplingParams"]
