"""Server-sent events that notice a client disconnect while nothing is being sent."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from functools import partial
from typing import Any

import anyio
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from sparsa.server.errors import APIError

log = logging.getLogger("sparsa.server.serving")  # where these messages always came from


class SSEResponse(StreamingResponse):
    """StreamingResponse that always listens for http.disconnect next to the stream.

    Starlette only does so for ASGI servers older than spec 2.4; newer ones make it rely on
    the next send failing. A request still queued, or between tokens of a slow model, would
    then hold its KV blocks until its next chunk; listening cancels the stream at once, and
    the stream's cleanup aborts the request in the engine.
    """

    def __init__(self, content, status_code: int = 200,
                 on_close: Callable[[], None] | None = None):
        super().__init__(content, status_code=status_code, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            async with anyio.create_task_group() as tg:

                async def run(func) -> None:
                    with contextlib.suppress(OSError):  # the client went away mid-send
                        await func()
                    tg.cancel_scope.cancel()

                tg.start_soon(run, partial(self.stream_response, send))
                await run(partial(self.listen_for_disconnect, receive))
        finally:
            # Cancelled during a send, the generator sits at a yield and its cleanup (which
            # aborts the request) would wait for garbage collection: close it now.
            close = getattr(self.body_iterator, "aclose", None)
            if close is not None:
                with anyio.CancelScope(shield=True):
                    await close()
            if self.on_close is not None:  # a generator closed before it ran ran no cleanup
                self.on_close()


def closer(jobs: list) -> Callable[[], None]:
    """Aborts a streamed request's jobs when its response ends for any reason, even when
    the client left before the stream started (its generator then never runs)."""
    def close() -> None:
        for j in jobs:
            j.handle.close()
    return close


def error_event(e: Exception) -> dict[str, Any]:
    """An error that happens after the stream started goes out as an SSE event."""
    if isinstance(e, APIError):
        return e.body()
    log.warning("request failed mid-stream: %s: %s", type(e).__name__, e)
    return APIError(500, f"{type(e).__name__}: {e}").body()
