"""HTTP/1.1 on asyncio protocols with httptools: the server side, and pooled upstream connections.

Why not a framework: a proxied stream costs, per chunk, one ``data_received``
from the replica's socket, one ``on_body`` from the C parser and one
``transport.write`` to the client, all inside a single callback. No coroutine
is woken and nothing is parsed or copied beyond the chunk framing. A
framework's streaming response (an async iterator feeding a send coroutine)
costs several task switches per chunk; at thousands of concurrent streams
that is most of a core.

Server: one request at a time per connection (pipelined requests are queued
and answered in order), limits on header and body size, an idle timeout for
keep-alive connections, and back-pressure: when a client reads slower than
the replica writes, the replica's socket stops being read.

Upstream: keep-alive connections per replica address, reused most recently
used first and dropped after ``idle_seconds`` (below the runtime's own
keep-alive timeout, so the replica never closes a connection the gateway is
about to use... nearly: a reused connection that fails before any byte of an
answer is retried on a fresh one by the caller).
"""

from __future__ import annotations

import asyncio
import collections
import http
import logging
import socket
import time
import types
from collections.abc import Awaitable, Callable, Coroutine, Generator
from typing import Any

import httptools

logger = logging.getLogger(__name__)

Headers = list[tuple[bytes, bytes]]

# Not forwarded either way: they describe one hop, not the message.
HOP_BY_HOP = frozenset({
    b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"te", b"trailer", b"upgrade",
    b"proxy-authenticate", b"proxy-authorization", b"content-length", b"host", b"expect",
})


def hop_by_hop(headers: Headers) -> frozenset[bytes]:
    """The names not forwarded: the fixed ones, and those a ``Connection`` header lists (RFC 9110 7.6.1)."""
    listed = [t.strip().lower() for k, v in headers if k == b"connection" for t in v.split(b",")]
    return HOP_BY_HOP.union(listed) if listed else HOP_BY_HOP


_REASONS = {s.value: s.phrase.encode() for s in http.HTTPStatus}
_CRLF = b"\r\n"
_LAST_CHUNK = b"0\r\n\r\n"
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


def status_line(status: int, version: bytes = b"1.1") -> bytes:
    return b"HTTP/" + version + b" %d %s\r\n" % (status, _REASONS.get(status, b"Unknown"))


class HeaderTooLarge(Exception):
    pass


class BodyTooLarge(Exception):
    pass


class Request:
    """One parsed request: method, target, headers (names lower-case), complete body."""

    __slots__ = ("method", "target", "path", "query", "version", "headers", "body", "keep_alive",
                 "received_at", "peer", "content_length")

    def __init__(self) -> None:
        self.method = ""
        self.target = b""
        self.path = ""
        self.query = b""
        self.version = "1.1"
        self.headers: Headers = []
        self.body = b""
        self.keep_alive = True
        self.received_at = 0.0
        self.peer = ""
        self.content_length: int | None = None

    def header(self, name: bytes) -> str | None:
        for k, v in self.headers:
            if k == name:
                return v.decode("latin-1")
        return None


