"""The swarm behind OpenAI's HTTP API (FastAPI): ``/v1/models``, ``/v1/completions``, ``/v1/chat/completions``.

Generation blocks (gRPC streams, torch), so it runs in a pool of worker threads and the event
loop only moves bytes; a streamed request's worker posts each new piece of text to the loop,
and a client that goes away cancels its generation at the next token, which closes its
sessions on the servers. A stream answers with its HTTP status only once the first token (or
the first error) is known, so a swarm that cannot serve the request gets a real 503.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from fedswarm.client.swarm import openai_schema as oa
from fedswarm.client.swarm.api_errors import ApiError, from_exception, from_validation, unauthorized
from fedswarm.client.swarm.metrics import ApiMetrics
from fedswarm.client.swarm.sampling import Sampling
from fedswarm.client.swarm.service import SwarmService, Target
from fedswarm.client.swarm.textgen import TextResult, chat_prompt, encode
from fedswarm.common.errors import FedswarmError

log = logging.getLogger("fedswarm.swarm.api")

RequestT = TypeVar("RequestT", bound=BaseModel)


@dataclass
class ApiState:
    """What every route shares."""

    service: SwarmService
    metrics: ApiMetrics
    pool: ThreadPoolExecutor  # generations run here, --concurrency at a time, off the event loop
    api_keys: tuple[str, ...] = ()  # bearer tokens applications may send; none lets every request in
    default_max_tokens: int = 256  # for requests that give no max_tokens (cut to what the context leaves)


@dataclass
class Job:
    """A validated request, ready to generate."""

    target: Target
    prompt_ids: list[int]
    max_tokens: int
    sampling: Sampling
    stop: list[str]
    endpoint: str  # "completions" or "chat.completions"
    arrived: float  # time.perf_counter() when the request came in


def build_app(state: ApiState) -> FastAPI:
    app = FastAPI(title="fedswarm swarm API", docs_url=None, redoc_url=None, openapi_url=None)
    v1 = APIRouter(prefix="/v1", dependencies=[Depends(_authorize(state.api_keys))])

    @v1.get("/models")
    async def models() -> oa.ModelList:
        offered = await _run(state, state.service.models)
        return oa.ModelList(data=[_card(target) for target in offered.values()])

    @v1.post("/completions", response_model=None)
    async def completions(request: Request) -> Response:
        arrived = time.perf_counter()
        body = await _parse(request, oa.CompletionRequest)
        job = await _run(state, lambda: _completion_job(state, body, arrived))
        if body.stream:
            return await _stream(state, job, _CompletionChunks(job, body.include_usage))
        result = await _run(state, lambda: _generate(state, job), generation=True)
        choice = oa.CompletionChoice(text=result.text, finish_reason=result.finish_reason)
        return _json(oa.CompletionResponse(
            id=oa.new_id("cmpl"), created=oa.now(), model=job.target.name, choices=[choice], usage=_usage(result)
        ))  # fmt: skip

    @v1.post("/chat/completions", response_model=None)
    async def chat_completions(request: Request) -> Response:
        arrived = time.perf_counter()
        body = await _parse(request, oa.ChatCompletionRequest)
        job = await _run(state, lambda: _chat_job(state, body, arrived))
        if body.stream:
            return await _stream(state, job, _ChatChunks(job, body.include_usage))
        result = await _run(state, lambda: _generate(state, job), generation=True)
        message = oa.AssistantMessage(content=result.text)
        return _json(oa.ChatCompletionResponse(
            id=oa.new_id("chatcmpl"), created=oa.now(), model=job.target.name,
            choices=[oa.ChatChoice(message=message, finish_reason=result.finish_reason)], usage=_usage(result),
        ))  # fmt: skip

    app.include_router(v1)

    @app.get("/metrics")
    async def metrics() -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        text = await _run(state, lambda: generate_latest(state.metrics.registry))
        return Response(text, media_type=CONTENT_TYPE_LATEST)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    def answer(error: ApiError) -> JSONResponse:
        state.metrics.errors.labels(error.kind).inc()
        headers = {"WWW-Authenticate": "Bearer"} if error.status == 401 else None
        return JSONResponse(error.body(), status_code=error.status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        return answer(from_validation(exc.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = "invalid_route" if exc.status_code in (404, 405) else "invalid_request"
        return answer(ApiError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", code=code))

    @app.exception_handler(ApiError)
    @app.exception_handler(FedswarmError)
    @app.exception_handler(Exception)  # the last resort: Starlette logs these as unhandled, the others not
    async def failed(_request: Request, exc: Exception) -> JSONResponse:
        error = from_exception(exc)
        if error.status >= 500 and error.code == "internal_error":
            log.error("request failed", exc_info=exc)
        return answer(error)

    return app


def _authorize(keys: tuple[str, ...]) -> Callable[[Request], None]:
    def check(request: Request) -> None:
        if not keys:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            raise unauthorized("missing bearer token: send 'Authorization: Bearer <an API key>'")
        matches = [hmac.compare_digest(given.strip().encode(), key.encode()) for key in keys]  # no early exit
        if not any(matches):
            raise unauthorized("invalid API key")

    return check


async def _parse(request: Request, schema: type[RequestT]) -> RequestT:
    """The body as ``schema``, whatever its content type (curl's ``-d`` sends a form type)."""
    raw = await request.body()
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"the body is not valid JSON ({exc})", code="invalid_json") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the body must be a JSON object", code="invalid_request")
    try:
        return schema.model_validate(data)
    except ValidationError as exc:
        raise from_validation(exc.errors(include_url=False)) from None


