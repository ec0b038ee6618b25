"""The request path: routes, keys, holding, balancing, forwarding with retries.

Routes (docs/gateway.md):

- ``/openai/v1/...`` and ``/v1/...``: ``GET models`` and ``GET models/{id}``
  are answered here from the routing table; every ``POST`` is routed by the
  ``model`` of its JSON body to the ModelEndpoint that owns that name -- its
  served name or the name of one of its LoRA adapters -- with the path kept
  (chat/completions, completions, embeddings, responses, tokenize,
  Anthropic's messages, ... whatever the runtime serves).
- ``/v2/{name}/openai/v1/...``: straight to the ModelEndpoint ``name`` (any
  method; the body is not read).
- ``/healthz``, ``/readyz``.

Order of checks for a routed request: model known (else 404, nothing
reaches a pod), key (else 401: nothing is forwarded or woken), switched off
or failed (503), then a ready replica, or hold until there is one.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import urllib.parse
from collections.abc import Callable
from typing import Any

from modelendpoint_operator import served_names

from . import errors, hold, logs, metrics, prefix, table
from .balancer import Replica
from .errors import GatewayError
from .http import Exchange, Headers, Pool, Request, Responder, UpstreamConnection, UpstreamError, hop_by_hop, in_task
from .keys import KeyStore, KeysUnavailable, digest, presented_key
from .router import Model, Router
from .settings import GatewaySettings

logger = logging.getLogger("modelendpoint_gateway")
access = logging.getLogger("modelendpoint_gateway.access")

JSON_HEADERS: Headers = [(b"content-type", b"application/json")]
SSE_HEADERS: Headers = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
                        (b"x-accel-buffering", b"no")]
WAITING_COMMENT = b": waiting for the model\n\n"
_PREFIXES = ("/openai/v1/", "/v1/")
# Answers of a replica that another replica may not give, before the first byte: tried elsewhere.
RETRY_STATUSES = frozenset({503})
# For an adapter, also 404: a replica that has not loaded it (yet: the runtime re-reads the list every
# few seconds; or it failed there) answers model_not_found, another one may have it.
ADAPTER_RETRY_STATUSES = frozenset({503, 404})
_FORWARDABLE_V2 = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE"})


def classify(path: str) -> tuple[str, str, str]:
    """(kind, rest, endpoint name) of a request path.

    kind: ``health``, ``ready``, ``v1`` (rest after the prefix), ``v2`` (with the
    ModelEndpoint name), or ``unknown``.
    """
    if path == "/healthz":
        return "health", "", ""
    if path == "/readyz":
        return "ready", "", ""
    for p in _PREFIXES:
        if path.startswith(p):
            return "v1", path[len(p):], ""
    if path.startswith("/v2/"):
        name, sep, rest = path[4:].partition("/")
        if name and sep and (rest == "openai/v1" or rest.startswith("openai/v1/")):
            return "v2", rest[len("openai/v1/"):], urllib.parse.unquote(name)
    return "unknown", "", ""


def parse_body(body: bytes) -> dict[str, Any]:
    """The JSON object of a request body, or the 400 a client gets for it."""
    if not body.strip():
        raise errors.invalid_json("the body is empty")
    try:
        obj = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise errors.invalid_json(str(exc)[:200]) from None
    if not isinstance(obj, dict):
        raise errors.body_not_object()
    return obj


def requested_model(obj: dict[str, Any]) -> str:
    model = obj.get("model")
    if model is None:
        raise errors.missing_model()
    if not isinstance(model, str):
        raise errors.invalid_model()
    if not model:
        raise errors.missing_model()
    return model


def wants_sse(req: Request, info: table.EndpointInfo) -> bool:
    """Whether a streamed answer will be server-sent events (the runtime's rule: Accept, else rawOpenAIOutput)."""
    accept = (req.header(b"accept") or "").lower()
    if "application/x-ndjson" in accept:
        return False
    if "text/event-stream" in accept:
        return True
    return info.sse


def error_headers(err: GatewayError) -> Headers:
    return JSON_HEADERS + [(k.lower().encode(), v.encode()) for k, v in err.headers]


class Ctx:
    """What one request's log line and metrics need, filled in along the way."""

    __slots__ = ("model", "metrics", "replica", "attempts", "held_s", "first_byte_at", "stream", "error_code",
                 "hold_deadline", "sse_early", "route", "adapter", "dialect")

    def __init__(self) -> None:
        self.model: str | None = None
        self.metrics: metrics.ModelMetrics | None = None
        self.replica: str | None = None
        self.attempts = 0
        self.held_s: float | None = None
        self.first_byte_at: float | None = None
        self.stream: bool | None = None
        self.error_code: str | None = None
        self.hold_deadline: float | None = None
        self.sse_early = False  # a held stream whose SSE headers went out before any replica answered
        self.route = ""
        self.adapter: str | None = None  # the LoRA adapter asked for (the body's model), if it is one
        self.dialect = errors.OPENAI  # the shape of the errors we answer: Anthropic's on the Messages routes


class Gateway:
    """The request handler, with the state it needs (fed by discovery.py and the key store)."""

    def __init__(self, settings: GatewaySettings, router: Router, keys: KeyStore, pool: Pool,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self.router = router
        self.keys = keys
        self.pool = pool
        self.clock = clock
        self.held = hold.HeldCounts(clock)
        self.wake = asyncio.Event()  # the annotation writer looks at self.held.due() when set
        self.synced = False           # the first full lists are in
        self.draining = False
        self.holds_ended = False
        self.loop = asyncio.get_event_loop()
        # One worker of several: ready only once every worker is (the port's connections reach any of them).
        self.peers_ready: Callable[[], bool] | None = None

    # --- entry point -------------------------------------------------------------------

    async def handle(self, req: Request, resp: Responder) -> None:
        ctx = Ctx()
        kind, rest, endpoint_name = classify(req.path)
        try:
            if kind == "health":
                return self._health(req, resp)
            if kind == "ready":
                return self._ready(req, resp)
            ctx.route = req.path
            ctx.dialect = errors.dialect_of(req.path)
            if kind == "unknown":
                raise errors.unknown_url(req.method, req.path)
            if not self.synced:
                raise errors.not_ready(self.settings.retry_after_seconds)
            if kind == "v2":
                await self._v2(req, resp, endpoint_name, ctx)
            else:
                await self._v1(req, resp, rest, ctx)
        except GatewayError as err:
            self._fail(resp, ctx, err)
        except Exception:  # noqa: BLE001 - a bug answers one request with a 500, nothing else
            logger.exception("request failed", extra={"fields": {"route": req.path[:200]}})
            if resp.started:
                resp.abort()
            else:
                self._fail(resp, ctx, errors.internal_error())
        except asyncio.CancelledError:
            ctx.error_code = "client_closed_request"
            raise
        finally:
            if kind not in ("health", "ready"):
                self._done(req, resp, ctx)

    def _fail(self, resp: Responder, ctx: Ctx, err: GatewayError) -> None:
        ctx.error_code = err.code
        if resp.finished or resp.client_gone:
            return
        if resp.started:
            # A held stream already has its SSE headers: the error is the stream's last event.
            resp.write(err.sse_event(ctx.dialect))
            resp.end()
        else:
            resp.send(err.status, error_headers(err), err.body_bytes(ctx.dialect))

    def _done(self, req: Request, resp: Responder, ctx: Ctx) -> None:
        now = time.perf_counter()
        status = resp.status or 499  # 499: the client went away before any answer
        m = ctx.metrics or metrics.for_model(metrics.UNROUTED)
        m.request(status)
        m.duration.observe(now - req.received_at)
        if ctx.first_byte_at is not None:
            m.ttfb.observe(ctx.first_byte_at - req.received_at)
        if self.settings.access_log:
            access.info("request", extra={"fields": logs.request_fields(
                method=req.method, route=ctx.route, status=status, latency_s=now - req.received_at,
                model=ctx.model, replica=ctx.replica,
                ttfb_s=None if ctx.first_byte_at is None else ctx.first_byte_at - req.received_at,
                held_s=ctx.held_s, attempts=ctx.attempts or None, stream=ctx.stream, error_code=ctx.error_code)})

    # --- health -------------------------------------------------------------------------

    def _health(self, req: Request, resp: Responder) -> None:
        resp.send(200, JSON_HEADERS, b'{"status":"ok"}')

    def readiness(self) -> tuple[int, bytes]:
        if self.draining:
            return 503, b'{"status":"draining"}'
        if not self.synced or (self.peers_ready is not None and not self.peers_ready()):
            return 503, b'{"status":"starting"}'
        return 200, b'{"status":"ready"}'

    def _ready(self, req: Request, resp: Responder) -> None:
        status, body = self.readiness()
        resp.send(status, JSON_HEADERS, body)

    # --- /v1 -------------------------------------------------------------------------------

    async def _v1(self, req: Request, resp: Responder, rest: str, ctx: Ctx) -> None:
        if rest == "models" or rest.startswith("models/"):
            if req.method not in ("GET", "HEAD"):
                raise errors.method_not_allowed(req.method, req.path)
            token = presented_key(req.header(b"authorization"), req.header(b"x-api-key"))
            if rest == "models":
                return await self._list_models(resp, token)
            return await self._one_model(resp, urllib.parse.unquote(rest[len("models/"):]), token)
        if req.method != "POST":
            raise errors.unknown_url(req.method, req.path)
        body = parse_body(req.body)
        name = requested_model(body)
        ctx.model = name
        ctx.stream = body.get("stream") is True
        model = self.router.by_served_name(name)
        if model is None:
            raise errors.model_not_found(name)
        if name != model.served_name:
            ctx.adapter = name
        ctx.metrics = metrics.for_model(model.served_name)
        await self._authorize(req, model)
        await self._forward(req, resp, model, body, ctx)

    async def _v2(self, req: Request, resp: Responder, name: str, ctx: Ctx) -> None:
        if req.method not in _FORWARDABLE_V2:
            raise errors.method_not_allowed(req.method, req.path)
        model = self.router.by_endpoint_name(name)
        if model is None:
            raise errors.endpoint_not_found(name)
        ctx.model = model.served_name or name
        ctx.metrics = metrics.for_model(model.served_name)
        await self._authorize(req, model)
        body: dict[str, Any] | None = None
        if req.method == "POST" and req.body:
            try:
                parsed = json.loads(req.body)
                body = parsed if isinstance(parsed, dict) else None
            except (ValueError, UnicodeDecodeError, RecursionError):
                body = None  # the runtime answers it (its own 400)
        ctx.stream = bool(body and body.get("stream") is True)
        asked = body.get("model") if body else None
        if isinstance(asked, str) and model.is_adapter_name(asked):
            ctx.adapter = asked
        await self._forward(req, resp, model, body, ctx)

    async def _authorize(self, req: Request, model: Model) -> None:
        """401 unless the caller's key opens the model, 403 for a keyless one this gateway does not
        publish (both before anything is forwarded or woken)."""
        info = model.info
        if info.open:
            if self.withheld(info):
                raise errors.keyless_on_public_gateway(model.served_name or info.name)
            return
        assert info.key_secret is not None
        token = presented_key(req.header(b"authorization"), req.header(b"x-api-key"))
        try:
            keys = await self.keys.keys(info.namespace, info.key_secret, info.key_field or "")
        except KeysUnavailable:
            raise errors.keys_unavailable(model.served_name, self.settings.retry_after_seconds) from None
        if not keys.opens(token):
            raise errors.invalid_api_key(token is not None)

    def withheld(self, info: table.EndpointInfo) -> bool:
        """A keyless model this gateway does not serve: it is public, and the model did not opt in."""
        return served_names.withheld_from_public_gateway(self.settings.public, not info.open,
                                                         info.allow_unauthenticated)

    async def _opens(self, model: Model, token_digest: bytes | None) -> bool:
        info = model.info
        if info.open:
            return not self.withheld(info)
        if token_digest is None:
            return False
        assert info.key_secret is not None
        try:
            keys = await self.keys.keys(info.namespace, info.key_secret, info.key_field or "")
        except KeysUnavailable:
            return False
        return token_digest in keys.digests

    async def _visible(self, token: str | None) -> list[tuple[str, Model]]:
        """The names (served and adapters') the caller may use, with their Models, by name."""
        d = digest(token) if token is not None else None
        names = [(n, m) for n, m in self.router.names() if m.listed]
        models = list({m.key: m for _, m in names}.values())
        allowed = await asyncio.gather(*(self._opens(m, d) for m in models))
        opened = {m.key for m, ok in zip(models, allowed, strict=True) if ok}
        return [(n, m) for n, m in names if m.key in opened]

    @staticmethod
    def _model_entry(name: str, model: Model) -> dict[str, Any]:
        entry: dict[str, Any] = {"id": name, "object": "model", "created": int(model.info.created.timestamp()),
                                 "owned_by": model.info.namespace}
        if name != model.served_name:
            entry["parent"] = model.served_name  # an adapter: the model it runs on (as vLLM lists it)
        return entry

    async def _list_models(self, resp: Responder, token: str | None) -> None:
        data = [self._model_entry(n, m) for n, m in await self._visible(token)]
        body = json.dumps({"object": "list", "data": data}, separators=(",", ":")).encode()
        resp.send(200, JSON_HEADERS, body)

    async def _one_model(self, resp: Responder, name: str, token: str | None) -> None:
        model = self.router.by_served_name(name)
        if model is None or not model.listed or not await self._opens(
                model, digest(token) if token is not None else None):
            raise errors.model_not_found(name)
        resp.send(200, JSON_HEADERS, json.dumps(self._model_entry(name, model), separators=(",", ":")).encode())

    # --- holding ----------------------------------------------------------------------------

    async def _hold(self, model: Model, req: Request, resp: Responder, ctx: Ctx) -> Model:
        """Wait until ``model`` has a ready replica; the Model then (or the GatewayError to answer)."""
        s = self.settings
        name = model.served_name
        self._refuse_unservable(model)
        if self.holds_ended:
            raise errors.shutting_down(s.retry_after_seconds)
        if self.held.total >= s.max_held_requests:
            raise errors.too_many_held(name, s.max_held_requests, s.retry_after_seconds)
        now = time.perf_counter()
        if ctx.hold_deadline is None:
            ctx.hold_deadline = now + s.hold_timeout_seconds
        started = now
        key = model.key
        m = ctx.metrics or metrics.for_model(name)
        if self.held.add(key):
            if model.state == table.WAKEABLE:
                m.wakes.inc()
                logger.info("waking model", extra={"fields": {"model": name, "endpoint": f"{key[0]}/{key[1]}"}})
            self.wake.set()
        m.held.inc()
        next_comment = now
        await in_task()  # asyncio.timeout below
        try:
            while True:
                current = self.router.models.get(key)
                if current is None:
                    raise errors.model_not_found(name)
                if current.replicas:
                    return current
                self._refuse_unservable(current)
                if self.holds_ended:
                    raise errors.shutting_down(s.retry_after_seconds)
                now = time.perf_counter()
                remaining = ctx.hold_deadline - now
                if remaining <= 0:
                    raise errors.hold_timeout(name, now - (req.received_at or started), s.retry_after_seconds)
                if ctx.sse_early:
                    if not resp.started:
                        resp.start(200, SSE_HEADERS)
                    if now >= next_comment:
                        resp.write(WAITING_COMMENT)
                        next_comment = now + s.hold_keepalive_seconds
                    remaining = min(remaining, max(0.0, next_comment - now))
                # asyncio.timeout, not wait_for: Python 3.11's wait_for can swallow a cancellation
                # (the client leaving) that coincides with the change; shield: the future is shared.
                try:
                    async with asyncio.timeout(remaining):
                        await asyncio.shield(current.changed())
                except TimeoutError:
                    pass
        finally:
            m.held.dec()
            ctx.held_s = (ctx.held_s or 0.0) + (time.perf_counter() - started)
            if self.held.remove(key):
                self.wake.set()

    def _refuse_unservable(self, model: Model) -> None:
        if model.replicas:
            return
        if model.state == table.OFF:
            raise errors.switched_off(model.served_name)
        if model.state == table.FAILED:
            raise errors.model_failed(model.served_name, model.info.message)

    def end_holds(self) -> None:
        """Shutting down: every held request ends now (503 shutting_down), so none is cut mid-air."""
        self.holds_ended = True
        for model in list(self.router.models.values()):
            model.notify()

    # --- forwarding ---------------------------------------------------------------------------

    def _upstream_head(self, req: Request, replica: Replica) -> bytes:
        parts = [req.method.encode(), b" ", req.target, b" HTTP/1.1\r\nhost: ", replica.netloc.encode(), b"\r\n"]
        forwarded_for = b""
        drop = hop_by_hop(req.headers)
        for k, v in req.headers:
            if k in drop:
                continue
            if k == b"x-forwarded-for":
                forwarded_for += v + b", "  # several headers are one list, in order
                continue
            parts += (k, b": ", v, b"\r\n")
        if req.peer:
            parts += (b"x-forwarded-for: ", forwarded_for, req.peer.encode(), b"\r\n")
        parts.append(b"content-length: %d\r\n\r\n" % len(req.body))
        return b"".join(parts)

    def _response_headers(self, ex: Exchange, replica: Replica) -> tuple[Headers, int | None]:
        out: Headers = []
        length: int | None = None
        chunked = False
        drop = hop_by_hop(ex.headers)
        for k, v in ex.headers:
            if k == b"content-length":
                try:
                    length = int(v)
                except ValueError:
                    length = None
                continue
            if k == b"transfer-encoding":
                chunked = b"chunked" in v.lower()
                continue
            if k in drop:
                continue
            out.append((k, v))
        if self.settings.replica_header:
            out.append((b"x-modelendpoint-replica", replica.id.encode()))
        return out, (None if chunked else length)

    async def _forward(self, req: Request, resp: Responder, model: Model, body: dict[str, Any] | None,
                       ctx: Ctx) -> None:
        s = self.settings
        key_text = None
        if model.info.strategy == table.PREFIX_HASH and body is not None:
            key_text = prefix.prefix_key(body, model.info.prefix_hash.prefix_char_length)
            if key_text is not None and ctx.adapter is not None:
                # vLLM caches prefixes per adapter: each adapter's prefixes get their own places on the ring.
                key_text = f"{ctx.adapter}\x00{key_text}"
        retry_on = ADAPTER_RETRY_STATUSES if ctx.adapter is not None else RETRY_STATUSES
        tried: list[Replica] = []
        skipped: tuple[int, Headers, bytes] | None = None  # the last 503 not passed on (retried instead)
        stale_retry = True  # one free retry when a reused idle connection turns out closed
        m = ctx.metrics or metrics.for_model(model.served_name)
        while True:
            current = self.router.models.get(model.key)
            if current is None:
                raise errors.model_not_found(model.served_name)
            model = current
            replica = model.choose(key_text, tried)
            if replica is None:
                if tried:
                    break  # every ready replica was tried
                if ctx.stream and wants_sse(req, model.info):
                    ctx.sse_early = True
                model = await self._hold(model, req, resp, ctx)
                continue
            if ctx.attempts >= s.max_attempts:
                break
            ctx.attempts += 1
            ctx.replica = replica.id
            # Counted from the choice on, before any await: a burst of requests must see each other.
            replica.in_flight += 1
            m.in_flight.inc()
            try:
                try:
                    conn, reused = await self.pool.get(replica.host, replica.port)
                except (TimeoutError, OSError) as exc:
                    logger.warning("replica unreachable", extra={"fields": {
                        "model": model.served_name, "replica": replica.id,
                        "error": str(exc) or type(exc).__name__}})
                    tried.append(replica)
                    m.retry("connect")
                    continue
                if not reused:
                    metrics.UPSTREAM_CONNECTIONS.inc()
                can_retry = ctx.attempts < s.max_attempts and any(
                    r is not replica and r not in tried for r in model.replicas)
                outcome = await self._exchange(req, resp, model, replica, conn, ctx,
                                               retry_on if can_retry else frozenset())
            except UpstreamError as exc:
                if reused and exc.before_response and stale_retry:
                    stale_retry = False
                    ctx.attempts -= 1  # the pool's stale connection, not the replica's failure
                    continue
                tried.append(replica)
                m.retry("connection")
                logger.warning("replica connection failed before the answer", extra={"fields": {
                    "model": model.served_name, "replica": replica.id, "error": str(exc)}})
                continue
            finally:
                replica.in_flight -= 1
                m.in_flight.dec()
            if outcome is None:
                return
            skipped = outcome
            tried.append(replica)
            m.retry(str(outcome[0]))
        if skipped is not None:
            status, headers, data = skipped
            if resp.started:
                resp.write(errors.upstream_error_as_event(status, data, ctx.dialect))
                resp.end()
            else:
                resp.send(status, headers, data)
            return
        raise errors.upstream_unreachable(model.served_name, ctx.attempts, s.retry_after_seconds)

    async def _exchange(self, req: Request, resp: Responder, model: Model, replica: Replica,
                        conn: UpstreamConnection, ctx: Ctx,
                        retry_on: frozenset[int]) -> tuple[int, Headers, bytes] | None:
        """One try on one replica.

        None: answered (completely, or cut after it started: never retried). A
        (status, headers, body) answer with a status of ``retry_on`` (a 503; for
        an adapter also a 404) to try elsewhere. UpstreamError: the connection
        failed before any byte of an answer; try elsewhere.
        """
        ex = conn.request(self._upstream_head(req, replica), req.body)
        early = resp.started  # a held stream whose SSE headers are out

        def on_head() -> None:
            # Runs inside the parser callback: the answer starts in the same loop iteration as the
            # replica's head arrived, and the first chunk of that read goes straight through.
            if ex.status in retry_on:
                return  # kept aside; maybe retried elsewhere
            if early:
                if ex.status == 200:
                    self._couple(resp, conn)
                    ex.set_sink(self._first_byte_sink(resp, ex, ctx))
                return
            headers, length = self._response_headers(ex, replica)
            resp.start(ex.status, headers, length, cork=True)
            self._couple(resp, conn)
            ex.set_sink(self._first_byte_sink(resp, ex, ctx))

        ex.on_head = on_head
        timer: list[asyncio.TimerHandle] = []
        if early:
            # Keep the comments coming until the replica's first byte (a long prompt's prefill).
            interval = self.settings.hold_keepalive_seconds

            def tick() -> None:
                if ctx.first_byte_at is None and not resp.finished and not resp.client_gone:
                    resp.write(WAITING_COMMENT)
                    timer[:] = [self.loop.call_later(interval, tick)]

            timer.append(self.loop.call_later(interval, tick))
        try:
            return await self._exchange_body(req, resp, replica, conn, ex, ctx, retry_on, early)
        finally:
            for t in timer:
                t.cancel()

    async def _exchange_body(self, req: Request, resp: Responder, replica: Replica, conn: UpstreamConnection,
                             ex: Exchange, ctx: Ctx, retry_on: frozenset[int],
                             early: bool) -> tuple[int, Headers, bytes] | None:
        try:
            await ex.head
            if ex.status in retry_on:
                await ex.done
                data = ex.buffered()
                self.pool.put(conn, ex.keep_alive)
                headers, _ = self._response_headers(ex, replica)
                return ex.status, headers, data
        except BaseException:
            conn.close()
            if resp.started and not early:
                raise RuntimeError("a replica's answer started but its head failed") from None
            raise
        try:
            if early:
                ok = await self._into_early_stream(resp, ex, ctx)
            else:
                ok = await self._stream(resp, ex, ctx)
        except BaseException:
            conn.close()  # the client went away: the replica sees the disconnect and stops generating
            raise
        finally:
            if resp.conn.paused_reader is conn.transport:
                resp.conn.paused_reader = None
        if ok:
            self.pool.put(conn, ex.keep_alive)
        else:
            conn.close()
        return None

    @staticmethod
    def _couple(resp: Responder, conn: UpstreamConnection) -> None:
        """Back-pressure: while the client's socket is full, the replica's is not read."""
        client = resp.conn
        client.paused_reader = conn.transport
        if client.write_paused:
            conn.transport.pause_reading()

    def _first_byte_sink(self, resp: Responder, ex: Exchange, ctx: Ctx) -> Callable[[bytes], None]:
        write = resp.write

        def first(data: bytes) -> None:
            ctx.first_byte_at = time.perf_counter()
            ex.sink = write  # every later chunk: straight to the client's socket
            write(data)

        return first

    async def _stream(self, resp: Responder, ex: Exchange, ctx: Ctx) -> bool:
        """Wait while the replica's answer passes on (started by on_head); False when it broke midway."""
        try:
            await ex.done
        except UpstreamError:
            # The answer had started: no retry. An SSE stream ends with an error event, as the
            # runtime ends its own failed streams (unless its length was given: an event would not
            # fit); anything else is cut, so the client sees it broken.
            ctype = next((v for k, v in ex.headers if k == b"content-type"), b"")
            if b"text/event-stream" in ctype and not resp.sized and not resp.client_gone:
                resp.write(errors.upstream_broken().sse_event(ctx.dialect))
                resp.end()
            else:
                resp.abort()
            ctx.error_code = "upstream_broken"
            return False
        if ctx.first_byte_at is None:
            ctx.first_byte_at = time.perf_counter()
        resp.end()
        return True

    async def _into_early_stream(self, resp: Responder, ex: Exchange, ctx: Ctx) -> bool:
        """A held stream's headers are out: pass the replica's events on, or its error as an event."""
        try:
            if ex.status != 200:
                await ex.done
                ctx.first_byte_at = time.perf_counter()
                ctx.error_code = "upstream_error"
                resp.write(errors.upstream_error_as_event(ex.status, ex.buffered(), ctx.dialect))
                resp.end()
                return True
            await ex.done
        except UpstreamError:
            if not resp.client_gone:
                resp.write(errors.upstream_broken().sse_event(ctx.dialect))
                resp.end()
            ctx.error_code = "upstream_broken"
            return False
        resp.end()
        return True

    def protocol_error(self, req: Request | None, resp: Responder | None, status: int, detail: str) -> bytes:
        """Bodies of the errors the HTTP layer answers itself (unparsable or oversized requests, a crash)."""
        metrics.for_model(metrics.UNROUTED).request(status)
        dialect = errors.dialect_of(req.path) if req is not None and req.path else errors.OPENAI
        if status == 431:
            return errors.headers_too_large(self.settings.max_header_bytes).body_bytes(dialect)
        if status == 413:
            return errors.body_too_large(self.settings.max_body_bytes).body_bytes(dialect)
        if status == 500:
            return errors.internal_error().body_bytes(dialect)
        return errors.bad_request(detail).body_bytes(dialect)
