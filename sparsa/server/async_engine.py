"""The engine behind the async front end: LLMEngine stepped in its own thread.

The event loop never touches the engine. It sends commands (add, abort) through a locked
list and wakes the thread; the thread applies them between steps and hands each request's
outputs to that request's handle with loop.call_soon_threadsafe. Admission control
(a bounded waiting queue, a cap on tokens in flight) is decided on the event loop before a
request is queued, so an overloaded server answers at once instead of piling up work.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import AsyncIterator

from sparsa.engine.llm_engine import LLMEngine
from sparsa.outputs import RequestOutput
from sparsa.sampling_params import SamplingParams
from sparsa.server.errors import APIError, OverloadedError
from sparsa.server.settings import AdmissionConfig

log = logging.getLogger(__name__)


class EngineFailed(RuntimeError):
    """The engine step failed while this request was in it."""


def request_cost(num_prompt_tokens: int, params: SamplingParams) -> int:
    """Tokens a request can occupy at most: what the in-flight cap counts."""
    return params.n * (num_prompt_tokens + (params.max_tokens or 0))


class RequestHandle:
    """One request's output stream on the event loop. Leaving early (an exception, the
    consumer's cancellation, a client disconnect, close()) aborts the request in the
    engine, which frees its KV blocks before the next step."""

    def __init__(self, engine: AsyncEngine, request_id: str, cost: int):
        self.engine = engine
        self.request_id = request_id
        self.cost = cost
        # Outputs are cumulative, so only the newest matters: a slow reader finds one
        # output, never a backlog that grows with every step.
        self._latest: RequestOutput | BaseException | None = None
        self._ready = asyncio.Event()
        self.arrival = time.monotonic()
        self.finished = False
        self.abandoned = False  # closed before it finished: nobody reads it any more
        # One timer per request rather than asyncio.wait_for per wait: wait_for can
        # swallow the cancellation of the task it runs in (when its wait ends at the same
        # moment), and that task would then wait out the timeout holding the request.
        self._timed_out = False
        timeout = engine.admission.request_timeout
        self._timer = None if timeout is None else \
            asyncio.get_running_loop().call_later(timeout, self._expire)

    def _expire(self) -> None:
        self._timed_out = True
        self._ready.set()

    async def results(self) -> AsyncIterator[RequestOutput]:
        try:
            while not self.finished:
                await self._ready.wait()
                self._ready.clear()
                item, self._latest = self._latest, None
                done = isinstance(item, RequestOutput) and item.finished
                if self._timed_out and not self.finished and not done:
                    timeout = self.engine.admission.request_timeout or 0
                    raise APIError(504, f"request timed out after {timeout:g} s",
                                   code="timeout")
                if item is None:
                    continue  # woken by close(): the loop ends
                if isinstance(item, BaseException):
                    self.finished = True  # the engine already dropped it
                    raise item
                self.finished = item.finished
                yield item
        finally:
            self.close()

    def put(self, item: RequestOutput | BaseException) -> None:
        if not isinstance(self._latest, BaseException):  # an error is never overwritten
            self._latest = item
        self._ready.set()

    def close(self) -> None:
        """Done with this request (idempotent): abort it if it is still running, and wake
        a results() that waits so it ends."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.engine._release(self)
        if not self.finished:
            self.finished = self.abandoned = True
            self.engine.abort(self.request_id)
        self._ready.set()