class Responder:
    """Writes one response to the client connection: head, body chunks, end."""

    __slots__ = ("conn", "transport", "chunked", "sized", "started", "finished", "status", "close_after",
                 "head_only", "first_byte_at", "bytes_out", "_raw", "_head")

    def __init__(self, conn: ServerConnection, request: Request) -> None:
        self.conn = conn
        self.transport = conn.transport
        self.chunked = False
        self.sized = False  # a content-length went out: nothing can be added to the body
        self.started = False
        self.finished = False
        self.status = 0
        self.close_after = not request.keep_alive
        self.head_only = request.method == "HEAD"
        self.first_byte_at = 0.0
        self.bytes_out = 0
        self._raw = request.version == "1.0"
        self._head = b""

    @property
    def client_gone(self) -> bool:
        return self.conn.closed

    def start(self, status: int, headers: Headers, content_length: int | None = None, cork: bool = False) -> None:
        """Send the status line and headers; without a length the body is chunked (close-delimited on HTTP/1.0).

        ``cork``: hold the head back until the first body piece or the end of this loop iteration,
        so that head and first chunk leave in one write (one syscall, one packet).
        """
        if self.started:
            raise RuntimeError("response already started")
        self.started = True
        self.status = status
        parts = [status_line(status)]
        for name, value in headers:
            parts += (name, b": ", value, _CRLF)
        if self.conn.server.draining:
            self.close_after = True
        if status in (204, 304) or status < 200:
            # No body by definition: no framing either (a chunked terminator would be read as
            # the start of the next response).
            self.head_only = True
        elif content_length is not None:
            self.sized = True
            parts.append(b"content-length: %d\r\n" % content_length)
        elif self._raw:
            self.close_after = True
        else:
            self.chunked = True
            parts.append(b"transfer-encoding: chunked\r\n")
        if self.close_after:
            parts.append(b"connection: close\r\n")
        parts.append(_CRLF)
        if self.head_only:
            self.chunked = False
        if self.conn.closed:
            return
        if cork:
            self._head = b"".join(parts)
            self.conn.loop.call_soon(self._flush_head)
        else:
            self.transport.write(b"".join(parts))

    def _flush_head(self) -> None:
        if self._head:
            head, self._head = self._head, b""
            if not self.conn.closed:
                self.transport.write(head)

    def write(self, data: bytes) -> None:
        """One piece of the body (the hot path of a stream)."""
        if not data or self.head_only or self.conn.closed:
            return
        self.bytes_out += len(data)
        if self._head:
            head, self._head = self._head, b""
            self.transport.write(head + (b"%x\r\n%b\r\n" % (len(data), data) if self.chunked else data))
        elif self.chunked:
            self.transport.write(b"%x\r\n%b\r\n" % (len(data), data))
        else:
            self.transport.write(data)

    def end(self) -> None:
        if self.finished:
            return
        self.finished = True
        self._flush_head()
        if self.chunked and not self.conn.closed:
            self.transport.write(_LAST_CHUNK)
        self.conn.response_done(self)

    def send(self, status: int, headers: Headers, body: bytes) -> None:
        """A whole small response at once."""
        self.start(status, headers, len(body))
        self.write(body)
        self.end()

    def abort(self) -> None:
        """Close the connection without finishing the body (the client sees a truncated response)."""
        self.finished = True
        self.conn.abort()

    async def drain(self) -> None:
        await self.conn.drain()


Handler = Callable[[Request, Responder], Awaitable[None]]


@types.coroutine
def in_task() -> Generator[None, None, None]:
    """Continue inside a Task: before what needs one (``asyncio.timeout``).

    A request's handler starts running eagerly, inside the protocol callback
    that completed the request (see ``ServerConnection._next``), and moves
    into a Task at its first wait; code that needs ``asyncio.current_task()``
    awaits this first. Free inside a Task.
    """
    if asyncio.current_task() is None:
        yield None


@types.coroutine
def _resume(coro: Coroutine[Any, Any, None], pending: Any) -> Generator[Any, None, None]:
    """Run, as a Task's coroutine, a coroutine that started outside a Task and is suspended on ``pending``.

    The Task sees the futures the coroutine waits on (``pending`` first, then
    every later one) and throws its cancellation into it, as if it had run
    the coroutine from the start. ``pending`` None: continue at once (the
    coroutine asked for a Task, :func:`in_task`).
    """
    throw: BaseException | None = None
    if pending is not None:
        try:
            yield pending
        except BaseException as exc:  # noqa: BLE001 - delivered into the coroutine
            throw = exc
    while True:
        try:
            pending = coro.send(None) if throw is None else coro.throw(throw)
        except StopIteration:
            return
        throw = None
        try:
            yield pending
        except BaseException as exc:  # noqa: BLE001 - delivered into the coroutine
            throw = exc


