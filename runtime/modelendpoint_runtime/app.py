"""The FastAPI app: routes, the guard middleware, health, metrics and lifecycle.

Generation itself is vLLM's ``OpenAIServingChat`` / ``OpenAIServingCompletion``
(``Engine.state``); this module decides whether a request reaches them and
shapes whatever comes back:

* one pure-ASGI middleware (``Guard``) per request: auth, body-size limit,
  request metrics and the JSON request log line, and the METRICS_PORT
  listener's routes (``/metrics``, ``/health``, ``/ready``, no key). Pure ASGI
  rather than Starlette's BaseHTTPMiddleware, which would re-buffer streamed
  responses and add latency to every token;
* routes under ``/openai/v1``, ``/v1`` and ``/v2/{endpoint_id}/openai/v1``:
  the guide's chat and text completions and models, and the APIs of
  ``apis.APIS`` (Responses, Anthropic Messages, embeddings, score, rerank,
  classify, tokenize, detokenize), each vLLM's own serving object;
* every error in OpenAI's shape (``errors.APIError``), never FastAPI's 422;
  on the Messages routes in Anthropic's (``errors.anthropic_body``);
* model names: the served one, and the LoRA adapters of ADAPTERS_FILE once
  loaded (``adapters.Adapters``, reported on ``GET /adapters``);
* a generation request is read (within READ_TIMEOUT_SECONDS, else 408) and
  checked whole before it takes an admission slot, so slow or invalid
  clients hold none; admission counts sequences (``limits.sequences``);
* readiness that turns 503 during a drain, or while API keys are unusable.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from . import apis, errors
from .adapters import FAILED, LOADING, Adapters
from .admission import Admission
from .apis import APIS, Api, dialect_of, usage_of
from .auth import PUBLIC_PATHS, KeyRing, bearer_token, key_matches, watch_key_file
from .errors import OPENAI, APIError, clip
from .limits import (
    Limits,
    Plan,
    check_caps,
    check_model,
    check_shape,
    echo_prompts,
    logprobs_for_ranking,
    prepend_echo,
    prompt_logprobs_param,
    rank_choices,
    sequences,
    trim_choices,
)
from .logs import LOGGER_NAME, request_fields
from .metrics import Metrics
from .server import INFO_KEY, READ_DEADLINE
from .settings import ConfigError, RuntimeSettings
from .streaming import MEDIA_TYPES, EventStream, Reframer, choose_format, is_token_frame, mirror_reasoning

PREFIXES = ("/openai/v1", "/v1", "/v2/{endpoint_id}/openai/v1")
_KNOWN_ROUTES = frozenset(
    [p + s for p in PREFIXES for s in (*(api.suffix for api in APIS.values()), "/models")]
    + ["/health", "/ready", "/metrics", "/adapters"]
)
_INFO = INFO_KEY  # scope key where a handler leaves details for the log line
_ROUTE = "modelendpoint.route"  # scope key: the request's route label, computed once by Guard
# What the METRICS_PORT listener serves (without a key).
METRICS_PORT_PATHS = frozenset({"/metrics", "/health", "/ready", "/adapters"})

log = logging.getLogger(LOGGER_NAME)


def route_label(path: str) -> str:
    """A low-cardinality label for a path: its route template, or ``other``."""
    if path.startswith("/v2/"):
        parts = path.split("/", 3)  # "", "v2", id, rest
        if len(parts) == 4:
            path = "/v2/{endpoint_id}/" + parts[3]
    if path in _KNOWN_ROUTES:
        return path
    for prefix in PREFIXES:
        if path.startswith(prefix + "/models/"):
            return prefix + "/models/{model}"
    return "other"


class BodyTooLarge(Exception):
    pass


class Runtime:
    """Everything the routes share: settings, engine, admission, metrics."""

    def __init__(
        self, settings: RuntimeSettings, metrics: Metrics | None = None, keyring: KeyRing | None = None,
        adapters: Adapters | None = None,
    ) -> None:
        self.settings = settings
        self.served = settings.served_model_name
        # The literal API_KEY by default; main passes the API_KEY_FILE's keys.
        self.keyring = keyring or KeyRing(settings.api_keys, required=settings.auth_configured)
        self.metrics_port = settings.metrics_port
        self.limits = Limits(
            n=settings.limit_n,
            best_of=settings.limit_best_of,
            max_tokens=settings.limit_max_tokens,
            logprobs=settings.limit_logprobs,
            prompts=settings.limit_prompts,
            messages=settings.limit_messages,
            stop=settings.limit_stop,
        )
        self.admission = Admission(settings.max_concurrent_requests)
        self.metrics = metrics or Metrics()
        self.engine: Any = None  # engine.Engine once loaded
        self.fatal: str | None = None
        self.on_fatal: Callable[[], None] = lambda: None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.loading = False  # the engine load is under way
        self.stopping = False  # shutting down: a failing load is a cancelled one, not a fatal error
        # main passes the one that read ADAPTERS_FILE at start.
        self.adapters = adapters or Adapters(settings.adapters_file, self.served, settings.adapters_poll_seconds, log)
        self.adapter_task: asyncio.Task | None = None

    @property
    def ready(self) -> bool:
        return (
            self.engine is not None and not self.admission.draining and not self.engine.dead and self.keyring.usable
        )

    def begin_drain(self) -> None:
        self.admission.start_drain()
        self.metrics.ready.set(0)


class _Ticket:
    """An admission slot (``weight`` sequences), released exactly once whichever path ends the request."""

    __slots__ = ("runtime", "held", "weight")

    def __init__(self, runtime: Runtime, weight: int = 1) -> None:
        self.runtime = runtime
        self.held = True
        self.weight = weight
        runtime.metrics.in_flight.inc()
        runtime.metrics.sequences_in_flight.inc(weight)

    def release(self) -> None:
        if self.held:
            self.held = False
            self.runtime.admission.release(self.weight)
            self.runtime.metrics.in_flight.dec()
            self.runtime.metrics.sequences_in_flight.dec(self.weight)


class _TicketedStream(StreamingResponse):
    """A streamed response that releases its admission slot however it ends.

    The stream's own ``finally`` releases it first; this covers a stream that
    never started (client gone, or the first send failed, before the first
    chunk). Not a ``BackgroundTask(ticket.release)``: Starlette runs a sync
    background function in its thread pool, which cost a thread hop (about
    0.1-0.2 ms of CPU, and a GIL hand-off) on every streamed request, and
    ``Admission`` expects to be used from the event loop only.
    """

    def __init__(self, content: AsyncIterator[str], ticket: _Ticket, media_type: str) -> None:
        super().__init__(content, media_type=media_type)
        self.ticket = ticket

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.ticket.release()


def _error_response(err: APIError, dialect: str = OPENAI) -> JSONResponse:
    return JSONResponse(errors.dialect_body(err, dialect), status_code=err.status, headers=err.headers or None)


async def _send_error(send: Send, err: APIError, dialect: str = OPENAI) -> None:
    body = json.dumps(errors.dialect_body(err, dialect)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in err.headers.items()]
    await send({"type": "http.response.start", "status": err.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return value.decode("latin-1")
    return None


class Guard:
    """Auth, body-size limit, request metrics and the request log line."""

    def __init__(self, app: ASGIApp, runtime: Runtime) -> None:
        self.app = app
        self.rt = runtime

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rt = self.rt
        start = time.perf_counter()
        path, method = scope["path"], scope["method"]
        route = route_label(path)
        info: dict[str, Any] = {}
        scope[_INFO] = info
        scope[_ROUTE] = route
        status = [500]

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            if rt.metrics_port is not None and _local_port(scope) == rt.metrics_port:
                # The metrics listener: probes and the scrape, no key, nothing else.
                if path in METRICS_PORT_PATHS and method == "GET":
                    await self.app(scope, receive, send_wrapper)
                else:
                    unknown = errors.route_not_found(method, path)
                    info.setdefault("error_code", unknown.code)
                    await _send_error(send_wrapper, unknown)
                return
            err = self._precheck(scope, path)
            if err is not None:
                info.setdefault("error_code", err.code)
                await _send_error(send_wrapper, err, dialect_of(path))
                return
            await self.app(scope, self._limited(receive), send_wrapper)
        finally:
            elapsed = time.perf_counter() - start
            code = status[0]
            metrics = rt.metrics
            metrics.child(metrics.requests, route, method, str(code)).inc()
            metrics.child(metrics.latency, route).observe(elapsed)
            if route not in ("/health", "/ready", "/metrics"):
                fields = request_fields(method=method, route=route, status=code, latency_s=elapsed, **info)
                log.info("request", extra={"fields": fields})

    def _precheck(self, scope: Scope, path: str) -> APIError | None:
        rt = self.rt
        ring = rt.keyring
        if ring.required and path not in PUBLIC_PATHS:
            if not ring.keys:  # API_KEY_FILE turned unusable: fail closed
                return errors.keys_unavailable(rt.settings.retry_after_seconds)
            # The Anthropic SDK sends its key as x-api-key; the OpenAI SDKs as a bearer token.
            token = bearer_token(_header(scope, b"authorization")) or _header(scope, b"x-api-key")
            if not key_matches(token, ring.keys):
                return errors.invalid_api_key(present=token is not None)
        length = _header(scope, b"content-length")
        if length is not None:
            try:
                too_big = int(length) > rt.settings.max_request_body_bytes
            except ValueError:
                return errors.invalid_request("Invalid Content-Length header.", None)
            if too_big:
                return errors.body_too_large(rt.settings.max_request_body_bytes)
        return None

    def _limited(self, receive: Receive) -> Receive:
        # A chunked body has no Content-Length: count what arrives.
        limit = self.rt.settings.max_request_body_bytes
        seen = 0

        async def wrapped() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise BodyTooLarge()
            return message

        return wrapped


def _local_port(scope: Scope) -> int | None:
    server = scope.get("server")
    return server[1] if server else None


def _validation_error(exc: RequestValidationError | ValidationError) -> APIError:
    return errors.from_validation_errors([dict(e) for e in exc.errors()])


def create_app(
    runtime: Runtime, starter: Callable[[], Awaitable[Any]], cancel_load: Callable[[], Any] = lambda: None
) -> FastAPI:
    """The runtime's ASGI app.

    ``starter`` loads the engine (``engine.start_engine``); ``cancel_load``
    makes a load under way give up when the server stops before it ended
    (``engine.stop_engine_processes``).
    """

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        runtime.loop = asyncio.get_running_loop()
        runtime.loading = True
        task = asyncio.create_task(_load(runtime, starter))
        settings = runtime.settings
        watcher = None
        if settings.api_key_file is not None:
            watcher = asyncio.create_task(
                watch_key_file(runtime.keyring, settings.api_key_file, settings.api_key_file_poll_seconds, log)
            )
        try:
            yield
        finally:
            if watcher is not None:
                watcher.cancel()
            if runtime.adapter_task is not None:
                runtime.adapter_task.cancel()
            runtime.stopping = True
            if not task.done():
                await _cancel_load(task, cancel_load)
            if runtime.engine is not None:
                runtime.engine.shutdown()

    app = FastAPI(
        title="modelendpoint-runtime",
        docs_url=None,
        redoc_url=None,
        lifespan=lifespan,
    )
    app.state.runtime = runtime

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            return _error_response(errors.route_not_found(request.method, request.url.path))
        if exc.status_code == 405:
            return _error_response(errors.method_not_allowed(request.method, request.url.path))
        if exc.status_code >= 500:
            return _error_response(errors.internal_error())
        return _error_response(APIError(exc.status_code, str(exc.detail), errors.INVALID_REQUEST))

    @app.exception_handler(RequestValidationError)
    async def _request_validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _error_response(_validation_error(exc))

    @app.exception_handler(BodyTooLarge)
    async def _too_large(request: Request, exc: BodyTooLarge) -> JSONResponse:
        return _error_response(errors.body_too_large(runtime.settings.max_request_body_bytes))

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        log.error("unhandled error", exc_info=exc)
        return _error_response(errors.internal_error())

    @app.get("/health", include_in_schema=False)
    async def health() -> Response:
        if runtime.fatal is not None or (runtime.engine is not None and runtime.engine.dead):
            return JSONResponse({"status": "dead"}, status_code=503)
        return JSONResponse({"status": "ok" if runtime.engine is not None else "loading"})

    @app.get("/ready", include_in_schema=False)
    async def ready() -> Response:
        if runtime.ready:
            return JSONResponse({"status": "ready"})
        if runtime.admission.draining:
            reason = "draining"
        elif runtime.engine is None:
            reason = "loading"
        elif runtime.engine.dead:
            reason = "dead"
        else:
            reason = "keys_unavailable"
        return JSONResponse({"status": reason}, status_code=503)

    @app.get("/metrics", include_in_schema=False)
    async def metrics(request: Request) -> Response:
        # Prometheus's `name[]` selector (prometheus_client's own exporters honour it): the
        # autoscaler asks for its three series, not the ~100 kB of vLLM's histograms.
        names = request.query_params.getlist("name[]")
        registry = REGISTRY.restricted_registry(names) if names else REGISTRY
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/adapters", include_in_schema=False)
    async def adapters() -> Response:
        return JSONResponse(runtime.adapters.report())

    def endpoint(api: Api) -> Callable[[Request], Awaitable[Response]]:
        async def serve(request: Request) -> Response:
            return await _generate(runtime, request, api)

        serve.__name__ = api.name  # FastAPI's operation ids
        return serve

    async def list_models(request: Request) -> Response:
        return await _models(runtime, request, None)

    async def retrieve_model(request: Request, model: str) -> Response:
        return await _models(runtime, request, model)

    for prefix in PREFIXES:
        for api in APIS.values():
            app.add_api_route(prefix + api.suffix, endpoint(api), methods=["POST"])
        app.add_api_route(prefix + "/models", list_models, methods=["GET"])
        app.add_api_route(prefix + "/models/{model:path}", retrieve_model, methods=["GET"])

    # Outermost: auth and the size limit apply before routing, so even an
    # unknown path needs a key (nothing about the API is disclosed without one).
    app.add_middleware(Guard, runtime=runtime)
    return app


# How long a stopping server waits for a cancelled load to give up; past it the
# load's thread is abandoned (main() then exits without waiting for it).
CANCEL_LOAD_TIMEOUT_S = 10.0


async def _cancel_load(task: asyncio.Task, cancel_load: Callable[[], Any]) -> None:
    """Stop a load under way instead of waiting minutes for a model nobody will serve.

    The load's blocking steps run in a thread that cannot be interrupted;
    ``cancel_load`` ends the engine process it waits on, which makes it fail
    at once. A step not waiting on that process yet (reading the config) may
    start one afterwards, hence the repeat.
    """
    log.info("stopping while loading: cancelling the load")
    deadline = time.monotonic() + CANCEL_LOAD_TIMEOUT_S
    while not task.done() and time.monotonic() < deadline:
        cancel_load()
        await asyncio.wait({task}, timeout=0.5)


async def _load(runtime: Runtime, starter: Callable[[], Awaitable[Any]]) -> None:
    started = time.perf_counter()
    try:
        engine = await starter()
    except Exception as exc:  # noqa: BLE001 - reported as one line, details in the log
        runtime.loading = False
        if runtime.stopping:
            log.info("load cancelled", extra={"fields": {"after_s": round(time.perf_counter() - started, 1)}})
            return
        if isinstance(exc, ConfigError):
            runtime.fatal = str(exc)
        else:
            log.error("engine failed to start", exc_info=exc)
            runtime.fatal = f"the engine failed to start: {type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
    else:
        if runtime.adapters.path is not None:
            # Before /ready: a replica serves the current adapters from its first request.
            models = engine.state.openai_serving_models
            try:
                await runtime.adapters.reconcile(models)
            except Exception as exc:  # noqa: BLE001 - the watch retries; the model itself serves
                log.error("adapters reconcile failed", exc_info=exc)
            runtime.adapter_task = asyncio.create_task(runtime.adapters.watch(models))
        runtime.loading = False
        runtime.engine = engine
        if not runtime.admission.draining:
            runtime.metrics.ready.set(1)
        load_s = round(time.perf_counter() - started, 1)
        log_sampling_defaults(engine)
        log.info("ready", extra={"fields": {"model": runtime.served, "load_s": load_s}})
        return
    runtime.on_fatal()


def log_sampling_defaults(engine: Any) -> None:
    """The defaults an omitted sampling parameter gets, as vLLM's serving classes apply them.

    vLLM logs them only when they come from a generation_config.json, not in the
    runtime's default mode (GENERATION_CONFIG=vllm plus the guide's overrides).
    """
    model_config = getattr(engine.client, "model_config", None)
    if model_config is None:
        return
    log.info("sampling defaults", extra={"fields": {
        "defaults": model_config.get_diff_sampling_param(), "generation_config": model_config.generation_config}})


def _endpoint_error(runtime: Runtime, request: Request) -> APIError | None:
    wanted = runtime.settings.endpoint_id
    got = request.path_params.get("endpoint_id")
    if wanted is not None and got is not None and got != wanted:
        return APIError(404, f"Endpoint `{clip(got)}` is not served here.", errors.INVALID_REQUEST, None,
                        "endpoint_not_found")  # fmt: skip
    return None


def _unavailable(runtime: Runtime) -> APIError | None:
    retry = runtime.settings.retry_after_seconds
    if runtime.admission.draining:
        return errors.draining(retry)
    if runtime.engine is None:
        return errors.not_ready(retry)
    if runtime.engine.dead:
        return APIError(503, "The engine is not running.", errors.SERVER_ERROR, None, "engine_dead",
                        {"Retry-After": str(retry)})  # fmt: skip
    return None


async def _models(runtime: Runtime, request: Request, model: str | None) -> Response:
    err = _endpoint_error(runtime, request) or _unavailable(runtime)
    if err is not None:
        return _error_response(err)
    listing = await runtime.engine.state.openai_serving_models.show_available_models()
    cards = [_model_card(c.model_dump()) for c in listing.data]
    if model is None:
        return JSONResponse({"object": "list", "data": cards})
    for card in cards:
        if card["id"] == model:
            return JSONResponse(card)
    return _error_response(errors.model_not_found(model))


def _model_card(card: dict[str, Any]) -> dict[str, Any]:
    # `root` is where the weights live (a path inside the pod): not the
    # client's business. `parent` names the served model on an adapter's card
    # (vLLM's null on the model's own is left out). The rest is vLLM's card.
    card.pop("root", None)
    if card.get("parent") is None:
        card.pop("parent", None)
    card["owned_by"] = "modelendpoint"
    return card


async def _generate(runtime: Runtime, request: Request, api: Api) -> Response:
    info: dict[str, Any] = request.scope.setdefault(_INFO, {})
    start = time.perf_counter()
    dialect = api.dialect
    err = _endpoint_error(runtime, request) or _unavailable(runtime)
    if err is not None:
        info["error_code"] = err.code
        return _error_response(err, dialect)
    # Everything that needs no engine happens before a slot is taken: a slow
    # body, or an invalid request, holds none.
    prepared = await _prepare(runtime, request, api, info)
    if isinstance(prepared, APIError):
        info["error_code"] = prepared.code
        return _error_response(prepared, dialect)
    if not runtime.admission.try_acquire(prepared.weight):
        retry = runtime.settings.retry_after_seconds
        err = errors.draining(retry) if runtime.admission.draining else errors.overloaded(retry)
        runtime.metrics.child(runtime.metrics.rejected, err.code or "overloaded").inc()
        info["error_code"] = err.code
        return _error_response(err, dialect)
    ticket = _Ticket(runtime, prepared.weight)
    streaming = False
    try:
        response = await _dispatch(runtime, request, api, info, ticket, start, prepared)
        streaming = isinstance(response, _TicketedStream)
        return response
    finally:
        if not streaming:
            ticket.release()


async def _read_body(runtime: Runtime, request: Request) -> bytes | APIError:
    """The body, if it arrives within READ_TIMEOUT_SECONDS of the request's first byte (else 408).

    The connection layer puts that deadline in the scope (``READ_DEADLINE``);
    without it (tests over ASGI) the clock starts now. ``asyncio.timeout_at``
    arms one timer, no task: a body already received costs nothing more.
    """
    loop = asyncio.get_running_loop()
    timeout = runtime.settings.read_timeout_seconds
    deadline = request.scope.get(READ_DEADLINE) or loop.time() + timeout
    try:
        async with asyncio.timeout_at(deadline):
            return await request.body()
    except TimeoutError:
        runtime.metrics.child(runtime.metrics.client_timeouts, "read").inc()
        return errors.request_timeout(timeout)


async def _parse_body(runtime: Runtime, request: Request) -> dict[str, Any] | APIError:
    raw = await _read_body(runtime, request)
    if isinstance(raw, APIError):
        return raw
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):
        return errors.invalid_request(
            "We could not parse the JSON body of your request. Send valid JSON with Content-Type: application/json.",
            None,
            "invalid_json",
        )
    if not isinstance(body, dict):
        return errors.invalid_request("The request body must be a JSON object.", None, "invalid_json")
    return body


def _classify_exception(exc: Exception, prompt_param: str, retry_after: int) -> APIError:
    """An exception from vLLM's request models or serving layer, in our shape."""
    from vllm.entrypoints.serve import create_error_response

    resp = create_error_response(exc)
    return errors.from_engine_error(resp.error.code, resp.error.message, resp.error.param, prompt_param, retry_after)


