"""The OpenAI-compatible FastAPI app over one `RelayEngine`, and `serve()` to run it with uvicorn."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import anyio
from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.types import Receive, Scope, Send

from relay_llm import Chunk, EngineConfig, RelayEngine, shared_engine
from relay_llm.loading import DEFAULT_MODEL_DIRNAME
from relay_llm.scheduler import QueueFull
from relay_llm.stats import RequestStats

from . import metrics as prom
from .convert import chat_kwargs, completion_kwargs, engine_messages, engine_prompt
from .errors import APIError, from_engine_error, install_handlers, queue_full
from .middleware import BearerAuth, BodyLimit, RequestMetrics
from .responses import ChatShape, CompletionShape, Shape
from .schemas import (
    ChatCompletion,
    ChatCompletionRequest,
    Completion,
    CompletionRequest,
    ErrorResponse,
    Health,
    ModelCard,
    ModelList,
)
from .streaming import ChunkPump, ClientDisconnected, collect, sse_events

log = logging.getLogger("relay_server")

DEFAULT_MAX_BODY_BYTES = 4 << 20
DEFAULT_MAX_TOKENS = 512  # when a request sets no max_tokens (clamped to the context left)


@dataclass
class ServerState:
    engine: RelayEngine
    model_id: str
    aliases: frozenset[str]
    default_max_tokens: int
    metrics: prom.Metrics = field(default_factory=prom.Metrics)
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def system_fingerprint(self) -> str:
        return f"fp_{self.engine.fingerprint.weights[:12]}"

    def resolve_model(self, name: str | None) -> str:
        if name is None or name in self.aliases:
            return self.model_id
        raise APIError(404, f"The model {name!r} does not exist on this server; it serves {self.model_id!r}.",
                       code="model_not_found", param="model")

    def start(self, prompt: list[dict] | str | list[int], max_tokens: int | None, kwargs: dict) -> Iterator[Chunk]:
        """Tokenise, pick max_new_tokens, and queue the generation (blocking: call from a thread)."""
        engine = self.engine
        try:
            is_chat = isinstance(prompt, list) and bool(prompt) and isinstance(prompt[0], dict)
            ids = engine.render(prompt, kwargs.get("tools"), kwargs.get("tool_choice")) if is_chat else engine.encode(
                prompt)
            if max_tokens is None:
                max_tokens = max(1, min(self.default_max_tokens, engine.max_context - len(ids)))
            return engine.stream(ids, max_new_tokens=max_tokens, **kwargs)
        except (ValueError, TypeError) as exc:  # bad input; TypeError: e.g. a relay setting of the wrong type
            raise from_engine_error(exc) from None
        except QueueFull as exc:
            raise queue_full(exc) from None


class EventStream(StreamingResponse):
    """An SSE response that runs `on_close` however it ends (finished, client gone, or never started)."""

    def __init__(self, content, on_close: Callable[[], None]):
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


async def generate(request: Request, state: ServerState, prompt: list[dict] | str | list[int],
                   max_tokens: int | None, kwargs: dict, shape: Shape, stream: bool) -> Response:
    """Run one generation: a JSON response, or an SSE stream when `stream`."""
    chunks = await anyio.to_thread.run_sync(state.start, prompt, max_tokens, kwargs)
    state.metrics.generation_started()
    pump = ChunkPump(chunks)
    ended = False

    def end(stats: RequestStats | None) -> None:
        nonlocal ended
        if not ended:
            ended = True
            state.metrics.generation_ended(stats)

    if stream:
        def on_close() -> None:
            pump.cancel()
            end(None)  # a no-op when the finish chunk was sent

        events = sse_events(pump, request, shape, on_finish=lambda chunk: end(chunk.stats))
        return EventStream(events, on_close)
    try:
        text, last = await collect(pump, request)
    except ClientDisconnected:
        end(None)
        return Response(status_code=499)  # nobody reads it: nginx's "client closed request"
    except BaseException as exc:
        end(None)
        if isinstance(exc, ValueError):
            raise from_engine_error(exc) from None
        raise
    end(last.stats)
    return JSONResponse(shape.full(text, last.finish_reason, last.stats, tool_calls=last.tool_calls,
                                   logprobs=last.logprobs))


def _errors(*statuses: int) -> dict:
    """OpenAPI declarations of the OpenAI-shaped error bodies a route can return ("4XX" stands for the rest,
    and keeps FastAPI from declaring a 422 that the app never sends: validation errors are 400s)."""
    described = {400: "invalid request (malformed body, bad value, prompt over the context)",
                 401: "missing or wrong API key (when the server has one)", 404: "unknown model or path",
                 413: "request body too large", 429: "the engine's queue is full: retry after `Retry-After` seconds"}
    out: dict = {s: {"model": ErrorResponse, "description": described[s]} for s in statuses}
    out["4XX"] = {"model": ErrorResponse, "description": "another client error"}
    return out


def _generation(model: type) -> dict:
    """A generation route's 200: JSON, or an SSE stream of chunks when the request sets `stream`."""
    # Before OpenAPI 3.2 an event stream's `schema` describes each event: {"data", "event", "id", "retry"}.
    sse = {"schema": {"type": "object", "required": ["data"], "properties": {"data": {"type": "string"}},
                      "description": "one event: `data: {chunk}`; the last is `data: [DONE]`"}}
    return {200: {"model": model, "description": "the completion; an SSE stream when `stream` is true",
                  "content": {"text/event-stream": sse}}, **_errors(400, 401, 404, 413, 429)}