class HTTPServer:
    """Connections and their lifecycle; ``handler`` answers every request."""

    def __init__(self, handler: Handler, *, max_header_bytes: int, max_body_bytes: int, idle_seconds: float,
                 write_timeout: float | None = None,
                 on_error: Callable[[Request | None, Responder | None, int, str], bytes] | None = None) -> None:
        self.handler = handler
        self.max_header_bytes = max_header_bytes
        self.max_body_bytes = max_body_bytes
        self.idle_seconds = idle_seconds
        # A client whose socket stayed full this long (it stopped reading) is cut: through
        # back-pressure it holds a replica's stream, and with it a slot of that engine.
        self.write_timeout = idle_seconds if write_timeout is None else write_timeout
        # Renders a protocol-level error (400, 413, 431) as a body; set by the app for OpenAI's shape.
        self.on_error = on_error
        self.connections: set[ServerConnection] = set()
        self.draining = False
        self.in_flight = 0
        self.servers: list[asyncio.base_events.Server] = []
        self._sweeper: asyncio.Task[None] | None = None
        self._idle_event = asyncio.Event()

    def protocol(self, preread: bytes = b"") -> ServerConnection:
        return ServerConnection(self, preread)

    async def adopt(self, sock: socket.socket, preread: bytes) -> None:
        """Serve a connection accepted elsewhere (the compiled data plane's handoff), whose first
        ``preread`` bytes were already read from it."""
        loop = asyncio.get_running_loop()
        if self._sweeper is None:
            self._sweeper = asyncio.ensure_future(self._sweep())
        try:
            await loop.connect_accepted_socket(lambda: self.protocol(preread), sock)
        except OSError:
            sock.close()

    async def listen(self, host: str, port: int, *, sock: socket.socket | None = None,
                     backlog: int = 2048, reuse_port: bool = False) -> asyncio.base_events.Server:
        loop = asyncio.get_running_loop()
        if sock is not None:
            server = await loop.create_server(self.protocol, sock=sock, backlog=backlog)
        else:
            server = await loop.create_server(self.protocol, host, port, backlog=backlog, reuse_address=True,
                                              reuse_port=reuse_port or None)
        self.servers.append(server)
        if self._sweeper is None:
            self._sweeper = asyncio.ensure_future(self._sweep())
        return server

    async def _sweep(self) -> None:
        """Close connections idle longer than ``idle_seconds``, a request head not complete within it
        (slow loris), and one closed that long ago whose client never read its last bytes; and one
        whose client has not read anything for ``write_timeout`` while its socket was full."""
        loop = asyncio.get_running_loop()
        period = min(5.0, max(0.5, min(self.idle_seconds, self.write_timeout) / 4))
        while True:
            await asyncio.sleep(period)
            now = loop.time()
            for conn in list(self.connections):
                if conn.closed:
                    # Closed gracefully, its last bytes never flushed: a client that stopped reading.
                    if now - conn.closed_at > self.idle_seconds:
                        conn.transport.abort()
                elif conn.write_paused and now - conn.write_paused_at > self.write_timeout:
                    logger.info("client stopped reading: connection cut", extra={"fields": {
                        "peer": conn.peer, "paused_s": round(now - conn.write_paused_at, 1)}})
                    conn.abort()
                elif conn.current is None and now - conn.last_activity > self.idle_seconds:
                    conn.abort()
                elif conn.head_started_before(now - self.idle_seconds):
                    conn.abort()  # a head trickled in a byte at a time (slow loris)

    def stop_listening(self) -> None:
        for server in self.servers:
            server.close()

    def start_drain(self) -> None:
        """No new connections; idle keep-alive ones close; busy ones close after their response."""
        self.draining = True
        self.stop_listening()
        for conn in list(self.connections):
            if conn.current is None and not conn.queue:
                conn.abort()

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until no request is in flight (True) or ``timeout`` passed (False)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.in_flight > 0:
            remaining = deadline - loop.time()
            if remaining <= 0:
                return False
            self._idle_event.clear()
            try:
                async with asyncio.timeout(min(remaining, 0.5)):
                    await self._idle_event.wait()
            except TimeoutError:
                pass
        return True

    def close_all(self) -> None:
        for conn in list(self.connections):
            conn.abort()
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None

    def _request_finished(self, task: object = None) -> None:
        self.in_flight -= 1
        if self.in_flight <= 0:
            self._idle_event.set()


