"""Per-request sampling parameters (field names and semantics follow vLLM)."""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from numbers import Integral, Real
from typing import Any

# Below this temperature a request is treated as greedy; dividing logits by a
# near-zero temperature would only overflow to inf/nan.
_GREEDY_EPS = 1e-5
_MAX_LOGPROBS = 20
# torch.Generator.manual_seed accepts exactly this range.
_SEED_MIN = -(2**63)
_SEED_MAX = 2**64 - 1


class SamplingType(enum.IntEnum):
    """How a request's tokens are drawn: argmax, from the shared generator, or seeded."""

    GREEDY = 0
    RANDOM = 1
    RANDOM_SEED = 2


def _is_int(value: Any) -> bool:
    # bool is a subclass of int, but n=True is almost certainly a caller bug.
    return isinstance(value, Integral) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool)


def _type_name(value: Any) -> str:
    return type(value).__name__


@dataclass
class SamplingParams:
    """Sampling parameters of one request.

    Attributes:
        n: number of completions to return for the prompt.
        temperature: softmax temperature; values below 1e-5 (including 0) mean greedy.
        top_p: nucleus sampling; keep the smallest set of tokens whose probability
            mass reaches ``top_p``. 1.0 disables it.
        top_k: keep only the ``top_k`` most likely tokens; 0 or -1 disables it.
        min_p: drop tokens whose probability is below ``min_p`` times the probability
            of the most likely token. 0.0 disables it.
        repetition_penalty: HF/vLLM style; logits of tokens seen in the prompt or the
            output are divided by it when positive and multiplied when negative.
        presence_penalty: subtracted once from the logit of every token that already
            occurs in the output.
        frequency_penalty: subtracted from a token's logit once per occurrence in
            the output.
        seed: seed of the request's private random generator; None uses the global RNG.
        stop: strings that end generation (normalized to a list).
        stop_token_ids: token ids that end generation (normalized to a list).
        max_tokens: maximum number of generated tokens; None means until the
            context window is full.
        min_tokens: EOS and ``stop_token_ids`` are masked until this many tokens
            have been generated.
        ignore_eos: keep generating after EOS.
        logprobs: number of top log-probabilities to return per position besides
            the chosen token; None returns none.
        prompt_logprobs: number of top log-probabilities to return per prompt position
            besides the prompt's own token (0: just that token's); None returns none. The
            prompt is then computed in full (no prefix-cache hits), to have its logits.
        skip_special_tokens: drop special tokens when detokenizing.
        include_stop_str_in_output: keep the matched stop string in the output text.
        guided_decoding: hold the output to a JSON schema, JSON object, regex, choice
            list or grammar (`sparsa.structured.GuidedDecoding`, or a dict of its fields).
        speculate: with an engine built with `speculative_config`, False keeps this
            request on plain decoding (its outputs are the same either way).
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    max_tokens: int | None = 16
    min_tokens: int = 0
    ignore_eos: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    # structured output: a `sparsa.structured.GuidedDecoding` or a dict of its fields
    # (json / json_object / regex / choice / grammar); None generates freely
    guided_decoding: Any = None
    speculate: bool = True

    def __post_init__(self) -> None:
        self._normalize_types()
        self._verify_ranges()
        if self.guided_decoding is not None:
            from sparsa.structured.guided import GuidedDecoding

            self.guided_decoding = GuidedDecoding.from_value(self.guided_decoding)

    def _normalize_types(self) -> None:
        for name in ("n", "top_k", "min_tokens"):
            value = getattr(self, name)
            if not _is_int(value):
                raise ValueError(f"{name} must be an int, got {value!r} ({_type_name(value)}).")
            setattr(self, name, int(value))
        for name in ("max_tokens", "logprobs", "prompt_logprobs", "seed"):
            value = getattr(self, name)
            if value is not None:
                if not _is_int(value):
                    raise ValueError(
                        f"{name} must be an int or None, got {value!r} ({_type_name(value)})."
                    )
                setattr(self, name, int(value))
        for name in (
            "temperature",
            "top_p",
            "min_p",
            "repetition_penalty",
            "presence_penalty",
            "frequency_penalty",
        ):
            value = getattr(self, name)
            if not _is_real(value):
                raise ValueError(f"{name} must be a number, got {value!r} ({_type_name(value)}).")
            value = float(value)
            if not math.isfinite(value):
                raise ValueError(f"{name} must be finite, got {value}.")
            setattr(self, name, value)
        for name in ("ignore_eos", "skip_special_tokens", "include_stop_str_in_output",
                     "speculate"):
            value = getattr(self, name)
            if not isinstance(value, bool):
                raise ValueError(f"{name} must be a bool, got {value!r} ({_type_name(value)}).")

        stop = self.stop
        if stop is None:
            stop = []
        elif isinstance(stop, str):
            stop = [stop]
        elif isinstance(stop, (list, tuple)):
            stop = list(stop)
        else:
            raise ValueError(f"stop must be a str, a list of str or None, got {_type_name(stop)}.")
        for s in stop:
            if not isinstance(s, str):
                raise ValueError(f"stop must contain only strings, got {s!r} ({_type_name(s)}).")
            if not s:
                raise ValueError("stop must not contain empty strings.")
        self.stop = stop

        ids = self.stop_token_ids
        if ids is None:
            ids = []
        elif isinstance(ids, (list, tuple)):
            ids = list(ids)
        else:
            raise ValueError(
                f"stop_token_ids must be a list of int or None, got {_type_name(ids)}."
            )
        for i in ids:
            if not _is_int(i):
                raise ValueError(
                    f"stop_token_ids must contain only ints, got {i!r} ({_type_name(i)})."
                )
            if i < 0:
                raise ValueError(f"stop_token_ids must be non-negative, got {i}.")
        self.stop_token_ids = [int(i) for i in ids]

    def _verify_ranges(self) -> None:
        if self.n < 1:
            raise ValueError(f"n must be at least 1, got {self.n}.")
        if self.temperature < 0.0:
            raise ValueError(f"temperature must be non-negative, got {self.temperature}.")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}.")
        if self.top_k < -1:
            raise ValueError(f"top_k must be 0 or -1 (disabled) or at least 1, got {self.top_k}.")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}.")
        if self.repetition_penalty <= 0.0:
            raise ValueError(
                f"repetition_penalty must be greater than 0, got {self.repetition_penalty}."
            )
        if not -2.0 <= self.presence_penalty <= 2.0:
            raise ValueError(f"presence_penalty must be in [-2, 2], got {self.presence_penalty}.")
        if not -2.0 <= self.frequency_penalty <= 2.0:
            raise ValueError(f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}.")
        if self.seed is not None and not _SEED_MIN <= self.seed <= _SEED_MAX:
            raise ValueError(f"seed must be in [-2**63, 2**64 - 1], got {self.seed}.")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1 or None, got {self.max_tokens}.")
        if self.min_tokens < 0:
            raise ValueError(f"min_tokens must be non-negative, got {self.min_tokens}.")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(
                f"min_tokens must be at most max_tokens ({self.max_tokens}), got {self.min_tokens}."
            )
        if self.logprobs is not None and not 0 <= self.logprobs <= _MAX_LOGPROBS:
            raise ValueError(
                f"logprobs must be in [0, {_MAX_LOGPROBS}] or None, got {self.logprobs}."
            )
        if self.prompt_logprobs is not None and not 0 <= self.prompt_logprobs <= _MAX_LOGPROBS:
            raise ValueError(f"prompt_logprobs must be in [0, {_MAX_LOGPROBS}] or None, "
                             f"got {self.prompt_logprobs}.")
        if self.is_greedy and self.n > 1:
            # All n greedy completions would be identical.
            raise ValueError(f"n must be 1 when using greedy sampling, got {self.n}.")

    @property
    def is_greedy(self) -> bool:
        """Temperature (near) zero: argmax."""
        return self.temperature < _GREEDY_EPS

    @property
    def sampling_type(self) -> SamplingType:
        """Greedy, random, or random with this request's own seed."""
        if self.is_greedy:
            return SamplingType.GREEDY
        if self.seed is not None:
            return SamplingType.RANDOM_SEED
        return SamplingType.RANDOM

    @property
    def top_k_enabled(self) -> bool:
        """Whether top-k filtering applies (top_k > 0)."""
        return self.top_k > 0

    @property
    def has_penalties(self) -> bool:
        """Whether any repetition/presence/frequency penalty changes the logits."""
        return (
            self.repetition_penalty != 1.0
            or self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
        )