async def _run(state: ApiState, call: Callable[[], Any], generation: bool = False) -> Any:
    """``call`` in a worker thread: a generation in the pool of ``--concurrency`` workers, anything
    else (registry reads, tokenizing, a scrape) in the loop's default pool, so a busy swarm still
    answers /metrics and /v1/models."""
    return await asyncio.get_running_loop().run_in_executor(state.pool if generation else None, call)


def _json(payload: oa.BaseModel) -> JSONResponse:
    return JSONResponse(payload.model_dump(mode="json"))


def _card(target: Target) -> oa.ModelCard:
    return oa.ModelCard(id=target.name, root=target.model_id, parent=target.model_id if target.adapter else None)


def _usage(result: TextResult) -> oa.Usage:
    return oa.Usage.of(result.prompt_tokens, result.completion_tokens)


# Preparing a job (in a worker: it reads the registry and tokenizes)


def _completion_job(state: ApiState, body: oa.CompletionRequest, arrived: float) -> Job:
    body.check_supported()
    target = state.service.resolve(body.model)
    tokenizer = state.service.runtime(target.model_id).tokenizer
    prompt = body.prompt_text_or_ids()
    ids = encode(tokenizer, prompt) if isinstance(prompt, str) else _check_ids(state, target, prompt)
    return _job(state, body, target, ids, "completions", arrived)


def _chat_job(state: ApiState, body: oa.ChatCompletionRequest, arrived: float) -> Job:
    body.check_supported()
    target = state.service.resolve(body.model)
    tokenizer = state.service.runtime(target.model_id).tokenizer
    text = chat_prompt(tokenizer, [m.as_template_message() for m in body.messages])
    return _job(state, body, target, encode(tokenizer, text), "chat.completions", arrived)


def _job(state: ApiState, body: Any, target: Target, ids: list[int], endpoint: str, arrived: float) -> Job:
    runtime = state.service.runtime(target.model_id)
    max_tokens = state.service.check_length(runtime, ids, body.token_limit(), state.default_max_tokens)
    sampling = Sampling(body.temperature, body.top_p, body.seed)
    job = Job(target, ids, max_tokens, sampling, body.stop_strings(), endpoint, arrived)
    state.metrics.requests.labels(target.model_id, target.adapter, endpoint).inc()
    return job


def _check_ids(state: ApiState, target: Target, ids: list[int]) -> list[int]:
    from fedswarm.common.errors import InputError

    vocab = state.service.runtime(target.model_id).head.embed_tokens.num_embeddings
    bad = [t for t in ids if not 0 <= t < vocab]
    if bad:
        raise InputError(f"prompt: token id {bad[0]} is outside the vocabulary (0..{vocab - 1})")
    return ids


# Running a job


