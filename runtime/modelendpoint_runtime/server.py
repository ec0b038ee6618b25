"""The connection layer: listening sockets, and uvicorn's httptools protocol with the runtime's limits.

uvicorn bounds none of what a hostile or broken client can hold: a
connection that sends nothing, a head that never ends, a 10 MB header, a
client that stops reading a response. :func:`protocol_class` adds, per
connection, with timers and counters only (no work per streamed chunk):

* ``MAX_CONNECTIONS``: a request arriving on a connection beyond it gets 503
  ``too_many_connections`` (OpenAI's shape) and the connection is closed;
* ``MAX_HEADER_BYTES``: a request line plus headers beyond it get 431 and
  the connection is closed, counted while they arrive (so nothing large is
  ever buffered);
* ``READ_TIMEOUT_SECONDS``: the head must arrive within it (from the
  connection, or the request's first byte), else 408 and close; the body
  must arrive within it from the first byte too (the route answers 408:
  :data:`READ_DEADLINE` in the scope tells it when);
* ``WRITE_TIMEOUT_SECONDS``: a connection whose client accepts no data for
  that long (writes stay paused: its buffers are full) is aborted; the app
  sees a disconnect, which aborts the engine request and frees its slot. The
  kernel's unsent queue is kept small (``TCP_NOTSENT_LOWAT``) so that "full"
  comes after kilobytes, not megabytes, of tokens.

Listening sockets are bound at start, before the model loads
(:func:`bind_listener`): a busy port fails fast with one line.
"""

from __future__ import annotations

import asyncio
import errno
import json
import socket
from dataclasses import dataclass
from typing import Any

import httptools
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from .errors import APIError, headers_too_large, request_timeout, too_many_connections
from .settings import ACCEPTED, ConfigError

# Scope keys shared with the app.
INFO_KEY = "modelendpoint"  # the dict where a request leaves details for its log line
READ_DEADLINE = "modelendpoint.read_deadline"  # loop time by which the body must have arrived


def bind_listener(host: str, port: int, port_var: str = "PORT") -> socket.socket:
    """A listening socket, bound now; a bad HOST or a busy port raises ConfigError naming the variable.

    Binding here, before the model loads, turns "address already in use"
    into a one-line error at start instead of a uvicorn traceback minutes
    later, once the weights are in memory. uvicorn serves on this socket
    (``server.run(sockets=[...])``); it calls ``listen`` itself.
    """
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as exc:
        raise ConfigError(f"invalid HOST={host!r} ({exc}); accepted values: {ACCEPTED['HOST']}") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        # As uvicorn does: a restarted server may rebind while old connections linger in TIME_WAIT.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise ConfigError(
                f"invalid {port_var}={port}: the port is already in use on {host}; accepted values: a free port, "
                f"{ACCEPTED['PORT']}"
            ) from None
        if exc.errno == errno.EACCES:
            raise ConfigError(
                f"invalid {port_var}={port}: permission denied (ports below 1024 need privileges)"
            ) from None
        raise ConfigError(
            f"invalid HOST={host!r}: cannot listen there ({exc.strerror}); accepted values: {ACCEPTED['HOST']}"
        ) from None
    return sock


@dataclass(frozen=True)
class ConnectionLimits:
    max_header_bytes: int = 32 * 1024
    max_connections: int = 1024
    read_timeout: float = 30.0
    write_timeout: float = 30.0
    retry_after: int = 1


class _Rejected(Exception):
    """Raised from a parser callback to stop parsing a request already answered."""


def raw_response(err: APIError) -> bytes:
    """An error response written straight to the transport (no app involved), in OpenAI's shape."""
    body = json.dumps(err.body()).encode()
    lines = [STATUS_LINE[err.status], b"content-type: application/json\r\n",
             b"content-length: " + str(len(body)).encode() + b"\r\n"]  # fmt: skip
    for name, value in err.headers.items():
        if name.lower() != "connection":
            lines.append(name.lower().encode() + b": " + value.encode() + b"\r\n")
    lines.append(b"connection: close\r\n\r\n")
    return b"".join(lines) + body


# Unsent bytes the kernel queues per connection before the socket stops
# accepting more (Linux TCP_NOTSENT_LOWAT; 25 where the constant is missing).
NOTSENT_LOWAT = 16 * 1024
_TCP_NOTSENT_LOWAT = getattr(socket, "TCP_NOTSENT_LOWAT", 25)


def _bound_unsent(transport: asyncio.BaseTransport) -> None:
    """Keep what the kernel queues unsent small, so that a client that stops reading shows.

    Without it, Linux grows a loopback or LAN socket's send buffer to
    megabytes: a stalled stream of tokens would fill it for minutes before
    the transport's own buffer pauses writing (measured: 2.7 MB). With it,
    the kernel holds at most what the client's receive window took plus
    NOTSENT_LOWAT, the transport pauses at 64 KiB more, and the write timeout
    starts. Data in flight (sent, not yet acknowledged) is not limited, so
    throughput is not. Also less latency: less queued ahead of each token.
    """
    sock = transport.get_extra_info("socket")
    if sock is None:
        return
    try:
        sock.setsockopt(socket.IPPROTO_TCP, _TCP_NOTSENT_LOWAT, NOTSENT_LOWAT)
    except (OSError, AttributeError):  # not TCP (a Unix socket), or not Linux
        pass


