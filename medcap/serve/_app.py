"""The HTTP side: OpenAI's chat-completions API over the batching worker.

    POST /v1/chat/completions   (stream: server-sent events, one per new token)
    GET  /v1/models
    GET  /health                (no key needed: for load balancers)
    /                           the web page (``_page``), when mounted

In order: ``ServeState`` (the loaded model; ``prepare`` turns a checked request into a
worker ``Job``), the life of a queued job (``queue_job``, ``follow_job``, ``TextStream``),
the door (the API key, the content type, ``BodyLimit``), ``create_app`` and its routes,
the event stream. Every failure a client can cause is an :class:`APIError` answered as
4xx JSON; the worker thread never sees an unchecked request (``_request`` checks it).
Image decoding runs in the thread pool, not on the event loop, so one large image does
not stall other clients. ``_access.AccessLog`` writes each request's log line and answers
an unexpected exception; the CORS policy allows no origin (``_no_cross_origin``).
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
import uuid
from dataclasses import dataclass
from typing import Any, AsyncIterator, Dict, List, Optional

from fastapi import Request  # at module level: FastAPI reads the handlers' annotations from here

from medcap.serve._access import AccessLog, note
from medcap.serve._request import (
    APIError,
    ChatRequest,
    Limits,
    check_content_type,
    load_image_bytes,
    parse_chat_request,
)
from medcap.serve._worker import BatchWorker, Job, QueueFull

RETRY_AFTER_S = "2"
_POLL_S = 0.25  # how often a waiting request checks its client and its deadline


# ---- the loaded model, and a request made ready for it


@dataclass
class Prepared:
    """A request ready for the worker, and the image as the model sees it (for the page)."""

    job: Job
    seen_image: Any  # PIL image after resize + crop, or None


class ServeState:
    """The loaded model and everything a request is checked against."""

    def __init__(self, engine, *, limits: Limits, model_name: str, cache_len: int, default_max_tokens: int,
                 api_key: Optional[str] = None, examples: Optional[List[str]] = None, worker_class=BatchWorker):
        from medcap.data import image_transform

        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.limits = limits
        self.model_name = model_name
        self.cache_len = min(int(cache_len), int(engine.model.decoder.max_seq_len))
        self.default_max_tokens = int(default_max_tokens)
        self.api_key = api_key
        self.examples = list(examples or [])
        self.image_size = int(engine.model.vision.visual.image_size)
        self.transform = image_transform(self.image_size)
        # BatchWorker drives medcap's engine; _vllm_worker.VllmWorker forwards to vLLM (--backend vllm)
        self.worker = worker_class(engine, cache_len=self.cache_len, queue_size=limits.queue_size)
        self.created = int(time.time())
        self.access_counts: Dict[str, int] = {}  # kept by the access log: "cut" by a shutdown

    def prepare(self, req: ChatRequest) -> Prepared:
        """Image decoded and preprocessed, prompt built, budget checked (blocking: run in a thread)."""
        from medcap.data import resize_center_crop

        image = seen = None
        if req.image is not None:
            pil = load_image_bytes(*req.image, max_pixels=self.limits.max_image_pixels)
            image = self.transform(pil)  # [3, S, S]
            seen = resize_center_crop(pil, self.image_size)
        try:
            prompt = self.engine.prompt(req.messages, has_image=image is not None)
        except ValueError as e:
            raise APIError(400, f"messages: {e}", param="messages") from None
        room = self.cache_len - len(prompt)
        if req.max_tokens is None:
            budget = min(self.default_max_tokens, room)
            if budget < 1:
                raise APIError(400, f"the prompt is {len(prompt)} tokens, over the model's context of "
                               f"{self.cache_len} tokens (prompt + answer)", param="messages",
                               code="context_length_exceeded")
        else:
            budget = req.max_tokens
            if budget > room:
                raise APIError(400, f"the prompt ({len(prompt)} tokens) plus max_tokens ({budget}) exceeds the "
                               f"model's context of {self.cache_len} tokens", param="messages",
                               code="context_length_exceeded")
        temperature = self.engine.temperature if req.temperature is None else req.temperature
        top_k = self.engine.top_k if req.top_k is None else req.top_k
        greedy = temperature <= 0 or top_k == 1
        setting = (0.0, None) if greedy else (float(temperature), top_k)
        return Prepared(Job(prompt, image, budget, setting, seed=req.seed), seen)

    def text(self, tokens: List[int]) -> str:
        from medcap.generation import decode_text

        return decode_text(self.tokenizer, tokens)


# ---- a job in the worker's queue


def queue_job(state: ServeState, job: Job) -> asyncio.Event:
    """Queue ``job`` (503 when the queue is full); the event is set at each change."""
    loop = asyncio.get_running_loop()
    changed = asyncio.Event()
    job.notify = lambda _j: loop.call_soon_threadsafe(changed.set)
    try:
        state.worker.submit(job)
    except QueueFull as e:
        raise APIError(503, f"the server is busy: {e}; retry shortly", code="queue_full",
                       headers={"Retry-After": RETRY_AFTER_S}) from None
    return changed


async def follow_job(state: ServeState, job: Job, changed: asyncio.Event, is_gone=None) -> AsyncIterator[Job]:
    """Yield the queued ``job`` after every change until it is done; cancels it when
    the caller stops iterating, when ``is_gone()`` (async) says the client left, or at
    the request timeout."""
    deadline = time.monotonic() + state.limits.request_timeout_s
    try:
        while not job.done:
            try:
                await asyncio.wait_for(changed.wait(), timeout=_POLL_S)
            except asyncio.TimeoutError:
                if is_gone is not None and await is_gone():  # checked when nothing happened for a while
                    return
            changed.clear()
            if time.monotonic() > deadline:
                raise APIError(504, f"the request took longer than {state.limits.request_timeout_s:g} s "
                               "(--request-timeout)", code="timeout")
            if job.error:
                raise APIError(500, job.error)
            yield job
        if job.error:
            raise APIError(500, job.error)
        yield job
    finally:
        if not job.done:
            job.cancel()
            state.worker.wake()


class TextStream:
    """Tokens so far -> the new text to send; text is held back while it ends in a
    partly decoded character, so the pieces add up to the final answer."""

    def __init__(self, state: ServeState):
        self.state, self.sent = state, ""

    def delta(self, tokens: List[int], final: bool = False) -> str:
        text = self.state.text(tokens)
        if (not final and text.endswith("\ufffd")) or not text.startswith(self.sent):
            return ""
        new, self.sent = text[len(self.sent):], text
        return new


# ---- the door: the API key, the body's size


def _auth(state: ServeState, request) -> None:
    if not state.api_key:
        return
    given = request.headers.get("authorization", "")
    scheme, _, token = given.partition(" ")
    if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), state.api_key.encode()):
        raise APIError(401, "a valid API key is needed: send 'Authorization: Bearer KEY'", code="invalid_api_key",
                       headers={"WWW-Authenticate": "Bearer"})


class BodyLimit:
    """ASGI middleware: a request body over ``limit`` bytes is answered 413 before it is
    read whole (by its Content-Length, or while it streams in)."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, int(limit)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await self._drain(receive)
            return await self._refuse(send)
        seen = 0
        started = False

        async def counted():
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.limit:
                    raise _TooLarge()
            return msg

        async def tracked_send(msg):
            nonlocal started
            started = started or msg["type"] == "http.response.start"
            await send(msg)

        try:
            await self.app(scope, counted, tracked_send)
        except _TooLarge:
            if not started:
                await self._drain(receive)
                await self._refuse(send)

    async def _drain(self, receive) -> None:
        """Read and drop the rest of a refused body, up to a few times the limit, so that
        a client still sending reads the 413 instead of a reset connection."""
        dropped = 0
        while dropped <= 4 * self.limit:
            msg = await receive()
            if msg["type"] != "http.request" or not msg.get("more_body"):
                return
            dropped += len(msg.get("body", b""))

    async def _refuse(self, send):
        body = json.dumps(APIError(413, f"the request body is over this server's limit of {self.limit:,} bytes "
                                        "(--max-body-bytes)").body()).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})