class _Prepared:
    """A request read, validated and capped: what the engine gets, and its admission weight."""

    __slots__ = ("req", "plan", "ranking_fields", "weight", "echo")

    def __init__(self, req: Any, plan: Plan, ranking_fields: dict[str, Any], weight: int,
                 echo: list[str] | None = None) -> None:  # fmt: skip
        self.req = req
        self.plan = plan
        self.ranking_fields = ranking_fields
        self.weight = weight
        self.echo = echo  # prompt texts the runtime echoes itself (best_of ranking)


def _check_model(runtime: Runtime, api: Api, model: Any) -> APIError | None:
    """The served name, or a LoRA adapter vLLM serves; an adapter still loading is a 503, a failed one 404."""
    if model is None and not api.model_required:
        return None  # vLLM's extensions (tokenize, score, ...) default to the served model
    err = check_model(model, runtime.served)
    if err is None or err.status != 404:
        return err
    models = runtime.engine.state.openai_serving_models
    if model in getattr(models, "lora_requests", {}):
        return None
    status = runtime.adapters.state_of(model)
    if status is not None and status.state == LOADING:
        return errors.adapter_loading(model, runtime.settings.retry_after_seconds)
    if status is not None and status.state == FAILED:
        return errors.adapter_failed(model)
    return err