def _model_card(state: ServerState) -> dict:
    return {"id": state.model_id, "object": "model", "created": state.created, "owned_by": "relay-llm"}


def create_app(engine_or_model: RelayEngine | str = "default", *, api_key: str | None = None,
               model_id: str | None = None, dtype: str = "auto", device: str = "auto",
               max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, default_max_tokens: int = DEFAULT_MAX_TOKENS,
               config: EngineConfig | None = None) -> FastAPI:
    """The OpenAI-compatible app.

    engine_or_model: a loaded `RelayEngine`, or a model name for `shared_engine` ("default", an HF folder,
    a .gguf file). model_id: the name served in /v1/models and accepted in requests (the model name given,
    its folder name, and for "default" also the packaged model's name, are accepted too).
    api_key: if set, every request except /health needs `Authorization: Bearer <api_key>`. config: the
    engine's settings (batch size, queue, budgets) when a model name is given and loaded here.
    """
    given = engine_or_model if isinstance(engine_or_model, str) else None
    engine = shared_engine(given, dtype=dtype, device=device, config=config) if given else engine_or_model
    folder = Path(engine.model_name).name if engine.model_name else ""  # "gemma-3-270m" for "default"
    served = model_id or (Path(given).name if given and given != "default" else folder) or "relay"
    names = {served, folder, given or ""} | ({"default"} if folder == DEFAULT_MODEL_DIRNAME else set())
    names.discard("")
    state = ServerState(engine, served, frozenset(names), default_max_tokens)

    app = FastAPI(title="relay-llm", version="0.1.0",
                  description="OpenAI-compatible API over a local LLM that reuses the KV cache of its own outputs.")
    app.state.relay = state
    install_handlers(app)

    @app.post("/v1/chat/completions", response_model=None, responses=_generation(ChatCompletion))
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        model = state.resolve_model(body.model)
        kwargs = chat_kwargs(body)
        messages = engine_messages(body.messages)
        include_usage = bool(body.stream and body.stream_options and body.stream_options.include_usage)
        shape = ChatShape(model=model, system_fingerprint=state.system_fingerprint, include_usage=include_usage)
        max_tokens = body.max_completion_tokens or body.max_tokens
        return await generate(request, state, messages, max_tokens, kwargs, shape, bool(body.stream))

    @app.post("/v1/completions", response_model=None, responses=_generation(Completion))
    async def completions(body: CompletionRequest, request: Request) -> Response:
        model = state.resolve_model(body.model)
        kwargs = completion_kwargs(body)
        prompt = engine_prompt(body)
        include_usage = bool(body.stream and body.stream_options and body.stream_options.include_usage)
        shape = CompletionShape(model=model, system_fingerprint=state.system_fingerprint, include_usage=include_usage)
        return await generate(request, state, prompt, body.max_tokens, kwargs, shape, bool(body.stream))

    @app.get("/v1/models", response_model=ModelList, responses=_errors(401))
    async def list_models() -> dict:
        return {"object": "list", "data": [_model_card(state)]}

    @app.get("/v1/models/{model:path}", response_model=ModelCard, responses=_errors(401, 404))
    async def get_model(model: str) -> dict:
        state.resolve_model(model)
        return _model_card(state)

    @app.get("/health", response_model=Health)
    async def health() -> dict:
        return {"status": "ok", "model": state.model_id, "generations_in_flight": state.metrics.in_flight}

    @app.get("/metrics", response_class=PlainTextResponse, responses={
        200: {"description": "Prometheus text exposition format", "content": {prom.CONTENT_TYPE: {}}},
        **_errors(401)})
    async def metrics() -> PlainTextResponse:
        store = state.engine.store
        text = state.metrics.render(store.stats, state.engine.prefix_cache.bytes, state.engine.load_stats(),
                                    shared=getattr(store, "shared", None))
        return PlainTextResponse(text, media_type=prom.CONTENT_TYPE)

    known = frozenset(getattr(r, "path", "") for r in app.routes)
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)
    if api_key:
        app.add_middleware(BearerAuth, api_key=api_key)
    app.add_middleware(RequestMetrics, metrics=state.metrics, known_paths=known)
    return app


def serve(model: str = "default", host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          dtype: str = "auto", device: str = "auto", model_id: str | None = None, log_level: str = "info",
          max_batch: int = 8, max_queue: int = 64, store_url: str | None = None) -> None:
    """Load `model` and serve the OpenAI-compatible API with uvicorn until interrupted (loopback by default).

    api_key: None reads `RELAY_LLM_API_KEY` from the environment (unset or empty: no authentication).
    store_url: "redis://host:port/db" shares the segment store with every replica on that Redis.
    """
    import uvicorn

    engine_log = logging.getLogger("relay_llm")  # the engine's own lines (kernels, shared store) beside uvicorn's
    if not engine_log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s:     %(message)s"))
        engine_log.addHandler(handler)
        engine_log.setLevel(logging.INFO)
    api_key = api_key if api_key is not None else os.environ.get("RELAY_LLM_API_KEY") or None
    app = create_app(model, api_key=api_key, dtype=dtype, device=device, model_id=model_id,
                     config=EngineConfig(max_batch=max_batch, max_queue=max_queue, store_url=store_url))
    log.info("serving %s on http://%s:%d/v1", app.state.relay.model_id, host, port)
    uvicorn.run(app, host=host, port=port, log_level=log_level)
