"""`AsyncLLM`: the engine for asyncio programs, as vLLM's AsyncLLM is. The engine steps in
its own thread (`AsyncEngine`, what `sparsa serve` runs on); each request is an async
iterator of its outputs, and requests from many coroutines batch together.

    llm = AsyncLLM("model.gguf")
    async for out in llm.generate("Hello", SamplingParams(max_tokens=32), "req-1"):
        print(out.outputs[0].text)
    llm.shutdown()
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from sparsa.outputs import RequestOutput
from sparsa.sampling_params import SamplingParams


class AsyncLLM:
    """An engine shared by coroutines; settings as `LLM(model, **settings)`."""

    def __init__(self, model: str, **settings: Any):
        from sparsa.config import engine_config
        from sparsa.engine.llm_engine import LLMEngine
        from sparsa.server.async_engine import AsyncEngine

        self.engine = LLMEngine(engine_config(model, **settings))
        self._async = AsyncEngine(self.engine)
        self._loop: asyncio.AbstractEventLoop | None = None

    def _started(self) -> None:
        loop = asyncio.get_running_loop()
        if self._loop is None:
            self._async.start(loop)
            self._loop = loop
        elif self._loop is not loop:
            raise RuntimeError("an AsyncLLM serves the event loop it first ran on")

    async def generate(self, prompt: str | list[int], sampling_params: SamplingParams | None,
                       request_id: str, priority: int = 0) -> AsyncIterator[RequestOutput]:
        """The request's output as steps add tokens (cumulative: text and token ids so far;
        a consumer slower than the engine gets the latest, several steps at once; the last
        is `finished`). Leaving the loop early aborts the request; a busy engine raises
        `OverloadedError` at once rather than queueing without bound."""
        self._started()
        params = sampling_params or SamplingParams()
        if isinstance(prompt, str):
            ids = await asyncio.to_thread(self.engine.encode, prompt)
        else:
            ids = list(prompt)
        handle = self._async.submit(ids, params, request_id)
        async for out in handle.results():
            yield out

    def abort(self, request_id: str) -> None:
        self._async.abort(request_id)

    def shutdown(self) -> None:
        """Stop the engine thread (the model stays loaded until the object is dropped)."""
        self._async.shutdown()

    async def __aenter__(self) -> AsyncLLM:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        self.shutdown()