async def _prepare(runtime: Runtime, request: Request, api: Api, info: dict[str, Any]) -> _Prepared | APIError:
    kind = api.name
    body = await _parse_body(runtime, request)
    if isinstance(body, APIError):
        return body
    model = body.get("model")
    info["model"] = clip(model) if isinstance(model, str) else None
    if (err := _check_model(runtime, api, model)) is not None:
        return err
    engine = runtime.engine
    if getattr(engine.state, api.state, None) is None:
        name = model if isinstance(model, str) else runtime.served
        return errors.unsupported_task(name, api.title, apis.describe_model(getattr(engine, "tasks", ())))
    if runtime.settings.log_prompts:
        info["prompt"] = body.get(api.prompt_param)
    if kind in ("chat", "completion"):
        err = check_shape(body, kind, runtime.limits)
    else:
        err = apis.check_api_shape(api, body, runtime.limits)
    if err is not None:
        return err
    if runtime.settings.tool_strict_default:
        apis.default_strict_tools(kind, body)

    try:
        req = apis.validate(api, body)
    except ValidationError as exc:
        return _validation_error(exc)
    except Exception as exc:  # noqa: BLE001 - vLLM validators raise their own errors
        return _classify_exception(exc, api.prompt_param, runtime.settings.retry_after_seconds)

    if kind not in ("chat", "completion"):
        return _Prepared(req, Plan(), {}, apis.weight(api, body))
    plan = check_caps(req, runtime.limits, kind)
    if isinstance(plan, APIError):
        return plan
    weight = sequences(req, kind, plan)
    if plan.engine_n is not None:
        req.n = plan.engine_n
    # best_of sampling: the client's own logprobs request decides what it gets back.
    ranking_fields = logprobs_for_ranking(req, kind) if plan.rank else {}
    for name, value in ranking_fields.items():
        setattr(req, name, value)
    echo = echo_prompts(req, kind, plan, ranking_fields)
    if echo is not None:
        req.echo = False
    if _lora_enabled(runtime):
        # vLLM 0.32 computes prompt log-probabilities with the wrong LoRA mapping
        # and, on the CPU, its engine dies on them (vLLM issues 29955, 16668).
        if kind == "chat" and req.echo and not req.logprobs:
            req.top_logprobs = None  # chat echo asks for them by default, for nobody
        if (param := prompt_logprobs_param(req, kind)) is not None:
            return errors.invalid_request(
                "Prompt log-probabilities (prompt_logprobs, or echo with logprobs or best_of) are not available "
                "on this endpoint while LoRA adapters are enabled.", param)  # fmt: skip
    return _Prepared(req, plan, ranking_fields, weight, echo)


