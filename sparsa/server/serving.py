"""The logic of /v1/completions and /v1/chat/completions: validate, tokenize, admit,
submit to the AsyncEngine, and answer as JSON or as an SSE stream."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse
from jinja2 import TemplateError

from sparsa.outputs import RequestOutput
from sparsa.sampling_params import SamplingParams
from sparsa.server.async_engine import AsyncEngine, EngineFailed, RequestHandle, request_cost
from sparsa.server.completions import CompletionServing
from sparsa.server.errors import APIError, bad_request
from sparsa.server.formatting import (
    DeltaTracker,
    TokenText,
    chat_logprobs,
    sse,
    usage,
)
from sparsa.server.metrics import ServerMetrics
from sparsa.server.protocol import ChatCompletionRequest, CompletionRequest
from sparsa.server.sse import SSEResponse, closer, error_event
from sparsa.server.tool_parser import HermesToolParser, ToolParser
from sparsa.server.tools import ToolSetup, build_prompt, prompt_chars, tool_setup

log = logging.getLogger(__name__)


@dataclass
class _Job:
    index: int  # which prompt of the request
    ids: list[int]
    text: str | None
    handle: RequestHandle
    first_token: float | None = None
    last: RequestOutput | None = None


class ClientGone(Exception):
    pass


async def _wait_disconnect(raw: Request) -> None:
    while (await raw.receive())["type"] != "http.disconnect":
        pass


class OpenAIServing(CompletionServing):
    def __init__(self, engine: AsyncEngine, model_names: list[str], metrics: ServerMetrics,
                 tool_parser: type[ToolParser] = HermesToolParser):
        self.engine = engine
        self.tool_parser = tool_parser  # reads tool calls under tool_choice "auto"
        self.llm = engine.engine
        self.model_names = model_names
        self.metrics = metrics
        self.tokenizer = self.llm.tokenizer
        self.max_model_len = self.llm.max_model_len
        self.vocab_size = self.llm.hf_config.vocab_size
        self.token_text = TokenText(self.tokenizer)
        self.fcfs = self.llm.config.scheduler.policy == "fcfs"
        self._max_prompt_chars: int | None = None

    def max_prompt_chars(self) -> int:
        """Characters beyond which a text prompt cannot fit the context whatever its
        tokens: every token covers at most the longest token string's characters. Lets a
        huge prompt be refused before it is tokenized (seconds for megabytes)."""
        if self._max_prompt_chars is None:
            tok = self._need_tokenizer()
            pieces = tok.convert_ids_to_tokens(list(range(len(tok))))
            longest = max((len(p) for p in pieces if isinstance(p, str)), default=1)
            self._max_prompt_chars = self.max_model_len * max(longest, 1)
        return self._max_prompt_chars

    # ---- validation ------------------------------------------------------------------
    def check_model(self, name: str) -> None:
        if name not in self.model_names:
            raise APIError(404, f"The model `{name}` does not exist.", param="model",
                           code="model_not_found")

    def _need_tokenizer(self) -> Any:
        if self.tokenizer is None:
            raise bad_request("this model has no tokenizer: send prompts as token ids")
        return self.tokenizer

    async def _encode(self, texts: list[str], param: str = "prompt") -> list[list[int]]:
        """Token ids of each text: length-checked first, then tokenized off the event loop
        (a long prompt takes a while), all of a request's texts in one hop."""
        self._need_tokenizer()
        longest = max(map(len, texts), default=0)
        if longest > self.max_prompt_chars():
            raise bad_request(f"This model's maximum context length is {self.max_model_len} "
                              f"tokens. However, your prompt has {longest} characters, "
                              "more than fit in it. Please reduce the length of the prompt.",
                              param)
        return await asyncio.to_thread(lambda: [self.llm.encode(t) for t in texts])

    def _check_request(self, req: CompletionRequest | ChatCompletionRequest, raw: Request,
                       num_prompts: int) -> None:
        """Checks that need no tokenizing, so a refusal costs next to nothing."""
        self.engine.parsed(raw.scope.setdefault("state", {}))
        self.check_model(req.model)
        req.check_unsupported()
        if req.priority and self.fcfs:
            raise bad_request("priority needs the server started with --scheduling-policy "
                              "priority (it is fcfs)", "priority")
        if req.stop_token_ids and max(req.stop_token_ids) >= self.vocab_size:
            raise bad_request(f"stop_token_ids must be in [0, {self.vocab_size})",
                              "stop_token_ids")
        num_seqs = num_prompts * req.n
        self.engine.check_size(num_seqs)
        busy = self.engine.overloaded(num_seqs)
        if busy is not None:
            raise busy

    def _resolve_max_tokens(self, ids: list[int], max_tokens: int | None, param: str) -> int:
        if not ids:
            raise bad_request("prompt must not be empty", param)
        if any(not 0 <= t < self.vocab_size for t in ids):
            raise bad_request(f"token ids must be in [0, {self.vocab_size})", param)
        limit = self.max_model_len
        if len(ids) >= limit:
            raise bad_request(f"This model's maximum context length is {limit} tokens. "
                              f"However, your prompt has {len(ids)} tokens. Please reduce "
                              "the length of the prompt.", param)
        if max_tokens is None:
            return limit - len(ids)
        if len(ids) + max_tokens > limit:
            raise bad_request(f"This model's maximum context length is {limit} tokens. "
                              f"However, you requested {len(ids) + max_tokens} tokens "
                              f"({len(ids)} in the prompt, {max_tokens} in the completion). "
                              "Please reduce the length of the prompt or completion.",
                              "max_tokens")
        return max_tokens

    def _submit(self, prompts: list[tuple[list[int], str | None]], params: list[SamplingParams],
                priority: int, base_id: str) -> list[_Job]:
        costs = [request_cost(len(ids), p) for (ids, _), p in zip(prompts, params)]
        # all prompts of a request or none
        self.engine.admit(sum(costs), sum(p.n for p in params))
        return [_Job(i, ids, text, self.engine.submit(ids, p, f"{base_id}-{i}", priority,
                                                      cost, check=False))
                for i, ((ids, text), p, cost) in enumerate(zip(prompts, params, costs))]

    # ---- running jobs ----------------------------------------------------------------
    async def _pump(self, job: _Job, sink: asyncio.Queue) -> None:
        try:
            async for out in job.handle.results():
                if job.first_token is None and any(c.token_ids for c in out.outputs):
                    job.first_token = time.monotonic()
                job.last = out
                await sink.put((job, out))
        except asyncio.CancelledError:
            raise  # the consumer is gone; nobody reads the sink any more
        except Exception as e:
            await sink.put((job, e))
        else:
            if not job.handle.abandoned:  # the consumer left, and a put would block
                await sink.put((job, None))

    async def _events(self, jobs: list[_Job]) -> AsyncIterator[tuple[_Job, RequestOutput]]:
        """Outputs of all jobs as they come; raises the first job error."""
        # bounded, so a slow reader backs up into the handles, which keep only the newest
        sink: asyncio.Queue = asyncio.Queue(maxsize=len(jobs))
        tasks = [asyncio.create_task(self._pump(j, sink)) for j in jobs]
        live = len(jobs)
        try:
            while live:
                job, item = await sink.get()
                if item is None:
                    live -= 1
                elif isinstance(item, BaseException):
                    raise item
                else:
                    yield job, item
        finally:
            for t in tasks:
                t.cancel()
            for j in jobs:
                j.handle.close()
            self._observe(jobs)

    def _observe(self, jobs: list[_Job]) -> None:
        now = time.monotonic()
        for j in jobs:
            if j.last is None or not j.last.finished:
                continue
            ttft = None if j.first_token is None else j.first_token - j.handle.arrival
            self.metrics.observe_request(ttft, now - j.handle.arrival, len(j.ids),
                                         sum(len(c.token_ids) for c in j.last.outputs),
                                         [c.finish_reason for c in j.last.outputs])

    async def _collect(self, jobs: list[_Job], raw: Request) -> list[RequestOutput]:
        async def drain() -> None:
            async with contextlib.aclosing(self._events(jobs)) as events:
                async for _ in events:
                    pass

        work = asyncio.create_task(drain())
        watcher = asyncio.create_task(_wait_disconnect(raw))
        try:
            done, _ = await asyncio.wait({work, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if work not in done:
                raise ClientGone()  # the finally below aborts every job
            work.result()
        finally:
            for t in (work, watcher):
                t.cancel()
            with contextlib.suppress(BaseException):
                await work
            for j in jobs:
                j.handle.close()
        return [j.last for j in jobs]  # type: ignore[misc]

    @staticmethod
    async def _close(events: AsyncIterator, jobs: list[_Job]) -> None:
        """A stream that ends (a client gone, an error) closes the inner generator now: an
        outer generator's close does not reach the one it iterates, which would then
        hold its tasks, queue and handles until garbage collection."""
        await events.aclose()  # type: ignore[attr-defined]
        for j in jobs:
            j.handle.close()

    @staticmethod
    def _check_finish(out: RequestOutput) -> None:
        for c in out.outputs:
            if c.finish_reason == "error":
                raise EngineFailed(str(c.stop_reason))

    async def render_chat(self, conv: list[dict[str, Any]], add_generation_prompt: bool,
                          tools: list[dict[str, Any]] | None = None) -> list[int]:
        """A conversation's token ids under the chat template, off the event loop; the
        template's refusals and failures are 400s on `messages`."""
        tok = self._need_tokenizer()

        def render() -> list[int]:
            ids = tok.apply_chat_template(conv, tools=tools, tokenize=True,
                                          add_generation_prompt=add_generation_prompt)
            if isinstance(ids, dict) or hasattr(ids, "input_ids"):
                ids = ids["input_ids"]
            return list(ids)

        try:
            return await asyncio.to_thread(render)
        except TemplateError as e:  # the template refuses it (raise_exception(...))
            raise bad_request(f"the chat template refused these messages: {e}",
                              "messages") from None
        except Exception as e:  # anything else is ours: say what, not its internals
            log.warning("chat template failed: %s: %s", type(e).__name__, e)
            raise bad_request("cannot apply the chat template to these messages",
                              "messages") from None

    # ---- /v1/chat/completions --------------------------------------------------------
    async def chat(self, req: ChatCompletionRequest, raw: Request) -> Any:
        self._check_request(req, raw, 1)
        tok = self._need_tokenizer()
        if not getattr(tok, "chat_template", None):
            raise bad_request("this model has no chat template; use /v1/completions")
        conv, tools = build_prompt(req, tok)
        chars = prompt_chars(conv, tools)
        if chars > self.max_prompt_chars():
            raise bad_request(f"This model's maximum context length is {self.max_model_len} "
                              f"tokens. However, your messages have {chars} characters, "
                              "more than fit in it. Please reduce the length of the messages.",
                              "messages")

        ids = await self.render_chat(conv, req.add_generation_prompt, tools)
        max_tokens = req.max_completion_tokens or req.max_tokens
        setup = tool_setup(req, self.tool_parser)
        params = setup.apply(req.sampling_params(
            self._resolve_max_tokens(ids, max_tokens, "messages"), req.engine_logprobs()))
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        jobs = self._submit([(ids, None)], [params], req.priority, rid)
        created = int(time.time())
        if req.stream:
            return SSEResponse(self._stream_chat(req, jobs, rid, created, setup),
                               on_close=closer(jobs))
        out = (await self._collect(jobs, raw))[0]
        self._check_finish(out)
        k = req.top_logprobs or 0
        choices = [{"index": c.index, **setup.answer(c),
                    "logprobs": chat_logprobs(c, 0, len(c.token_ids), k, self.token_text)
                    if req.logprobs else None}
                   for c in out.outputs]
        return JSONResponse({"id": rid, "object": "chat.completion", "created": created,
                             "model": req.model, "choices": choices, "usage": usage([out])})

    async def _stream_chat(self, req: ChatCompletionRequest, jobs: list[_Job], rid: str,
                           created: int, setup: ToolSetup) -> AsyncIterator[str]:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        holdback = max((len(s) for s in req.params_stop() + setup.stops()), default=1) - 1
        trackers: dict[int, DeltaTracker] = {}
        streams = {i: setup.stream() for i in range(req.n)}
        k = req.top_logprobs or 0

        def chunk(index: int, delta: dict, lp: Any, finish: str | None) -> str:
            body = {"id": rid, "object": "chat.completion.chunk", "created": created,
                    "model": req.model, "choices": [{"index": index, "delta": delta,
                                                     "logprobs": lp, "finish_reason": finish}]}
            if include_usage:
                body["usage"] = None
            return sse(body)

        events = self._events(jobs)
        try:
            for i in range(req.n):  # the role comes first, as OpenAI sends it
                yield chunk(i, {"role": "assistant", "content": ""}, None, None)
            async for _job, out in events:
                self._check_finish(out)
                for c in out.outputs:
                    tr = trackers.setdefault(c.index, DeltaTracker(holdback))
                    delta, t0, t1, done = tr.advance(c)
                    if not delta and not done:
                        continue
                    lp = chat_logprobs(c, t0, t1, k, self.token_text) if req.logprobs else None
                    st = streams[c.index]
                    # content and whole tool calls; text that may be a call waits
                    deltas = st.feed(delta, done) or ([{}] if done or lp else [])
                    for j, d in enumerate(deltas):
                        last = j == len(deltas) - 1
                        yield chunk(c.index, d, lp if j == 0 else None,
                                    st.finish_reason(c.finish_reason) if done and last
                                    else None)
            if include_usage:
                yield sse({"id": rid, "object": "chat.completion.chunk", "created": created,
                           "model": req.model, "choices": [],
                           "usage": usage([j.last for j in jobs if j.last])})
        except Exception as e:
            yield sse(error_event(e))
        finally:
            await self._close(events, jobs)
        yield sse("[DONE]")