class AsyncEngine:
    def __init__(self, engine: LLMEngine, admission: AdmissionConfig | None = None):
        self.engine = engine
        self.admission = admission or AdmissionConfig()
        if self.admission.max_tokens_in_flight is None:
            # A few KV pools' worth: enough to keep the batch full, small enough that the
            # waiting queue stays a short wait rather than minutes of backlog.
            self.admission.max_tokens_in_flight = 4 * engine.runner.capacity_tokens
        self._loop: asyncio.AbstractEventLoop | None = None
        self._requests: dict[str, RequestHandle] = {}
        self._tokens_in_flight = 0
        self._queued_seqs = 0  # sequences in "add" commands the engine thread has not taken
        self.arriving = 0  # generation requests being read/parsed (event loop only)
        self._commands: list[tuple[str, str, object]] = []
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = False
        self._thread: threading.Thread | None = None
        self.num_steps = 0
        self.last_error: str | None = None

    # ---- lifecycle --------------------------------------------------------------------
    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="sparsa-engine", daemon=True)
        self._thread.start()

    def shutdown(self) -> None:
        self._stop = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None

    @property
    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # ---- front end (event loop thread) -----------------------------------------------
    @property
    def num_active(self) -> int:
        return len(self._requests)

    @property
    def tokens_in_flight(self) -> int:
        return self._tokens_in_flight

    def num_waiting(self) -> int:
        """Sequences queued for the engine or waiting in its scheduler, plus one for each
        generation request still being read or parsed (it will make at least one): under
        a burst, that is what lets the front door refuse the excess before their bodies
        are read, instead of after every one of them was parsed."""
        return self._queued_seqs + len(self.engine.scheduler.waiting) + self.arriving

    def arrive(self, state: dict) -> None:
        """A generation request came past the front door (see num_waiting)."""
        self.arriving += 1
        state["sparsa_arriving"] = True

    def parsed(self, state: dict) -> None:
        """That request is parsed (or answered): from now on it counts as what it makes."""
        if state.pop("sparsa_arriving", False):
            self.arriving -= 1

    def check_size(self, num_seqs: int) -> None:
        """Refuse a request that makes too many sequences, before any work on it (400: it
        would never be admitted)."""
        cfg = self.admission
        limit = min(cfg.max_seqs_per_request, cfg.max_waiting)
        if num_seqs > limit:
            flag = ("--max-seqs-per-request" if limit == cfg.max_seqs_per_request
                    else "--max-waiting")
            raise APIError(400, f"this request makes {num_seqs} sequences (prompts x n); "
                                f"the server takes at most {limit} per request ({flag})",
                           code="too_many_sequences")

    def overloaded(self, num_seqs: int = 1, cost: int = 1) -> APIError | None:
        """Why a request of `num_seqs` sequences costing `cost` tokens must wait, or None.
        Cheap, so it can also turn requests away before their body is read."""
        if not self.is_alive:
            return APIError(503, "the engine is not running", code="engine_dead")
        cfg = self.admission
        waiting = self.num_waiting()
        if waiting + num_seqs > cfg.max_waiting:
            return OverloadedError(503, f"server overloaded: {waiting} sequences waiting, "
                                        f"limit {cfg.max_waiting} (--max-waiting); retry later")
        cap = cfg.max_tokens_in_flight or 0
        # An idle server takes any request that fits the cap, so none is refused forever.
        if self._requests and self._tokens_in_flight + cost > cap:
            return OverloadedError(429, f"too many tokens in flight ({self._tokens_in_flight} "
                                        f"+ {cost} > {cap}, --max-tokens-in-flight); "
                                        "retry later")
        return None

    def admit(self, cost: int, num_seqs: int = 1) -> None:
        """Raise an APIError when a request of `num_seqs` sequences that can hold `cost`
        tokens must be refused: 400 when it could never fit, 503/429 when the server is
        busy."""
        self.check_size(num_seqs)
        cap = self.admission.max_tokens_in_flight or 0
        if cost > cap and num_seqs > 1:
            raise APIError(400, f"this request's {num_seqs} sequences can hold {cost} tokens, "
                                f"more than the server's {cap} (--max-tokens-in-flight); "
                                "lower n, the number of prompts or max_tokens",
                           code="request_too_large")
        err = self.overloaded(num_seqs, cost)
        if err is not None:
            raise err

    def submit(self, prompt_ids: list[int], params: SamplingParams, request_id: str,
               priority: int = 0, cost: int | None = None, check: bool = True
               ) -> RequestHandle:
        """Queue a request (after admission control unless `check` is False, for a caller
        that already admitted a batch) and return the handle its outputs arrive on."""
        if cost is None:
            cost = request_cost(len(prompt_ids), params)
        if check:
            self.admit(cost, params.n)
        handle = RequestHandle(self, request_id, cost)
        self._requests[request_id] = handle
        self._tokens_in_flight += cost
        with self._lock:
            self._queued_seqs += params.n
        self._send("add", request_id, (prompt_ids, params, priority))
        return handle

    def _release(self, handle: RequestHandle) -> None:
        if self._requests.pop(handle.request_id, None) is not None:
            self._tokens_in_flight -= handle.cost

    def abort(self, request_id: str) -> None:
        self._send("abort", request_id, None)

    def _send(self, kind: str, request_id: str, payload: object) -> None:
        with self._lock:
            self._commands.append((kind, request_id, payload))
        self._wake.set()

    # ---- engine thread ---------------------------------------------------------------
    def _deliver(self, request_id: str, item: object) -> None:
        handle = self._requests.get(request_id)
        if handle is not None:  # gone: the consumer left and its abort is on the way
            handle.put(item)

    def _deliver_many(self, items: list[tuple[str, object]]) -> None:
        for request_id, item in items:
            self._deliver(request_id, item)

    def _post_many(self, items: list[tuple[str, object]]) -> None:
        """A step's outputs in one hand-over: each call_soon_threadsafe writes to the
        loop's wake-up pipe, and one per request per step adds up under load."""
        assert self._loop is not None
        with contextlib.suppress(RuntimeError):  # the loop closed during shutdown
            self._loop.call_soon_threadsafe(self._deliver_many, items)

    def _post(self, request_id: str, item: object) -> None:
        assert self._loop is not None
        with contextlib.suppress(RuntimeError):  # the loop closed during shutdown
            self._loop.call_soon_threadsafe(self._deliver, request_id, item)

    def _apply_commands(self) -> None:
        with self._lock:
            cmds, self._commands = self._commands, []
            self._wake.clear()
        for kind, rid, payload in cmds:
            if kind == "abort":
                self.engine.abort_request(rid)
                continue
            ids, params, priority = payload  # type: ignore[misc]
            try:
                self.engine.add_request(ids, params, request_id=rid, priority=priority)
            except Exception as e:  # a bad request fails alone
                self._post(rid, APIError(400, str(e)) if isinstance(e, (ValueError, TypeError))
                           else EngineFailed(f"{type(e).__name__}: {e}"))
            finally:
                with self._lock:  # now in the scheduler's queue (or failed)
                    self._queued_seqs -= params.n

    def _run(self) -> None:
        eng = self.engine  # its step() sets this thread's numeric modes (not the loop's)
        while not self._stop:
            try:
                self._apply_commands()
                if not eng.has_unfinished_requests():
                    self._wake.wait(timeout=0.5)
                    continue
                outputs = eng.step()
                self.num_steps += 1
            except Exception as e:
                # A failed step is not any one request's fault that we can tell: fail the
                # requests that were in the engine, free their blocks, and keep serving.
                log.exception("engine step failed")
                self.last_error = f"{type(e).__name__}: {e}"
                for rid in list(eng.requests):
                    eng.abort_request(rid)
                    self._post(rid, EngineFailed(self.last_error))
                continue
            if outputs:
                self._post_many([(out.request_id, out) for out in outputs])
        # shutting down: drop what is left so its blocks are free
        for rid in list(eng.requests):
            eng.abort_request(rid)
            self._post(rid, APIError(503, "server shutting down"))