def _lora_enabled(runtime: Runtime) -> bool:
    return bool(getattr(getattr(runtime.engine, "args", None), "enable_lora", False))


def _call(state: Any, api: Api) -> Callable[[Any, Request], Awaitable[Any]]:
    """The vLLM serving coroutine for an API (what vLLM's own route handler awaits)."""
    handler = getattr(state, api.state)
    return {
        "chat": lambda: handler.create_chat_completion,
        "completion": lambda: handler.create_completion,
        "responses": lambda: handler.create_responses,
        "messages": lambda: handler.create_messages,
        "count_tokens": lambda: handler.count_tokens,
        "tokenize": lambda: handler.create_tokenize,
        "detokenize": lambda: handler.create_detokenize,
    }.get(api.name, lambda: handler)()  # the pooling serving objects are called directly


def _dump(api: Api, result: Any) -> dict[str, Any]:
    """A vLLM response object as the body vLLM's own route sends."""
    if api.name == "responses":
        return result.model_dump(mode="json", by_alias=True)
    if api.dialect == errors.ANTHROPIC:
        return result.model_dump(exclude_none=True)
    return result.model_dump()


async def _dispatch(
    runtime: Runtime, request: Request, api: Api, info: dict[str, Any], ticket: _Ticket, start: float,
    prepared: _Prepared,
) -> Response:
    from vllm.entrypoints.serve.engine.protocol import ErrorResponse

    kind, prompt_param, dialect = api.name, api.prompt_param, api.dialect
    retry_after = runtime.settings.retry_after_seconds
    req, plan, ranking_fields = prepared.req, prepared.plan, prepared.ranking_fields
    stream = api.streams and bool(req.stream)
    info["stream"] = stream
    call = _call(runtime.engine.state, api)

    if stream:
        try:
            result = await call(req, request)
        except Exception as exc:  # noqa: BLE001
            return _failed(exc, api, info, retry_after)
    else:
        result = await _until_disconnect(call(req, request), request)
        if result is _DISCONNECTED:
            info["error_code"] = "client_closed_request"
            return Response(status_code=499)
        if isinstance(result, BaseException):
            return _failed(result, api, info, retry_after)

    if isinstance(result, ErrorResponse):
        err = errors.engine_error_from_body(result.error.code, result.model_dump(), prompt_param, retry_after)
        if err.status >= 500:
            log.error("engine error", extra={"fields": {"detail": result.error.message[:500]}})
        info["error_code"] = err.code
        return _error_response(err, dialect)

    if isinstance(result, Response):
        # The pooling APIs answer with a finished response (JSON, or vLLM's binary encodings).
        _record_pooling_usage(runtime, request, info, result)
        runtime.metrics.child(runtime.metrics.ttft, _route(request), "false").observe(time.perf_counter() - start)
        return result

    if not stream:
        content = _dump(api, result)
        if plan.rank and plan.keep_n is not None:
            content = rank_choices(content, plan.keep_n, kind, keep_logprobs=not ranking_fields, group=plan.engine_n)
            if prepared.echo is not None:
                content = prepend_echo(content, prepared.echo, plan.keep_n)
        elif plan.keep_n is not None:
            content = trim_choices(content, plan.keep_n, group=plan.engine_n)
        if kind == "chat":
            mirror_reasoning(content)
        _record_usage(runtime, request, info, *usage_of(api, content))
        elapsed = time.perf_counter() - start
        runtime.metrics.child(runtime.metrics.ttft, _route(request), "false").observe(elapsed)
        return JSONResponse(content)

    if api.events:
        gen = _event_stream(runtime, request, result, api, info, ticket, start)
        return _TicketedStream(gen, ticket, MEDIA_TYPES["sse"])
    fmt = choose_format(runtime.settings.raw_openai_output, request.headers.get("accept"))
    reframer = Reframer(fmt, prompt_param, retry_after, mirror=kind == "chat")
    gen = _stream(runtime, request, result, reframer, kind, info, ticket, start)
    return _TicketedStream(gen, ticket, MEDIA_TYPES[fmt])


