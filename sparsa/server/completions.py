"""/v1/completions: text or token-id prompts, echo, logprobs (the prompt's too, for
scoring), vLLM's prompt_logprobs; as JSON or an SSE stream. The shared request machinery
(validation, jobs, streaming) is OpenAIServing's, in serving.py."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse

from sparsa.outputs import CompletionOutput, RequestOutput
from sparsa.server.formatting import (
    DeltaTracker,
    completion_logprobs,
    echo_logprobs,
    shift_offsets,
    sse,
    usage,
    vllm_prompt_logprobs,
)
from sparsa.server.protocol import CompletionRequest
from sparsa.server.sse import SSEResponse, closer, error_event


class CompletionServing:
    """The completions endpoint, mixed into OpenAIServing (whose helpers it calls)."""

    async def completions(self, req: CompletionRequest, raw: Request) -> Any:
        raw_prompts = req.prompts()
        self._check_request(req, raw, len(raw_prompts))
        texts = [p for p in raw_prompts if isinstance(p, str)]
        encoded = iter(await self._encode(texts) if texts else [])
        prompts: list[tuple[list[int], str | None]] = [
            (next(encoded), p) if isinstance(p, str) else (list(p), None) for p in raw_prompts]
        # max_tokens=0 (scoring a prompt) runs one token, as vLLM does, and drops it: the
        # token comes from the prompt's last step, so it costs no extra forward pass
        params = [req.sampling_params(
            max(self._resolve_max_tokens(ids, req.max_tokens, "prompt"), 1), req.logprobs,
            prompt_logprobs=req.wants_prompt_logprobs()) for ids, _ in prompts]
        rid = f"cmpl-{uuid.uuid4().hex}"
        jobs = self._submit(prompts, params, req.priority, rid)
        created = int(time.time())
        if req.stream:
            return SSEResponse(self._stream_completion(req, jobs, rid, created),
                               on_close=closer(jobs))
        outs = [_scored_only(o) if req.max_tokens == 0 else o
                for o in await self._collect(jobs, raw)]
        choices = []
        for job, out in zip(jobs, outs):
            self._check_finish(out)
            prefix = self._prompt_text(job) if req.echo else ""
            for c in out.outputs:
                choices.append({"index": job.index * req.n + c.index, "text": prefix + c.text,
                                "logprobs": self._choice_logprobs(req, out, prefix, c),
                                "finish_reason": c.finish_reason, "stop_reason": c.stop_reason,
                                **self._prompt_logprobs_field(req, out)})
        return JSONResponse({"id": rid, "object": "text_completion", "created": created,
                             "model": req.model, "choices": choices, "usage": usage(outs)})

    def _choice_logprobs(self, req: CompletionRequest, out: RequestOutput, prefix: str,
                         c: CompletionOutput) -> dict[str, Any] | None:
        if req.logprobs is None:
            return None
        if req.echo:
            return echo_logprobs(out, prefix, c, req.logprobs, self.token_text)
        return completion_logprobs(c, 0, len(c.token_ids), req.logprobs, self.token_text, 0)

    def _prompt_logprobs_field(self, req: CompletionRequest, out: RequestOutput
                               ) -> dict[str, Any]:
        if req.prompt_logprobs is None:
            return {}
        return {"prompt_logprobs": vllm_prompt_logprobs(out, self.token_text)}

    def _prompt_text(self, job: Any) -> str:
        if job.text is not None:
            return job.text
        return self.tokenizer.decode(job.ids) if self.tokenizer is not None else ""

    async def _stream_completion(self, req: CompletionRequest, jobs: list, rid: str,
                                 created: int) -> AsyncIterator[str]:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        holdback = max((len(s) for s in req.params_stop()), default=1) - 1
        trackers: dict[int, DeltaTracker] = {}

        def chunk(index: int, text: str, lp: Any, finish: str | None,
                  extra: dict[str, Any] | None = None) -> str:
            body = {"id": rid, "object": "text_completion", "created": created,
                    "model": req.model, "choices": [{"index": index, "text": text,
                                                     "logprobs": lp, "finish_reason": finish,
                                                     **(extra or {})}]}
            if include_usage:
                body["usage"] = None
            return sse(body)

        events = self._events(jobs)
        last: dict[int, RequestOutput] = {}
        try:
            async for job, out in events:
                self._check_finish(out)
                if req.max_tokens == 0:
                    out = _scored_only(out)
                last[job.index] = out
                for c in out.outputs:
                    idx = job.index * req.n + c.index
                    tr = trackers.get(idx)
                    if tr is None:
                        tr = trackers[idx] = DeltaTracker(holdback)
                        prompt = self._prompt_text(job) if req.echo else ""
                        tr.echoed = len(prompt)
                        if req.echo or req.prompt_logprobs is not None:
                            lp = (echo_logprobs(out, prompt, None, req.logprobs,
                                                self.token_text)
                                  if req.echo and req.logprobs is not None else None)
                            yield chunk(idx, prompt, lp, None,
                                        self._prompt_logprobs_field(req, out))
                    offset = tr.sent_chars
                    delta, t0, t1, done = tr.advance(c)
                    if not delta and not done:
                        continue
                    lp = None
                    if req.logprobs is not None:
                        lp = shift_offsets(completion_logprobs(
                            c, t0, t1, req.logprobs, self.token_text, offset), tr.echoed)
                    yield chunk(idx, delta, lp, c.finish_reason if done else None)
            if include_usage:
                yield sse({"id": rid, "object": "text_completion", "created": created,
                           "model": req.model, "choices": [],
                           "usage": usage(list(last.values()))})
        except Exception as e:
            yield sse(error_event(e))
        finally:
            await self._close(events, jobs)
        yield sse("[DONE]")


def _scored_only(out: RequestOutput) -> RequestOutput:
    """A max_tokens=0 request's output: the prompt (and its logprobs), no completion."""
    outs = [replace(c, text="", token_ids=[], logprobs=[] if c.logprobs is not None else None,
                    cumulative_logprob=None, finish_reason="length" if c.finish_reason else None,
                    stop_reason=None) for c in out.outputs]
    return replace(out, outputs=outs)