class ServerConnection(asyncio.Protocol):
    """One client connection."""

    def __init__(self, server: HTTPServer, preread: bytes = b"") -> None:
        self.server = server
        self._preread = preread
        self.loop = asyncio.get_event_loop()
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.parser = httptools.HttpRequestParser(self)
        self.closed = False
        self.queue: collections.deque[Request] = collections.deque()
        self.current: Responder | None = None
        self.task: asyncio.Task[None] | None = None
        self.last_activity = 0.0
        self.closed_at = 0.0
        self.peer = ""
        # Request being parsed.
        self._req: Request | None = None
        self._url = bytearray()
        self._body: list[bytes] = []
        self._body_size = 0
        self._head_size = 0
        self._in_head = True
        self._head_started = 0.0
        self._completed_in_read = False
        self._continue_owed = False  # an Expect: 100-continue that waits for the response in flight
        # Back-pressure: who to pause while the client's socket buffer is full.
        self.write_paused = False
        self.write_paused_at = 0.0
        self.paused_reader: asyncio.Transport | None = None
        self._drain_waiter: asyncio.Future[None] | None = None
        self._reading_paused = False

    # --- asyncio.Protocol ---------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.server.connections.add(self)
        self.last_activity = self.loop.time()
        peer = transport.get_extra_info("peername")
        self.peer = peer[0] if isinstance(peer, tuple) and peer else ""
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
        if self._preread:
            # Handed over with bytes already read: they come first, before anything read from the
            # socket (which starts once this callback returns).
            data, self._preread = self._preread, b""
            self.data_received(data)

    def data_received(self, data: bytes) -> None:
        self.last_activity = self.loop.time()
        self._completed_in_read = False
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:
            cause = exc.__context__
            if isinstance(cause, HeaderTooLarge):
                self._protocol_error(431, "headers")
            elif isinstance(cause, BodyTooLarge):
                self._protocol_error(413, "body")
            else:
                logger.error("HTTP parser callback failed", exc_info=cause)
                self._protocol_error(400, "callback")
            return
        except httptools.HttpParserUpgrade:
            if self._req is None:
                # The request asking for the upgrade is complete: it is answered as any other (its
                # upgrade headers are hop-by-hop), and nothing more is read from this connection.
                self._last_request()
            else:
                self._protocol_error(400, "protocol upgrades (WebSocket, h2c) are not supported")
            return
        except httptools.HttpParserError as exc:
            self._protocol_error(400, str(exc) or "invalid HTTP")
            return
        if self._in_head and not self._completed_in_read:
            # Still inside a request head after parsing all of it: these bytes are head bytes,
            # which httptools keeps until a header line ends; bound them here. A read that also
            # completed a request holds that request's body too, so it is not counted (the head
            # that follows is checked from the next read on, and as a whole once it is complete).
            self._head_size += len(data)
            if self._head_size > self.server.max_header_bytes:
                self._protocol_error(431, "headers")

    def head_started_before(self, when: float) -> bool:
        """Whether a request head is being read that began before ``when`` (loop time)."""
        return self._req is not None and self._in_head and self._head_started < when

    def eof_received(self) -> bool | None:
        # A client that half-closes is gone for our purposes: stop its work.
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.server.connections.discard(self)
        if self.task is not None and not self.task.done():
            self.task.cancel()
        if self.paused_reader is not None:
            self.paused_reader = None
        if self._drain_waiter is not None and not self._drain_waiter.done():
            self._drain_waiter.set_result(None)

    def pause_writing(self) -> None:
        self.write_paused = True
        self.write_paused_at = self.loop.time()
        if self.paused_reader is not None:
            self.paused_reader.pause_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.paused_reader is not None:
            self.paused_reader.resume_reading()
        if self._drain_waiter is not None and not self._drain_waiter.done():
            self._drain_waiter.set_result(None)

    async def drain(self) -> None:
        if self.write_paused and not self.closed:
            self._drain_waiter = self.loop.create_future()
            await self._drain_waiter

    # --- httptools callbacks --------------------------------------------------------

    def on_message_begin(self) -> None:
        self._req = Request()
        self._url = bytearray()
        self._body = []
        self._body_size = 0
        self._in_head = True
        self._head_size = 0
        self._head_started = self.loop.time()

    def on_url(self, url: bytes) -> None:
        self._url += url
        if len(self._url) > self.server.max_header_bytes:
            raise HeaderTooLarge()

    def on_header(self, name: bytes, value: bytes) -> None:
        req = self._req
        assert req is not None
        if not self._in_head:
            # A chunked body's trailer: not a header of the request (it must not pass for an
            # Authorization, nor be forwarded), bounded as body bytes.
            self._body_size += len(name) + len(value)
            if self._body_size > self.server.max_body_bytes:
                raise BodyTooLarge()
            return
        req.headers.append((name.lower(), value))
        if len(req.headers) > 1000:
            raise HeaderTooLarge()

    def on_headers_complete(self) -> None:
        req = self._req
        assert req is not None
        if len(self._url) + sum(len(k) + len(v) + 4 for k, v in req.headers) > self.server.max_header_bytes:
            raise HeaderTooLarge()
        self._in_head = False
        req.method = self.parser.get_method().decode("latin-1")
        req.version = self.parser.get_http_version()
        req.keep_alive = self.parser.should_keep_alive()
        req.target = bytes(self._url)
        path, _, query = req.target.partition(b"?")
        req.path = path.decode("latin-1")
        req.query = query
        req.peer = self.peer
        length = req.header(b"content-length")
        if length is not None and length.strip().isdigit():
            req.content_length = int(length)
            if req.content_length > self.server.max_body_bytes:
                raise BodyTooLarge()
        if (req.header(b"expect") or "").lower() == "100-continue" and req.version != "1.0":
            if self.current is None and not self.queue:
                self.transport.write(_CONTINUE)
            else:
                # Not inside the answer being written: after it (response_done).
                self._continue_owed = True

    def on_body(self, body: bytes) -> None:
        self._body_size += len(body)
        if self._body_size > self.server.max_body_bytes:
            raise BodyTooLarge()
        self._body.append(body)

    def on_message_complete(self) -> None:
        req = self._req
        assert req is not None
        self._req = None
        self._in_head = True
        self._head_size = 0
        self._completed_in_read = True
        self._continue_owed = False
        req.body = self._body[0] if len(self._body) == 1 else b"".join(self._body)
        self._body = []
        req.received_at = time.perf_counter()  # loop.time() has millisecond resolution under uvloop
        self.queue.append(req)
        if len(self.queue) > 32 and not self._reading_paused:
            # A client pipelining without reading: stop taking more until we catch up.
            self._reading_paused = True
            self.transport.pause_reading()
        if self.current is None:
            self._next()

    # --- dispatch -----------------------------------------------------------------------

    def _next(self) -> None:
        if self.closed or not self.queue:
            return
        req = self.queue.popleft()
        if self._reading_paused and len(self.queue) < 8:
            self._reading_paused = False
            self.transport.resume_reading()
        responder = Responder(self, req)
        self.current = responder
        self.server.in_flight += 1
        # The handler runs at once, in this callback, up to its first wait: a proxied request
        # is on its way to the replica before this loop iteration's other events are handled,
        # rather than a task's first step after all of them (a loop iteration at high load
        # is milliseconds). Answers that need no wait (errors, health) never make a task.
        coro = self._run(req, responder)
        try:
            pending = coro.send(None)
        except StopIteration:
            self.server._request_finished()
            return
        except BaseException:
            self.server._request_finished()
            raise
        task = self.loop.create_task(_resume(coro, pending))
        # A done callback, not a finally in _run: a task cancelled before its next step (the
        # client left at once) never runs the rest of its body.
        task.add_done_callback(self.server._request_finished)
        if self.current is responder:
            self.task = task

    async def _run(self, req: Request, responder: Responder) -> None:
        try:
            await self.server.handler(req, responder)
        except asyncio.CancelledError:
            if not responder.finished:
                responder.abort()
            raise
        except Exception:  # noqa: BLE001 - a bug must cost one request, not the connection's others
            logger.exception("request handler failed")
            if not responder.started and not self.closed:
                body = self.server.on_error(req, responder, 500, "internal") if self.server.on_error else b""
                responder.send(500, [(b"content-type", b"application/json")], body)
            elif not responder.finished:
                responder.abort()
        finally:
            if not responder.finished:
                responder.end()

    def response_done(self, responder: Responder) -> None:
        if responder is not self.current:
            return
        self.current = None
        self.task = None
        self.paused_reader = None
        self.last_activity = self.loop.time()
        if responder.close_after or self.closed:
            self.abort(graceful=True)
            return
        if self.server.draining and not self.queue:
            self.abort(graceful=True)
            return
        if self._continue_owed and not self.queue:
            self._continue_owed = False
            self.transport.write(_CONTINUE)
        if self.queue:
            self.loop.call_soon(self._next)

    def abort(self, graceful: bool = False) -> None:
        if self.closed:
            return
        self.closed = True
        self.closed_at = self.loop.time()
        if graceful:
            self.transport.close()  # flushes what is buffered first
        else:
            self.transport.abort()

    def _last_request(self) -> None:
        """The connection closes after the answer to the last request read (queued, in flight or sent)."""
        if self.closed:
            return
        self.transport.pause_reading()
        self._reading_paused = False  # for good: _next never resumes it
        if self.queue:
            self.queue[-1].keep_alive = False
        elif self.current is not None:
            self.current.close_after = True
        else:
            self.abort(graceful=True)

    def _protocol_error(self, status: int, detail: str) -> None:
        """An unparsable or oversized request: answer it (if nothing is being answered) and close."""
        if self.closed:
            return
        if self.current is None:
            body = self.server.on_error(self._req, None, status, detail) if self.server.on_error else b""
            head = status_line(status) + b"content-type: application/json\r\ncontent-length: %d\r\n" \
                b"connection: close\r\n\r\n" % len(body)
            self.transport.write(head + body)
        self.abort(graceful=True)


