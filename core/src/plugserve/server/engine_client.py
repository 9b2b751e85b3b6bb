"""Bridge between the synchronous engine and the asyncio HTTP server.

The engine's ``step()`` is blocking compute, so it runs in one dedicated thread;
the event loop never calls into the engine.  The two sides talk through:

* a command deque guarded by a ``threading.Condition`` (loop -> engine thread):
  ``add`` / ``abort`` commands, applied between steps so the engine is only ever
  touched by its own thread;
* per-request ``asyncio.Queue``s (engine thread -> loop), filled through
  ``loop.call_soon_threadsafe`` once per step for the whole batch, so a step
  costs one cross-thread wake-up no matter how many requests progressed.

When the engine has nothing to do the thread sleeps on the condition instead of
spinning.
"""
from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from typing import Any, Callable

logger = logging.getLogger(__name__)

_ACCEPTED = object()  # marker: the engine took the request (add_request returned)
_STATS_INTERVAL_S = 0.05  # refresh the stats snapshot at most this often while busy
_EMPTY_STATS = {"num_running": 0, "num_waiting": 0, "kv_cache_usage": 0.0,
                "prefix_cache_hit_rate": 0.0, "num_kv_blocks_used": 0}


class EngineUnavailableError(RuntimeError):
    """The engine is loading, draining, dead, or its waiting queue is full (HTTP 503)."""

    def __init__(self, message: str, retry_after: int | None = None):
        super().__init__(message)
        self.retry_after = retry_after


class QueueFullError(EngineUnavailableError):
    pass


class RequestFailedError(RuntimeError):
    """The engine raised while working on this request (HTTP 500)."""


class RequestStream:
    """Async iterator over one request's ``RequestOutput``s.

    Outputs carry the full text / token ids so far, so when the consumer falls
    behind only the newest output matters: ``__anext__`` drains the queue and
    returns the latest one, which bounds per-request lag to one item.
    """

    def __init__(self, client: "AsyncEngineClient", request_id: str):
        self._client = client
        self.request_id = request_id
        self._queue: asyncio.Queue = asyncio.Queue()
        self._accepted = False
        self._got_output = False
        self._done = False  # finished, failed or aborted: nothing more will come

    # -- called on the event loop by the client's dispatcher -------------------
    def _put(self, item: Any) -> None:
        self._queue.put_nowait(item)

    def _mark_done(self) -> None:
        if not self._done:
            self._done = True
            self._client._release(self)

    # -- consumer API ------------------------------------------------------------
    async def accepted(self) -> None:
        """Wait until the engine has taken the request.

        Raises the engine's ``ValueError`` if it rejected the input, so HTTP
        handlers can answer 400 before committing to a streaming 200.
        """
        # The engine thread always queues the accept marker (or the error) before
        # any output of the same request, so nothing is skipped here.
        while not self._accepted:
            await self._get()

    async def _get(self) -> Any:
        try:
            item = await self._queue.get()
        except BaseException:  # CancelledError: the HTTP client went away
            self.abort()
            raise
        if item is _ACCEPTED:
            self._accepted = True
        elif isinstance(item, BaseException):
            self._mark_done()
            raise item
        return item

    def __aiter__(self) -> "RequestStream":
        return self

    async def __anext__(self):
        if self._done:
            raise StopAsyncIteration
        item = _ACCEPTED
        while item is _ACCEPTED:
            item = await self._get()
        while not self._queue.empty():  # skip stale intermediate outputs
            nxt = self._queue.get_nowait()
            if isinstance(nxt, BaseException):
                self._mark_done()
                raise nxt
            if nxt is not _ACCEPTED:
                item = nxt
        if not self._got_output:
            self._got_output = True
            self._client._num_queued -= 1
        if item.finished:
            self._mark_done()
        return item

    def abort(self) -> None:
        """Stop generation and free the request's engine resources (idempotent)."""
        if not self._done:
            self._mark_done()
            self._client._submit(("abort", self.request_id))