def _generate(state: ApiState, job: Job, on_text: Callable[[str], bool | None] | None = None) -> TextResult:
    """One generation in a worker thread, with its metrics."""
    m, target = state.metrics, job.target
    m.active_requests.inc()
    try:
        result = state.service.generate(target, job.prompt_ids, job.max_tokens, job.sampling, job.stop, on_text)
    finally:
        m.active_requests.dec()
    m.prompt_tokens.labels(target.model_id, target.adapter).inc(result.prompt_tokens)
    m.completion_tokens.labels(target.model_id, target.adapter).inc(result.completion_tokens)
    m.observe_tokens(target.model_id, target.adapter, job.arrived, result.token_times)
    return result


class _CompletionChunks:
    """``text_completion`` chunks of one streamed completion."""

    def __init__(self, job: Job, include_usage: bool) -> None:
        self.id, self.created, self.model = oa.new_id("cmpl"), oa.now(), job.target.name
        self.include_usage = include_usage

    def start(self) -> list[str]:
        return []

    def text(self, delta: str, finish_reason: str | None = None) -> str:
        choice = oa.CompletionChoice(text=delta, finish_reason=finish_reason)
        return oa.sse(oa.CompletionResponse(id=self.id, created=self.created, model=self.model, choices=[choice]))

    def end(self, result: TextResult) -> list[str]:
        chunks = [self.text("", result.finish_reason)]
        if self.include_usage:
            usage = _usage(result)
            chunks.append(
                oa.sse(
                    oa.CompletionResponse(id=self.id, created=self.created, model=self.model, choices=[], usage=usage)
                )
            )
        return chunks


class _ChatChunks:
    """``chat.completion.chunk`` chunks of one streamed chat completion."""

    def __init__(self, job: Job, include_usage: bool) -> None:
        self.id, self.created, self.model = oa.new_id("chatcmpl"), oa.now(), job.target.name
        self.include_usage = include_usage

    def _chunk(self, choices: list[oa.ChatChunkChoice], usage: oa.Usage | None = None) -> str:
        chunk = oa.ChatCompletionChunk(id=self.id, created=self.created, model=self.model, choices=choices, usage=usage)
        return oa.sse(chunk)

    def start(self) -> list[str]:
        return [self._chunk([oa.ChatChunkChoice(delta=oa.Delta(role="assistant", content=""))])]

    def text(self, delta: str) -> str:
        return self._chunk([oa.ChatChunkChoice(delta=oa.Delta(content=delta))])

    def end(self, result: TextResult) -> list[str]:
        chunks = [self._chunk([oa.ChatChunkChoice(delta=oa.Delta(), finish_reason=result.finish_reason)])]
        if self.include_usage:
            chunks.append(self._chunk([], _usage(result)))
        return chunks


_DONE = object()  # the worker finished (its future holds the result or the error)


async def _stream(state: ApiState, job: Job, chunks: _CompletionChunks | _ChatChunks) -> Response:
    """Server-sent events: the chunks as text comes, the final chunk(s), then ``[DONE]``."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[Any] = asyncio.Queue()
    cancelled = threading.Event()  # set when the client is gone: the worker stops at the next token

    def on_text(delta: str) -> bool:
        loop.call_soon_threadsafe(queue.put_nowait, delta)
        return cancelled.is_set()

    future = loop.run_in_executor(state.pool, lambda: _generate(state, job, on_text))
    future.add_done_callback(lambda _f: queue.put_nowait(_DONE))
    first = await queue.get()
    if first is _DONE:
        future.result()  # an error before any text: a real HTTP status (the exception handlers answer it)

    async def events() -> AsyncIterator[str]:
        item = first
        try:
            for chunk in chunks.start():
                yield chunk
            while item is not _DONE:
                yield chunks.text(item)
                item = await queue.get()
            try:
                result = future.result()
            except Exception as exc:  # noqa: BLE001 (after the 200: the error goes in the stream)
                error = from_exception(exc)
                state.metrics.errors.labels(error.kind).inc()
                yield oa.sse(error.body())
            else:
                for chunk in chunks.end(result):
                    yield chunk
            yield oa.DONE
        finally:
            cancelled.set()

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