# --- upstream --------------------------------------------------------------------------------


class UpstreamError(Exception):
    """The replica's connection failed; ``before_response``: no byte of an answer arrived."""

    def __init__(self, message: str, before_response: bool) -> None:
        super().__init__(message)
        self.before_response = before_response


class Exchange:
    """One request/response on an upstream connection, fed by the connection's parser callbacks."""

    __slots__ = ("status", "headers", "keep_alive", "head", "done", "sink", "_buffer", "framed", "bytes_in", "on_head")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.status = 0
        self.headers: Headers = []
        self.keep_alive = True
        self.head: asyncio.Future[None] = loop.create_future()
        self.done: asyncio.Future[None] = loop.create_future()
        self._buffer: list[bytes] = []
        self.sink: Callable[[bytes], Any] = self._keep
        self.framed = False  # content-length or chunked (else: ends when the connection closes)
        self.bytes_in = 0
        # Called from the parser as soon as the head is in, before any body piece of the same read:
        # the response can start (and the sink be set) without waiting for a task to wake up.
        self.on_head: Callable[[], None] | None = None

    def _keep(self, piece: bytes) -> None:
        self._buffer.append(piece)

    def set_sink(self, sink: Callable[[bytes], Any]) -> None:
        """Body pieces go to ``sink`` from now on (those buffered so far first)."""
        buffered, self._buffer = self._buffer, []
        self.sink = sink
        for piece in buffered:
            # self.sink, not sink: a sink may replace itself (the first-byte timer does).
            self.sink(piece)

    def buffered(self) -> bytes:
        """What arrived while nobody took it (the whole body of an answer that is not streamed on)."""
        out = b"".join(self._buffer)
        self._buffer.clear()
        return out

    def fail(self, exc: BaseException) -> None:
        if not self.head.done():
            self.head.set_exception(exc)
            # Nobody may await ``done`` if ``head`` failed: keep asyncio from warning.
            self.done.set_exception(exc)
            self.done.exception()
        elif not self.done.done():
            self.done.set_exception(exc)