class AsyncEngineClient:
    """Runs ``engine`` on a background thread and exposes ``generate()`` to asyncio.

    ``engine`` may be an engine object or a zero-argument factory; a factory is
    called on the engine thread so the server can answer ``/health`` (503)
    while the model loads.
    """

    def __init__(self, engine: Any, *, max_waiting: int | None = None, retry_after_s: int = 1):
        if callable(engine) and not hasattr(engine, "step"):
            self._factory: Callable[[], Any] | None = engine
            self.engine = None
        else:
            self._factory, self.engine = None, engine
        self.max_waiting = max_waiting
        self.retry_after_s = retry_after_s
        self._cond = threading.Condition()
        self._commands: collections.deque = collections.deque()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop = False
        self._ready = threading.Event()
        self._streams: dict[str, RequestStream] = {}  # event-loop side only
        self._num_queued = 0  # streams with no output yet (queued or prefilling)
        self._stats: dict = dict(_EMPTY_STATS)
        self.draining = False
        self.error: BaseException | None = None  # load failure / engine thread crash

    # -- lifecycle ---------------------------------------------------------------
    def start(self) -> None:
        """Start the engine thread, bound to the running event loop (idempotent)."""
        if self._thread is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="plugserve-engine", daemon=True)
        self._thread.start()

    @property
    def ready(self) -> bool:
        return self._ready.is_set() and self.error is None and not self._stop

    def wait_ready(self, timeout: float | None = None) -> bool:
        return self._ready.wait(timeout)

    def begin_drain(self) -> None:
        """Refuse new requests (503) while in-flight ones finish."""
        self.draining = True

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the engine thread; call from the event loop thread."""
        with self._cond:
            self._stop = True
            self._cond.notify()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)
        for stream in list(self._streams.values()):
            stream._put(EngineUnavailableError("server is shutting down"))

    def stats(self) -> dict:
        """Latest engine stats snapshot (taken on the engine thread; never blocks)."""
        return self._stats

    @property
    def num_in_flight(self) -> int:
        return len(self._streams)

    # -- request API (event loop) ------------------------------------------------
    def generate(self, request_id: str, prompt: Any, params: Any) -> RequestStream:
        """Submit a request; returns an async iterator of ``RequestOutput``.

        Raises ``EngineUnavailableError`` / ``QueueFullError`` synchronously so
        callers can answer 503 before any output is produced.
        """
        self.start()
        if self.error is not None:
            raise EngineUnavailableError(f"engine failed: {self.error}")
        if self.draining or self._stop:
            raise EngineUnavailableError("server is shutting down", self.retry_after_s)
        if not self._ready.is_set():
            raise EngineUnavailableError("engine is still loading", self.retry_after_s)
        if self.max_waiting is not None and self._num_queued >= self.max_waiting:
            raise QueueFullError(
                f"too many queued requests ({self._num_queued} >= max_waiting={self.max_waiting})",
                self.retry_after_s)
        if request_id in self._streams:
            raise ValueError(f"duplicate request id {request_id!r}")
        stream = RequestStream(self, request_id)
        self._streams[request_id] = stream
        self._num_queued += 1
        self._submit(("add", request_id, prompt, params))
        return stream

    def _release(self, stream: RequestStream) -> None:
        if self._streams.get(stream.request_id) is stream:
            del self._streams[stream.request_id]
        if not stream._got_output:
            stream._got_output = True
            self._num_queued -= 1

    def _submit(self, command: tuple) -> None:
        with self._cond:
            self._commands.append(command)
            self._cond.notify()

    def _dispatch(self, batch: list[tuple[str, Any]]) -> None:
        # Runs on the event loop: route each item to its request's queue.  Items
        # for requests the consumer already dropped (aborted) are discarded.
        for request_id, item in batch:
            stream = self._streams.get(request_id)
            if stream is not None:
                stream._put(item)

    # -- engine thread -------------------------------------------------------------
    def _run(self) -> None:
        try:
            if self.engine is None:
                self.engine = self._factory()
            self._stats = dict(_EMPTY_STATS, **self.engine.stats())
            self._ready.set()
            self._loop_forever()
        except BaseException as exc:  # keep the process up; /health reports it
            logger.exception("engine thread died")
            self.error = exc
            self._ready.set()
            try:
                self._loop.call_soon_threadsafe(self._fail_all, exc)
            except RuntimeError:
                pass

    def _fail_all(self, exc: BaseException) -> None:
        for stream in list(self._streams.values()):
            stream._put(EngineUnavailableError(f"engine failed: {exc}"))

    def _loop_forever(self) -> None:
        engine = self.engine
        live: set[str] = set()  # ids the engine holds (engine-thread view)
        last_stats = 0.0
        while True:
            with self._cond:
                while not self._commands and not self._stop and not engine.has_unfinished_requests():
                    self._stats = dict(_EMPTY_STATS, **engine.stats())  # fresh when idle
                    self._cond.wait()
                if self._stop:
                    return
                commands = list(self._commands)
                self._commands.clear()
            batch: list[tuple[str, Any]] = []
            for cmd in commands:
                self._apply(cmd, live, batch)
            if engine.has_unfinished_requests():
                try:
                    outputs = engine.step()
                except Exception as exc:
                    self._fail_step(exc, live, batch)
                else:
                    for out in outputs:
                        batch.append((out.request_id, out))
                        if out.finished:
                            live.discard(out.request_id)
            if batch:
                self._deliver(batch)
            now = time.monotonic()
            if now - last_stats >= _STATS_INTERVAL_S:
                self._stats = dict(_EMPTY_STATS, **engine.stats())
                last_stats = now

    def _apply(self, cmd: tuple, live: set[str], batch: list) -> None:
        kind, request_id = cmd[0], cmd[1]
        if kind == "add":
            try:
                self.engine.add_request(request_id, cmd[2], cmd[3])
            except ValueError as exc:  # bad input: the handler turns this into 400
                batch.append((request_id, exc))
            except Exception as exc:
                logger.exception("add_request failed for %s", request_id)
                batch.append((request_id, RequestFailedError(f"engine error: {exc}")))
            else:
                live.add(request_id)
                batch.append((request_id, _ACCEPTED))
        elif kind == "abort" and request_id in live:
            live.discard(request_id)
            try:
                self.engine.abort_request(request_id)
            except Exception:
                logger.exception("abort_request failed for %s", request_id)

    def _fail_step(self, exc: Exception, live: set[str], batch: list) -> None:
        # An engine may tag an exception with the request it came from
        # (``exc.request_id``); then only that request fails.  Otherwise every
        # request in the engine failed together, so all of them are failed and
        # freed -- either way the loop keeps serving new requests.
        rid = getattr(exc, "request_id", None)
        victims = [rid] if rid in live else sorted(live)
        logger.error("engine step failed (%s); failing %d request(s)", exc, len(victims),
                     exc_info=exc)
        for victim in victims:
            live.discard(victim)
            batch.append((victim, RequestFailedError(f"engine error: {exc}")))
            try:
                self.engine.abort_request(victim)
            except Exception:
                logger.exception("abort_request failed for %s", victim)

    def _deliver(self, batch: list) -> None:
        loop = self._loop
        try:
            loop.call_soon_threadsafe(self._dispatch, batch)
        except RuntimeError:  # loop closed during shutdown: nobody is listening
            pass