def protocol_class(limits: ConnectionLimits, metrics: Any = None) -> type[HttpToolsProtocol]:
    """uvicorn's httptools protocol with ``limits`` (see the module docstring); ``metrics``: ``Metrics``."""

    def count(metric_name: str, label: str) -> None:
        if metrics is not None:
            metrics.child(getattr(metrics, metric_name), label).inc()

    class GuardedHttpToolsProtocol(HttpToolsProtocol):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._in_head = False
            self._head_bytes = 0  # counted by the parser callbacks
            self._head_pending = 0  # fed while the head is incomplete
            self._began_in_read = False  # a request began in the chunk being parsed
            self._rejected = False
            self._read_timer: asyncio.TimerHandle | None = None
            self._write_timer: asyncio.TimerHandle | None = None

        # -- connection ------------------------------------------------------
        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._in_head = True  # the first request's head is due
            self._arm_read_timer()
            _bound_unsent(transport)

        def connection_lost(self, exc: Exception | None) -> None:
            self._cancel(self._read_timer)
            self._cancel(self._write_timer)
            self._read_timer = self._write_timer = None
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            # uvicorn's, except that a request we answered ourselves stops here.
            if self._rejected:
                return
            self._unset_keepalive_if_required()
            self._began_in_read = False
            try:
                self.parser.feed_data(data)
            except _Rejected:
                return
            except httptools.HttpParserError:
                if self._rejected:
                    return  # a callback of ours answered and stopped the parser
                msg = "Invalid HTTP request received."
                self.logger.warning(msg)
                self.send_400_response(msg)
                return
            except httptools.HttpParserUpgrade:
                self._unsupported_upgrade_warning()  # no WebSockets here (ws="none")
                return
            if self._in_head and not self._began_in_read:
                # The head is still incomplete and began before this chunk: all of it was head. (A
                # head that began in this chunk may follow a body: its size is counted from the
                # next chunk on, and as a whole by the callbacks.)
                self._head_pending += len(data)
                if self._head_pending > limits.max_header_bytes:
                    self._reject(headers_too_large(limits.max_header_bytes), "headers_too_large")

        # -- the head: size and time --------------------------------------------
        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._began_in_read = True
            self._in_head = True
            self._head_bytes = self._head_pending = 0
            self._arm_read_timer()
            self.scope[READ_DEADLINE] = self.loop.time() + limits.read_timeout  # type: ignore[literal-required]

        def on_url(self, url: bytes) -> None:
            self._count_head(len(url))
            super().on_url(url)

        def on_header(self, name: bytes, value: bytes) -> None:
            self._count_head(len(name) + len(value) + 4)
            super().on_header(name, value)

        def on_headers_complete(self) -> None:
            self._in_head = False
            self._cancel(self._read_timer)
            self._read_timer = None
            if len(self.connections) > limits.max_connections:
                self._reject(too_many_connections(limits.retry_after), "too_many_connections")
                raise _Rejected()
            super().on_headers_complete()

        def _count_head(self, size: int) -> None:
            self._head_bytes += size
            if self._head_bytes > limits.max_header_bytes:
                self._reject(headers_too_large(limits.max_header_bytes), "headers_too_large")
                raise _Rejected()

        def _arm_read_timer(self) -> None:
            self._cancel(self._read_timer)
            self._read_timer = self.loop.call_later(limits.read_timeout, self._read_timed_out)

        def _read_timed_out(self) -> None:
            self._read_timer = None
            if self._in_head and not self._rejected and not self.transport.is_closing():
                count("client_timeouts", "read")
                self._reject(request_timeout(limits.read_timeout), None)

        def _reject(self, err: APIError, reason: str | None) -> None:
            """Answer ``err`` ourselves and close the connection: the request never reaches the app."""
            self._rejected = True
            if reason is not None:
                count("rejected", reason)
            if not self.transport.is_closing():
                self.transport.write(raw_response(err))
                self.transport.close()

        def send_400_response(self, msg: str) -> None:
            if not self._rejected:
                super().send_400_response(msg)

        # -- writes: a client that stops reading --------------------------------
        def pause_writing(self) -> None:
            super().pause_writing()
            if self._write_timer is None:
                self._write_timer = self.loop.call_later(limits.write_timeout, self._write_timed_out)

        def resume_writing(self) -> None:
            self._cancel(self._write_timer)
            self._write_timer = None
            super().resume_writing()

        def _write_timed_out(self) -> None:
            self._write_timer = None
            if self.transport.is_closing():
                return
            count("client_timeouts", "write")
            cycle = self.cycle
            info = cycle.scope.get(INFO_KEY) if cycle is not None else None
            if isinstance(info, dict):
                info["error_code"] = "write_timeout"
            # abort: drop what is buffered for a client that does not read it.
            # The app sees http.disconnect, which aborts the engine request.
            self.transport.abort()

        @staticmethod
        def _cancel(timer: asyncio.TimerHandle | None) -> None:
            if timer is not None:
                timer.cancel()

    return GuardedHttpToolsProtocol