class UpstreamConnection(asyncio.Protocol):
    """A keep-alive connection to one replica."""

    def __init__(self, pool: Pool, address: tuple[str, int]) -> None:
        self.pool = pool
        self.address = address
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.parser = httptools.HttpResponseParser(self)
        self.exchange: Exchange | None = None
        self.closed = False
        self.used = 0
        self.got_bytes = False
        # Body pieces of one read, passed on together after the parser is done with it: one write
        # to the client for however many chunks the replica's socket had ready, not one each.
        self._pieces: list[bytes] = []
        self._pieces_of: Exchange | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass

    def request(self, head: bytes, body: bytes) -> Exchange:
        ex = Exchange(asyncio.get_event_loop())
        self.exchange = ex
        self.got_bytes = False
        self.used += 1
        if body:
            self.transport.writelines((head, body))
        else:
            self.transport.write(head)
        return ex

    def data_received(self, data: bytes) -> None:
        self.got_bytes = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._flush()
            ex = self.exchange
            self.close()
            if ex is not None:
                ex.fail(UpstreamError(f"invalid HTTP from the replica: {exc}", not ex.head.done()))
            return
        if self._pieces:
            self._flush()

    def _flush(self) -> None:
        pieces, ex = self._pieces, self._pieces_of
        if not pieces or ex is None:
            return
        self._pieces = []
        self._pieces_of = None
        ex.sink(pieces[0] if len(pieces) == 1 else b"".join(pieces))

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.exchange is not None:
            self.exchange.headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        ex = self.exchange
        if ex is None:
            return
        status = self.parser.get_status_code()
        if status < 200:
            # An interim answer (103 Early Hints, a stray 100): the real one follows on this
            # connection; its headers are not the response's.
            ex.headers.clear()
            return
        ex.status = status
        ex.keep_alive = self.parser.should_keep_alive()
        for k, v in ex.headers:
            if k == b"content-length" or (k == b"transfer-encoding" and b"chunked" in v.lower()):
                ex.framed = True
        if ex.on_head is not None:
            # Dropped before the call: the callback refers to the exchange, and a cycle would leave
            # each request's objects to the garbage collector instead of reference counting.
            on_head, ex.on_head = ex.on_head, None
            on_head()
        if not ex.head.done():
            ex.head.set_result(None)

    def on_body(self, body: bytes) -> None:
        ex = self.exchange
        if ex is not None:
            ex.bytes_in += len(body)
            if self._pieces_of is not ex:
                self._flush()
                self._pieces_of = ex
            self._pieces.append(body)

    def on_message_complete(self) -> None:
        ex = self.exchange
        if ex is None:
            return
        self.exchange = None
        if not ex.head.done():  # the 1xx of on_headers_complete: the answer is still to come
            self.exchange = ex
            return
        if not ex.done.done():
            ex.done.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._flush()
        ex = self.exchange
        self.exchange = None
        if ex is None:
            return
        if ex.head.done() and not ex.framed and not ex.done.done() and exc is None:
            ex.done.set_result(None)  # a close-delimited body ends here (a reset cuts it: an error)
            return
        ex.fail(UpstreamError(f"connection to the replica lost ({exc or 'closed'})", not self.got_bytes))

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self.transport is not None:
                self.transport.abort()

    @property
    def reusable(self) -> bool:
        return not self.closed and self.exchange is None


