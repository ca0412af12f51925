"""Shaping engine outputs as OpenAI JSON: logprobs, usage, streamed deltas."""

from __future__ import annotations

import json
from typing import Any

from sparsa.outputs import CompletionOutput, RequestOutput


class TokenText:
    """Token id -> its text, memoized (logprobs ask for the same tokens over and over)."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self._cache: dict[int, str] = {}

    def __call__(self, tid: int) -> str:
        s = self._cache.get(tid)
        if s is None:
            if self.tokenizer is None:
                s = f"token_id:{tid}"
            else:
                s = self.tokenizer.decode([tid], skip_special_tokens=False)
            if len(self._cache) < 1_000_000:
                self._cache[tid] = s
        return s


def _top(entry: dict[int, float], chosen: int, k: int) -> list[tuple[int, float]]:
    """The engine's entry holds the chosen token plus the top-k; recover the top-k."""
    items = sorted(entry.items(), key=lambda kv: -kv[1])
    if len(items) > k:  # the chosen token was outside the top-k
        items = [kv for kv in items if kv[0] != chosen][:k]
    return items


def completion_logprobs(out: CompletionOutput, start: int, end: int, k: int, tt: TokenText,
                        text_offset: int) -> dict[str, Any]:
    """Legacy completions format for tokens [start, end) of one choice."""
    tokens, lps, tops, offsets = [], [], [], []
    off = text_offset
    for i in range(start, end):
        tid = out.token_ids[i]
        entry = out.logprobs[i] if out.logprobs else {tid: 0.0}
        s = tt(tid)
        tokens.append(s)
        lps.append(entry.get(tid))
        tops.append({tt(t): lp for t, lp in _top(entry, tid, k)} if k else None)
        offsets.append(off)
        off += len(s)
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops,
            "text_offset": offsets}


def chat_logprobs(out: CompletionOutput, start: int, end: int, k: int,
                  tt: TokenText) -> dict[str, Any]:
    content = []
    for i in range(start, end):
        tid = out.token_ids[i]
        entry = out.logprobs[i] if out.logprobs else {tid: 0.0}
        s = tt(tid)
        content.append({
            "token": s, "logprob": entry.get(tid), "bytes": list(s.encode()),
            "top_logprobs": [{"token": tt(t), "logprob": lp, "bytes": list(tt(t).encode())}
                             for t, lp in _top(entry, tid, k)],
        })
    return {"content": content}


def usage(outputs: list[RequestOutput]) -> dict[str, Any]:
    prompt = sum(len(o.prompt_token_ids) for o in outputs)
    completion = sum(len(c.token_ids) for o in outputs for c in o.outputs)
    cached = sum(int(o.metrics.get("num_cached_tokens", 0)) for o in outputs)
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


def sse(data: dict[str, Any] | str) -> str:
    body = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    return f"data: {body}\n\n"


class DeltaTracker:
    """What of one choice has been streamed. Text that could still turn out to be the
    start of a stop string is held back: the engine cuts a stop string off the text once
    it is complete, and what was already sent cannot be taken back."""

    def __init__(self, holdback: int):
        self.holdback = holdback
        self.sent_chars = 0
        self.sent_tokens = 0
        self.done = False

    def advance(self, out: CompletionOutput) -> tuple[str, int, int, bool]:
        """(new text, first new token, end token, finished now) for this output."""
        text = out.text
        finished = out.finish_reason is not None
        end = len(text) if finished else max(self.sent_chars, len(text) - self.holdback)
        delta = text[self.sent_chars:end]
        self.sent_chars = max(self.sent_chars, end)
        t0, t1 = self.sent_tokens, len(out.token_ids)
        if delta or finished:
            self.sent_tokens = t1
        else:
            t1 = t0  # tokens go out with the text they belong to
        newly_done = finished and not self.done
        self.done = self.done or finished
        return delta, t0, t1, newly_done