def _failed(exc: BaseException, api: Api, info: dict[str, Any], retry_after: int) -> Response:
    if isinstance(exc, Exception):
        err = _classify_exception(exc, api.prompt_param, retry_after)
    else:
        err = errors.internal_error()
    if err.status >= 500:
        log.error("generation failed", exc_info=exc)
    info["error_code"] = err.code
    return _error_response(err, api.dialect)


_DISCONNECTED = object()


async def _until_disconnect(coro: Awaitable[Any], request: Request) -> Any:
    """Run a non-streaming generation, cancelling it if the client goes away.

    Cancelling the task raises CancelledError inside vLLM's generate(), which
    aborts the engine request: no tokens are computed for nobody. The body is
    already read, so listening for ``http.disconnect`` consumes nothing else.
    """
    work = asyncio.ensure_future(coro)
    watch = asyncio.ensure_future(_wait_disconnect(request))
    try:
        done, _ = await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
    if work in done:
        exc = work.exception()
        return exc if exc is not None else work.result()
    work.cancel()
    try:
        await work
    except BaseException:  # noqa: BLE001 - the cancellation we asked for
        pass
    return _DISCONNECTED


async def _wait_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def _route(request: Request) -> str:
    # Guard has put it there (``request.url`` would build and parse a URL).
    scope = request.scope
    return scope.get(_ROUTE) or route_label(scope["path"])