class Pool:
    """Idle keep-alive connections per replica address."""

    def __init__(self, *, connect_timeout: float, idle_seconds: float, max_idle_per_address: int) -> None:
        self.connect_timeout = connect_timeout
        self.idle_seconds = idle_seconds
        self.max_idle = max_idle_per_address
        self.idle: dict[tuple[str, int], collections.deque[tuple[UpstreamConnection, float]]] = {}
        self.opened = 0
        self._sweeper: asyncio.Task[None] | None = None

    async def get(self, host: str, port: int) -> tuple[UpstreamConnection, bool]:
        """A connection to ``host:port`` and whether it was reused; OSError/TimeoutError if none can be made."""
        loop = asyncio.get_running_loop()
        address = (host, port)
        idle = self.idle.get(address)
        if idle:
            now = loop.time()
            while idle:
                conn, since = idle.pop()
                if not conn.closed and now - since < self.idle_seconds:
                    return conn, True
                conn.close()
        if self._sweeper is None:
            self._sweeper = asyncio.ensure_future(self._sweep())
        await in_task()
        async with asyncio.timeout(self.connect_timeout):
            _, conn = await loop.create_connection(lambda: UpstreamConnection(self, address), host, port)
        self.opened += 1
        return conn, False

    def put(self, conn: UpstreamConnection, keep_alive: bool) -> None:
        """Give back a connection whose exchange finished; it is kept only if reusable."""
        if not keep_alive or not conn.reusable or self.max_idle == 0:
            conn.close()
            return
        idle = self.idle.setdefault(conn.address, collections.deque())
        if len(idle) >= self.max_idle:
            conn.close()
            return
        if conn.transport.is_reading() is False:
            conn.transport.resume_reading()
        idle.append((conn, asyncio.get_event_loop().time()))

    async def _sweep(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(max(0.25, self.idle_seconds / 4))
            now = loop.time()
            for address in list(self.idle):
                idle = self.idle[address]
                while idle and (idle[0][0].closed or now - idle[0][1] >= self.idle_seconds):
                    idle.popleft()[0].close()
                if not idle:
                    del self.idle[address]

    def drop(self, address: tuple[str, int]) -> None:
        """Close the idle connections to a replica that went away."""
        for conn, _ in self.idle.pop(address, ()):
            conn.close()

    def close(self) -> None:
        for address in list(self.idle):
            self.drop(address)
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
