"""Request outputs with vLLM's shape."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class CompletionOutput:
    """One sample of a request: its text, token ids, logprobs and why it finished."""

    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None = None
    # per generated token: {token_id: logprob} with the chosen token and the top-N
    logprobs: list[dict[int, float]] | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    stop_reason: int | str | None = None

    def finished(self) -> bool:
        """Whether this sample is done (it has a finish reason)."""
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    """A request's prompt and its samples (`outputs`, one per `n`), cumulative as it runs;
    `metrics` holds arrival, first-token and finish times and cached prompt tokens."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)
    finished: bool = False
    metrics: dict[str, float] = field(default_factory=dict)
    # with SamplingParams.prompt_logprobs: per prompt position {token_id: logprob} with the
    # prompt's own token and the top-k (None at position 0), and that token's rank
    prompt_logprobs: list[dict[int, float] | None] | None = None
    prompt_logprob_ranks: list[int | None] | None = None