def _record_usage(runtime: Runtime, request: Request, info: dict[str, Any], prompt: Any, completion: Any) -> None:
    route = _route(request)
    metrics = runtime.metrics
    if isinstance(prompt, int):
        info["prompt_tokens"] = prompt
        metrics.child(metrics.prompt_tokens, route).inc(prompt)
    if isinstance(completion, int):
        info["completion_tokens"] = completion
        metrics.child(metrics.completion_tokens, route).inc(completion)


def _record_pooling_usage(runtime: Runtime, request: Request, info: dict[str, Any], response: Response) -> None:
    """Token counts of a pooling answer: from its JSON body, or the ``metadata`` header of the binary encodings."""
    try:
        raw = getattr(response, "body", None)
        if isinstance(raw, (bytes, bytearray)) and raw[:1] == b"{":
            usage = json.loads(raw).get("usage") or {}
        else:
            usage = json.loads(response.headers.get("metadata") or "{}").get("usage") or {}
    except (ValueError, AttributeError):
        return
    if isinstance(usage, dict):
        _record_usage(runtime, request, info, usage.get("prompt_tokens"), None)


async def _stream(
    runtime: Runtime,
    request: Request,
    gen: AsyncIterator[str],
    reframer: Reframer,
    kind: str,
    info: dict[str, Any],
    ticket: _Ticket,
    start: float,
) -> AsyncIterator[str]:
    ttft_metric = runtime.metrics.child(runtime.metrics.ttft, _route(request), "true")
    waiting_first = True
    try:
        async for piece in gen:
            if waiting_first and is_token_frame(piece, kind):
                waiting_first = False
                ttft = time.perf_counter() - start
                info["ttft_s"] = ttft
                ttft_metric.observe(ttft)
            out = reframer.feed(piece)
            if out:
                yield out
    except asyncio.CancelledError:
        # The client went away (or stopped reading: the connection layer set
        # write_timeout): the cancellation reached vLLM's generator above,
        # which aborted the engine request.
        info.setdefault("error_code", "client_closed_request")
        raise
    except Exception as exc:  # noqa: BLE001 - the stream has started: report in-band
        log.error("stream failed", exc_info=exc)
        info["error_code"] = "internal_error"
        yield reframer.error_frame(errors.internal_error().body())
    finally:
        ticket.release()
        # Not left to the garbage collector: closing vLLM's generator (if our
        # own was closed while it waited at a yield) aborts the engine request now.
        aclose = getattr(gen, "aclose", None)
        if aclose is not None:
            await aclose()
        if reframer.error_status is not None:
            info["error_code"] = info.get("error_code") or "stream_error"
        meta = getattr(request.state, "request_metadata", None)
        usage = getattr(meta, "final_usage_info", None)
        if usage is not None:
            _record_usage(runtime, request, info, usage.prompt_tokens, usage.completion_tokens)


