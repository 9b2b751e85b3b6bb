"""FastAPI app: OpenAI-compatible HTTP API over an ``AsyncEngineClient``.

Request bodies are read and parsed by hand (not by FastAPI's body injection) so
that size limits (413), invalid UTF-8, malformed JSON and field errors all get
OpenAI-style 400 errors naming the problem instead of FastAPI's 422.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import re
import time
from contextlib import aclosing, asynccontextmanager
from typing import Any, AsyncIterator, Iterable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from .. import __version__
from . import protocol as P
from .engine_client import (AsyncEngineClient, EngineUnavailableError, QueueFullError,
                            RequestFailedError, RequestStream)
from .metrics import RequestTimer, ServerMetrics

logger = logging.getLogger(__name__)

DEFAULT_MAX_BODY_BYTES = 8 * 1024 * 1024
OPEN_PATHS = frozenset({"/health"})  # reachable without the API key (load-balancer probes)


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: Any = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.headers = status, headers
        self.body = P.error_body(message, type_, param, code)


class _ClientGone(Exception):
    """The HTTP client disconnected before the response was ready."""


def _dumps(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def _as_api_error(exc: BaseException) -> APIError:
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, EngineUnavailableError):
        headers = {"Retry-After": str(exc.retry_after)} if exc.retry_after is not None else None
        code = "queue_full" if isinstance(exc, QueueFullError) else "engine_unavailable"
        return APIError(503, str(exc), "server_overloaded" if code == "queue_full"
                        else "service_unavailable", code=code, headers=headers)
    if isinstance(exc, RequestFailedError):
        return APIError(500, str(exc), "server_error")
    if isinstance(exc, ValueError):  # engine rejected the input
        return APIError(400, str(exc))
    if isinstance(exc, (ClientDisconnect, _ClientGone)):
        return APIError(499, "client disconnected")
    logger.exception("unhandled error", exc_info=exc)
    return APIError(500, f"internal server error: {type(exc).__name__}", "server_error")


def _outcome(status: int) -> str:
    if status == 499:
        return "aborted"
    if status == 503:
        return "rejected"
    return "client_error" if status < 500 else "server_error"


class _AuthMiddleware:
    """Bearer-token check as plain ASGI middleware, so it also covers unknown paths."""

    def __init__(self, app: Any, api_key: str):
        self.app, self._key = app, api_key.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] not in OPEN_PATHS:
            token = b""
            for name, value in scope["headers"]:
                if name == b"authorization" and value[:7].lower() == b"bearer ":
                    token = value[7:].strip()
            # compare_digest: timing does not reveal how much of the key matched.
            if not hmac.compare_digest(token, self._key):
                resp = JSONResponse(P.error_body("Invalid or missing API key", "invalid_request_error",
                                                 code="invalid_api_key"),
                                    status_code=401, headers={"WWW-Authenticate": "Bearer"})
                return await resp(scope, receive, send)
        return await self.app(scope, receive, send)


class _SSEResponse(StreamingResponse):
    """StreamingResponse that always closes its generator.

    Starlette cancels the sending task on disconnect but leaves the body
    generator for the garbage collector; closing it here runs its ``finally``
    (which aborts the engine request) immediately.
    """

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()


# ------------------------------------------------------------------ body parsing

async def _read_json(request: Request, max_bytes: int) -> dict:
    length = request.headers.get("content-length")
    if length is not None:
        if not length.isdigit():
            raise APIError(400, "invalid Content-Length header")
        if int(length) > max_bytes:
            raise APIError(413, f"request body too large ({length} > {max_bytes} bytes)",
                           code="request_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:  # chunked uploads have no Content-Length to check up front
            raise APIError(413, f"request body too large (> {max_bytes} bytes)",
                           code="request_too_large")
        chunks.append(chunk)
    raw = b"".join(chunks)
    if not raw.strip():
        raise APIError(400, "request body is empty; expected a JSON object")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise APIError(400, f"request body is not valid UTF-8 (invalid byte at offset {e.start})")

    def no_constants(name: str):
        raise ValueError(f"{name} is not valid JSON")

    try:
        data = json.loads(text, parse_constant=no_constants)
    except json.JSONDecodeError as e:
        raise APIError(400, f"malformed JSON body: {e.msg} (line {e.lineno}, column {e.colno})")
    except ValueError as e:
        raise APIError(400, f"malformed JSON body: {e}")
    if not isinstance(data, dict):
        raise APIError(400, "request body must be a JSON object")
    return data


def _parse(model_cls: type, data: dict) -> Any:
    try:
        return model_cls.model_validate(data)
    except ValidationError as e:
        msg, param = P.describe_validation_error(e.errors(include_url=False))
        raise APIError(400, msg, param=param)


def _make_params(kwargs: dict, aliases: dict[str, str]) -> Any:
    from plugserve.sampling_params import SamplingParams

    try:
        return SamplingParams(**kwargs)
    except (ValueError, TypeError) as e:
        msg = str(e)
        # SamplingParams names the field in its message; report it as the request's param.
        param = next((k for k in sorted(kwargs, key=len, reverse=True)
                      if re.search(rf"\b{re.escape(k)}\b", msg)), None)
        raise APIError(400, msg, param=aliases.get(param, param))


def _check_length(prompt_len: int, max_tokens: int, max_model_len: int, param: str) -> None:
    if prompt_len + max_tokens > max_model_len:
        raise APIError(400, f"This model's maximum context length is {max_model_len} tokens. "
                            f"However, you requested {prompt_len + max_tokens} tokens "
                            f"({prompt_len} in the prompt, {max_tokens} for the completion). "
                            f"Please reduce the length of the prompt or {param}.",
                       param=param, code="context_length_exceeded")


# ------------------------------------------------------------------ generation plumbing

async def _submit(client: AsyncEngineClient, prompts: list[list[int]], params: Any,
                  base_id: str) -> list[RequestStream]:
    """Submit one engine request per prompt; wait until the engine accepted all of them."""
    streams: list[RequestStream] = []
    try:
        for i, ids in enumerate(prompts):
            streams.append(client.generate(base_id if len(prompts) == 1 else f"{base_id}-{i}",
                                           ids, params))
        for s in streams:
            await s.accepted()
    except BaseException:
        for s in streams:
            s.abort()
        raise
    return streams


async def _merge(streams: list[RequestStream]) -> AsyncIterator[tuple[int, Any]]:
    """Yield (prompt index, RequestOutput) from all streams; abort the rest on exit."""
    try:
        if len(streams) == 1:
            async for out in streams[0]:
                yield 0, out
            return
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(i: int, stream: RequestStream) -> None:
            try:
                async for out in stream:
                    queue.put_nowait((i, out))
                queue.put_nowait((i, None))
            except Exception as exc:
                queue.put_nowait((i, exc))

        tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
        try:
            remaining = len(streams)
            while remaining:
                i, item = await queue.get()
                if item is None:
                    remaining -= 1
                elif isinstance(item, BaseException):
                    raise item
                else:
                    yield i, item
        finally:
            for t in tasks:
                t.cancel()
    finally:
        for s in streams:
            s.abort()  # no-op for finished streams


async def _wait_disconnect(request: Request) -> None:
    empty = 0
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
        empty += 1
        if empty > 2:  # server keeps replaying empty bodies: cannot detect, just wait
            await asyncio.Event().wait()


async def _until_disconnect(request: Request, coro) -> Any:
    """Run ``coro`` unless the client disconnects first (then cancel it: aborts the request)."""
    work = asyncio.ensure_future(coro)
    watch = asyncio.ensure_future(_wait_disconnect(request))
    try:
        await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not work.done():
            work.cancel()
    if work.done() and not work.cancelled():
        return work.result()
    raise _ClientGone()


class _Usage:
    def __init__(self) -> None:
        self.prompt: dict[int, int] = {}      # prompt index -> prompt tokens
        self.completion: dict[int, int] = {}  # choice index -> generated tokens

    def dict(self) -> dict:
        return P.usage_dict(sum(self.prompt.values()), sum(self.completion.values()))


def _sse_response(events: AsyncIterator[dict], timer: RequestTimer,
                  streams: list[RequestStream]) -> StreamingResponse:
    async def body():
        outcome = "aborted"  # unless we reach the end or an error
        try:
            try:
                async for event in events:
                    yield f"data: {_dumps(event)}\n\n"
                outcome = "ok"
            except Exception as exc:  # headers are sent: report in-band, like OpenAI
                err = _as_api_error(exc)
                outcome = _outcome(err.status)
                yield f"data: {_dumps(err.body)}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            await events.aclose()
            for s in streams:  # covers a close before events reached its own cleanup
                s.abort()
            timer.finish(outcome)

    return _SSEResponse(body(), media_type="text/event-stream",
                        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


# ------------------------------------------------------------------ app factory

def _chunk_maker(rid: str, obj: str, created: int, model: str, include_usage: bool):
    """Builds one streamed event; every event carries "usage" (null until the last) when the client asked for it."""
    def chunk(choices: list, usage_obj=None) -> dict:
        ev = {"id": rid, "object": obj, "created": created, "model": model,
              "system_fingerprint": None, "choices": choices}
        if include_usage:
            ev["usage"] = usage_obj
        return ev
    return chunk
def build_app(engine_client: AsyncEngineClient, *, api_key: str | None = None,
              max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, cors_origins: Iterable[str] | None = None,
              served_model_name: str | None = None) -> FastAPI:
    """OpenAI-compatible app.  ``served_model_name`` defaults to ``engine.model_name``."""
    client = engine_client
    metrics = ServerMetrics(client.stats)
    started = int(time.time())
    token_texts: dict[int, P.TokenTexts] = {}

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        client.start()  # begin loading/serving before the first request arrives
        yield
        client.shutdown()

    app = FastAPI(title="plugserve", version=__version__, lifespan=lifespan,
                  docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine_client = client
    app.state.metrics = metrics

    if api_key:
        app.add_middleware(_AuthMiddleware, api_key=api_key)
    if cors_origins:  # added last = outermost, so preflights are answered before auth
        from fastapi.middleware.cors import CORSMiddleware
        app.add_middleware(CORSMiddleware, allow_origins=list(cors_origins),
                           allow_methods=["GET", "POST", "OPTIONS"], allow_headers=["*"])

    # ---- error rendering -----------------------------------------------------------
    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError):
        return JSONResponse(exc.body, status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError):
        msg, param = P.describe_validation_error(list(exc.errors()))
        return JSONResponse(P.error_body(msg, param=param), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException):
        type_ = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(P.error_body(str(exc.detail), type_), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    # ---- helpers bound to this app ---------------------------------------------------
    def engine() -> Any:
        client.start()  # lazily, for ASGI servers/transports that skip lifespan
        if not client.ready:
            raise _as_api_error(EngineUnavailableError(
                f"engine failed: {client.error}" if client.error else
                "server is shutting down" if client.draining else "engine is still loading",
                retry_after=None if client.error else client.retry_after_s))
        return client.engine

    def model_name() -> str:
        return served_model_name or engine().model_name

    def check_model(requested: str | None) -> str:
        name = model_name()
        if requested is not None and requested != name:
            raise APIError(404, f"The model '{requested}' does not exist", param="model",
                           code="model_not_found")
        return name

    def texts_for(tokenizer: Any) -> P.TokenTexts:
        key = id(tokenizer)
        if key not in token_texts:
            token_texts[key] = P.TokenTexts(tokenizer)
        return token_texts[key]

    async def guarded(timer: RequestTimer, handler, request: Request):
        try:
            return await handler(request, timer)
        except Exception as exc:
            err = _as_api_error(exc)
            timer.finish(_outcome(err.status))
            raise err from exc

    # ---- informational routes -----------------------------------------------------------
    @app.get("/health")
    async def health():
        client.start()
        if client.ready and not client.draining:
            return {"status": "ok"}
        state = ("error" if client.error else "draining" if client.draining else "loading")
        return JSONResponse(P.error_body(f"server is not ready ({state})", "service_unavailable",
                                         code=state), status_code=503)

    @app.get("/version")
    async def version():
        eng = client.engine if client.ready else None
        return {"version": __version__,
                "platform": getattr(eng, "platform_name", None),
                "device": getattr(eng, "device_description", None)}

    @app.get("/metrics")
    async def prometheus_metrics():
        content, ctype = metrics.render()
        return Response(content, media_type=ctype)

    def model_card() -> dict:
        return {"id": model_name(), "object": "model", "created": started, "owned_by": "plugserve",
                "max_model_len": engine().max_model_len}

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model:path}")
    async def get_model(model: str):
        check_model(model)
        return model_card()

    # ---- /v1/completions --------------------------------------------------------------
    async def completions(request: Request, timer: RequestTimer):
        req = _parse(P.CompletionRequest, await _read_json(request, max_body_bytes))
        eng = engine()
        model = check_model(req.model)
        if req.echo and req.logprobs is not None:
            raise APIError(400, "echo together with logprobs is not supported", param="echo")
        tok = eng.tokenizer
        prompt_ids: list[list[int]] = []
        for p in req.prompt:
            if isinstance(p, str) and tok is None:
                raise APIError(400, "this model has no tokenizer; send the prompt as token ids",
                               param="prompt")
            ids = tok.encode(p) if isinstance(p, str) else p
            if not ids:
                raise APIError(400, "prompt is empty", param="prompt")
            prompt_ids.append(ids)
        max_tokens = req.max_tokens
        if max_tokens is None:  # explicit null: use the rest of the context
            max_tokens = eng.max_model_len - max(len(ids) for ids in prompt_ids)
            if max_tokens < 1:
                _check_length(max(len(ids) for ids in prompt_ids), 1, eng.max_model_len, "prompt")
        for ids in prompt_ids:
            _check_length(len(ids), max_tokens, eng.max_model_len, "max_tokens")
        params = _make_params(req.sampling_kwargs(max_tokens=max_tokens, logprobs=req.logprobs), {})
        echo = [(p if isinstance(p, str) else tok.decode(p) if tok else "") if req.echo else ""
                for p in req.prompt]
        rid = P.random_id("cmpl")
        streams = await _submit(client, prompt_ids, params, rid)
        texts = texts_for(tok)
        want_lp = req.logprobs is not None

        def choice_logprobs(c, start: int, offset: int):
            return P.completion_logprobs((c.logprobs or [])[start:], texts, offset) if want_lp else None

        if req.stream:
            return _sse_response(completion_events(req, rid, model, streams, echo, choice_logprobs,
                                                   timer), timer, streams)
        finals = await _until_disconnect(request, _collect(streams, timer))
        choices, usage = [], _Usage()
        for i, out in enumerate(finals):
            usage.prompt[i] = len(out.prompt_token_ids)
            for c in out.outputs:
                g = i * req.n + c.index
                usage.completion[g] = len(c.token_ids)
                choices.append({"index": g, "text": echo[i] + c.text,
                                "logprobs": choice_logprobs(c, 0, len(echo[i])),
                                "finish_reason": c.finish_reason})
        choices.sort(key=lambda c: c["index"])
        u = usage.dict()
        timer.finish("ok", u["prompt_tokens"], u["completion_tokens"],
                     max(usage.completion.values(), default=0))
        return P.completion_response(rid, model, choices, u)

    async def completion_events(req, rid, model, streams, echo, choice_logprobs, timer):
        created = int(time.time())
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        # per choice: [chars sent, tokens sent, logprob text offset, finished]
        sent: dict[int, list] = {}
        usage = _Usage()

        chunk = _chunk_maker(rid, "text_completion", created, model, include_usage)

        async with aclosing(_merge(streams)) as merged:
            async for i, out in merged:
                usage.prompt[i] = len(out.prompt_token_ids)
                for c in out.outputs:
                    g = i * req.n + c.index
                    st = sent.get(g)
                    if st is None:
                        st = sent[g] = [0, 0, len(echo[i]), False]
                    if st[3]:
                        continue
                    delta, n_new = c.text[st[0]:], len(c.token_ids) - st[1]
                    if not delta and n_new <= 0 and c.finish_reason is None:
                        continue
                    if n_new > 0:
                        timer.on_tokens()
                    lp = choice_logprobs(c, st[1], st[2])
                    if lp:
                        st[2] += sum(len(t) for t in lp["tokens"])
                    text = (echo[i] if st[0] == 0 and st[1] == 0 else "") + delta
                    st[0], st[1] = len(c.text), len(c.token_ids)
                    st[3] = c.finish_reason is not None
                    usage.completion[g] = len(c.token_ids)
                    yield chunk([{"index": g, "text": text, "logprobs": lp,
                                  "finish_reason": c.finish_reason}])
        u = usage.dict()
        if include_usage:
            yield chunk([], u)
        timer.finish("ok", u["prompt_tokens"], u["completion_tokens"],
                     max(usage.completion.values(), default=0))

    # ---- /v1/chat/completions -----------------------------------------------------------
    async def chat(request: Request, timer: RequestTimer):
        req = _parse(P.ChatCompletionRequest, await _read_json(request, max_body_bytes))
        eng = engine()
        model = check_model(req.model)
        tok = eng.tokenizer
        if tok is None:
            raise APIError(400, "this model has no tokenizer; use /v1/completions with token ids",
                           param="messages")
        try:
            text = tok.apply_chat_template([m.to_template_dict() for m in req.messages],
                                           add_generation_prompt=True, tokenize=False)
        except Exception as e:  # missing template, template raise_exception(), bad roles...
            raise APIError(400, f"cannot apply the chat template: {e}", param="messages")
        # The template already contains BOS etc.; adding special tokens would double them.
        ids = tok.encode(text, add_special_tokens=False)
        max_tokens = req.requested_max_tokens
        param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        if max_tokens is None:
            max_tokens = eng.max_model_len - len(ids)
            if max_tokens < 1:
                _check_length(len(ids), 1, eng.max_model_len, "messages")
        _check_length(len(ids), max_tokens, eng.max_model_len, param)
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        params = _make_params(req.sampling_kwargs(max_tokens=max_tokens, logprobs=logprobs),
                              {"logprobs": "top_logprobs", "max_tokens": param})
        rid = P.random_id("chatcmpl")
        streams = await _submit(client, [ids], params, rid)
        texts = texts_for(tok)

        def choice_logprobs(c, start: int):
            return P.chat_logprobs((c.logprobs or [])[start:], texts) if req.logprobs else None

        if req.stream:
            return _sse_response(chat_events(req, rid, model, streams, choice_logprobs, timer),
                                 timer, streams)
        (final,) = await _until_disconnect(request, _collect(streams, timer))
        choices = [{"index": c.index, "message": {"role": "assistant", "content": c.text},
                    "logprobs": choice_logprobs(c, 0), "finish_reason": c.finish_reason}
                   for c in sorted(final.outputs, key=lambda c: c.index)]
        n_gen = [len(c.token_ids) for c in final.outputs]
        u = P.usage_dict(len(final.prompt_token_ids), sum(n_gen))
        timer.finish("ok", u["prompt_tokens"], u["completion_tokens"], max(n_gen, default=0))
        return P.chat_response(rid, model, choices, u)

    async def chat_events(req, rid, model, streams, choice_logprobs, timer):
        created = int(time.time())
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        sent: dict[int, list] = {}  # choice index -> [chars sent, tokens sent, finished]
        usage = _Usage()

        chunk = _chunk_maker(rid, "chat.completion.chunk", created, model, include_usage)

        for g in range(req.n):  # role first, as OpenAI does, before any token exists
            yield chunk([{"index": g, "delta": {"role": "assistant", "content": ""},
                          "logprobs": None, "finish_reason": None}])
        async with aclosing(_merge(streams)) as merged:
            async for _, out in merged:
                usage.prompt[0] = len(out.prompt_token_ids)
                for c in out.outputs:
                    st = sent.setdefault(c.index, [0, 0, False])
                    if st[2]:
                        continue
                    delta, n_new = c.text[st[0]:], len(c.token_ids) - st[1]
                    if n_new > 0:
                        timer.on_tokens()
                    if delta or n_new > 0:
                        yield chunk([{"index": c.index, "delta": {"content": delta},
                                      "logprobs": choice_logprobs(c, st[1]), "finish_reason": None}])
                    st[0], st[1] = len(c.text), len(c.token_ids)
                    usage.completion[c.index] = len(c.token_ids)
                    if c.finish_reason is not None:
                        st[2] = True
                        yield chunk([{"index": c.index, "delta": {}, "logprobs": None,
                                      "finish_reason": c.finish_reason}])
        u = usage.dict()
        if include_usage:
            yield chunk([], u)
        timer.finish("ok", u["prompt_tokens"], u["completion_tokens"],
                     max(usage.completion.values(), default=0))

    @app.post("/v1/completions")
    async def completions_route(request: Request):
        return await guarded(RequestTimer(metrics, "completions"), completions, request)

    @app.post("/v1/chat/completions")
    async def chat_route(request: Request):
        return await guarded(RequestTimer(metrics, "chat"), chat, request)

    return app


async def _collect(streams: list[RequestStream], timer: RequestTimer) -> list[Any]:
    """Final RequestOutput per stream (non-streaming responses)."""
    finals: list[Any] = [None] * len(streams)
    async with aclosing(_merge(streams)) as merged:
        async for i, out in merged:
            if out.outputs and any(c.token_ids for c in out.outputs):
                timer.on_tokens()
            if out.finished:
                finals[i] = out
    return finals