class _TooLarge(Exception):
    pass


# ---- the app and its routes


def create_app(state: ServeState, *, page: bool = True, access_log: bool = True):
    """The FastAPI app (the worker is started and stopped with it)."""
    from fastapi import FastAPI

    app = FastAPI(title="medcap", lifespan=_lifespan(state), docs_url=None, redoc_url=None, openapi_url=None)
    app.add_exception_handler(APIError, _api_error)
    app.include_router(_routes(state))
    app.add_middleware(BodyLimit, limit=state.limits.max_body_bytes)
    app.add_middleware(AccessLog, enabled=access_log, counts=state.access_counts)  # outside the body limit
    _no_cross_origin(app)
    if page:
        from medcap.serve._page import mount_page

        app = mount_page(app, state)
    return app


def _no_cross_origin(app) -> None:
    """No origin is allowed to read answers: a CORS policy with an empty origin list, which
    also stops the page (Gradio, which allows localhost origins with credentials unless its
    parent app has a ``CORSMiddleware``) from answering cross-origin requests."""
    from starlette.middleware.cors import CORSMiddleware

    app.add_middleware(CORSMiddleware, allow_origins=[])


def _lifespan(state: ServeState):
    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(_app):
        state.worker.start()
        try:
            yield
        finally:
            state.worker.stop()

    return lifespan