async def _event_stream(
    runtime: Runtime,
    request: Request,
    gen: AsyncIterator[Any],
    api: Api,
    info: dict[str, Any],
    ticket: _Ticket,
    start: float,
) -> AsyncIterator[str]:
    """The Responses and Messages streams: typed server-sent events (``event: <type>``, ``data: {json}``).

    vLLM's Responses serving yields event objects (framed here as vLLM's own
    route frames them), its Messages serving yields the frames. An error
    event carries no internals; token counts come from the events that carry
    usage (Responses' ``response.completed``, Messages' ``message_start`` and
    ``message_delta``).
    """
    ttft_metric = runtime.metrics.child(runtime.metrics.ttft, _route(request), "true")
    events = EventStream(api.name)
    waiting_first = True
    try:
        async for item in gen:
            frame = events.frame(item)
            if waiting_first and events.first_token:
                waiting_first = False
                ttft = time.perf_counter() - start
                info["ttft_s"] = ttft
                ttft_metric.observe(ttft)
            yield frame
    except asyncio.CancelledError:
        info.setdefault("error_code", "client_closed_request")
        raise
    except Exception as exc:  # noqa: BLE001 - the stream has started: report in-band
        log.error("stream failed", exc_info=exc)
        info["error_code"] = "internal_error"
        yield events.error_frame()
    finally:
        ticket.release()
        aclose = getattr(gen, "aclose", None)
        if aclose is not None:
            await aclose()
        if events.error_sent:
            info["error_code"] = info.get("error_code") or "stream_error"
        _record_usage(runtime, request, info, events.prompt_tokens, events.completion_tokens)