async def _api_error(request, e: APIError):
    from fastapi.responses import JSONResponse

    note(request, error=e.message)
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


def _routes(state: ServeState):
    """``/health``, ``/v1/models`` and ``/v1/chat/completions`` over ``state``."""
    from fastapi import APIRouter
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.concurrency import run_in_threadpool

    router = APIRouter()

    @router.get("/health")
    async def health():
        return {"status": "ok", "model": state.model_name, **state.worker.load()}

    @router.get("/v1/models")
    async def models(request: Request):
        _auth(state, request)
        return {"object": "list", "data": [{"id": state.model_name, "object": "model", "created": state.created,
                                            "owned_by": "medcap"}]}

    @router.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        _auth(state, request)
        check_content_type(request.headers.get("content-type"))
        req = parse_chat_request(await request.body(), state.limits, state.model_name)
        prepared = await run_in_threadpool(state.prepare, req)
        job = prepared.job
        note(request, usage=lambda: (len(job.prompt), len(job.tokens)))
        cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        job.each_token = req.stream
        changed = queue_job(state, job)  # before answering 200, so a full queue is a 503 for streams too
        if req.stream:
            return StreamingResponse(_stream(state, job, changed, req, cid, created),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        async for _ in follow_job(state, job, changed, is_gone=request.is_disconnected):
            pass
        if not job.done:  # the client left
            note(request, error="the client disconnected while its answer was made")
            return JSONResponse({"error": {"message": "client disconnected"}}, status_code=499)
        return {"id": cid, "object": "chat.completion", "created": created, "model": state.model_name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": state.text(job.tokens)},
                             "finish_reason": job.finish_reason}], "usage": _usage(job)}

    return router


def _usage(job: Job) -> Dict[str, int]:
    return {"prompt_tokens": len(job.prompt), "completion_tokens": len(job.tokens),
            "total_tokens": len(job.prompt) + len(job.tokens)}


# ---- the event stream


async def _stream(state: ServeState, job: Job, changed: asyncio.Event, req: ChatRequest, cid: str, created: int):
    """Server-sent events: the role, then one chunk per new token's text (however many
    tokens the batcher made since the last wake-up), the finish reason, usage when
    asked, ``[DONE]``. A client that leaves cancels the job (the
    response task is cancelled, ``follow_job``'s cleanup runs)."""

    def chunk(delta: Dict[str, Any], finish: Optional[str] = None, **extra) -> str:
        body = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": state.model_name,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **extra}
        return f"data: {json.dumps(body)}\n\n"

    text = TextStream(state)
    yield chunk({"role": "assistant", "content": ""})
    try:
        sent = 0
        async for j in follow_job(state, job, changed):
            tokens = list(j.tokens)
            for n in range(sent + 1, len(tokens) + 1):  # one chunk per token, never a lump
                piece = text.delta(tokens[:n])
                if piece:
                    yield chunk({"content": piece})
            sent = len(tokens)
        piece = text.delta(list(job.tokens), final=True)  # what a partial character held back
        if piece:
            yield chunk({"content": piece})
    except APIError as e:
        yield f"data: {json.dumps(e.body())}\n\n"
        return
    yield chunk({}, job.finish_reason)
    if req.include_usage:
        body = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": state.model_name,
                "choices": [], "usage": _usage(job)}
        yield f"data: {json.dumps(body)}\n\n"
    yield "data: [DONE]\n\n"
