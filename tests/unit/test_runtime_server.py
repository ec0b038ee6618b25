"""The connection layer under hostile clients: the runtime's app on a real uvicorn server, fake engine.

Each test starts the app with ``server.protocol_class`` on a loopback port,
in a thread (uvicorn, uvloop, httptools: what the pod runs), with a stand-in
at our seam (``Runtime.engine.state``) instead of vLLM, and talks raw HTTP
over sockets to do what SDKs never do: stall a head or a body, send huge
headers, open too many connections, stop reading a stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
import time
from types import SimpleNamespace

import pytest
import uvicorn
from prometheus_client import CollectorRegistry

from modelendpoint_runtime.app import Runtime, create_app
from modelendpoint_runtime.metrics import Metrics
from modelendpoint_runtime.server import ConnectionLimits, bind_listener, protocol_class
from modelendpoint_runtime.settings import load_settings
from waiting import wait_for

CHUNK = (
    'data: {"id":"x","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":"'
    + "y" * 900
    + '"}}]}\n\n'
)


class Serving:
    """Plays vLLM's serving classes: an answer at once, or a stream that never ends."""

    def __init__(self) -> None:
        self.streams_closed = 0  # the stream generator was closed: vLLM would abort the engine request
        self.sent = 0  # bytes the stream produced

    async def create_chat_completion(self, req, raw):
        if not req.stream:
            usage = {"prompt_tokens": 1, "completion_tokens": 1}
            return SimpleNamespace(model_dump=lambda: {"id": "x", "object": "chat.completion", "choices": [],
                                                       "usage": usage})  # fmt: skip

        async def endless():
            try:
                while True:
                    self.sent += len(CHUNK)
                    yield CHUNK
                    await asyncio.sleep(0)
            finally:
                self.streams_closed += 1

        return endless()

    create_completion = create_chat_completion


@contextlib.contextmanager
def serving(**env):
    env = {"MODEL_NAME": "m", "API_KEY": "key", "HOST": "127.0.0.1", "PORT": "1", **env}
    settings = load_settings(env)
    runtime = Runtime(settings, Metrics(CollectorRegistry()))
    fake = Serving()
    engine = SimpleNamespace(state=SimpleNamespace(openai_serving_chat=fake, openai_serving_completion=fake),
                             dead=False, shutdown=lambda: None)  # fmt: skip

    async def starter():
        return engine

    limits = ConnectionLimits(settings.max_header_bytes, settings.max_connections, settings.read_timeout_seconds,
                              settings.write_timeout_seconds, settings.retry_after_seconds)  # fmt: skip
    config = uvicorn.Config(create_app(runtime, starter), loop="uvloop", http=protocol_class(limits, runtime.metrics),
                            ws="none", lifespan="on", log_level="error", timeout_keep_alive=5)  # fmt: skip
    server = uvicorn.Server(config)
    sock = bind_listener("127.0.0.1", 0)
    port = sock.getsockname()[1]
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        wait_for(lambda: server.started and runtime.engine is not None, timeout=10, what="the server to start")
        yield SimpleNamespace(port=port, runtime=runtime, fake=fake)
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def connect(port: int, rcvbuf: int | None = None) -> socket.socket:
    sock = socket.socket()
    if rcvbuf is not None:  # a small window: a client that stops reading fills it fast
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.connect(("127.0.0.1", port))
    sock.settimeout(10)
    return sock


@pytest.fixture(autouse=True, scope="module")
def _vllm_imported():
    # The routes import vLLM's request models on first use (a pod has them
    # loaded long before it serves): import them here, not inside a timed test.
    import vllm.entrypoints.openai.chat_completion.protocol  # noqa: F401


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """Status, headers and body of one response (Content-Length bodies), then the connection's end."""
    data = b""
    while b"\r\n\r\n" not in data:
        part = sock.recv(65536)
        if not part:
            break
        data += part
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        part = sock.recv(65536)
        if not part:
            break
        body += part
    return status, headers, body


def closed(sock: socket.socket) -> bool:
    """The server closed the connection (a timeout here means it did not)."""
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


BODY = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}).encode()


def request(body: bytes = BODY, path: str = "/v1/chat/completions", extra: str = "") -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer key\r\nContent-Type: application/json\r\n"
            f"{extra}Content-Length: {len(body)}\r\n\r\n").encode() + body  # fmt: skip


def openai_error(body: bytes) -> dict:
    err = json.loads(body)["error"]
    assert set(err) == {"message", "type", "param", "code"}
    return err


def test_clients_that_stall_their_bodies_hold_no_slot_and_get_408():
    # Issue 13.2: with MAX_CONCURRENT_REQUESTS=2, two clients that send their
    # headers and half a body, then stall, do not stop a third client's request.
    with serving(MAX_CONCURRENT_REQUESTS="2", READ_TIMEOUT_SECONDS="2") as srv:
        stalled = []
        for _ in range(2):
            sock = connect(srv.port)
            sock.sendall(request()[: -len(BODY) // 2])
            stalled.append(sock)
        time.sleep(0.2)
        third = connect(srv.port)
        third.sendall(request())
        status, _, _ = read_response(third)
        assert status == 200 and srv.runtime.admission.in_flight == 0
        for sock in stalled:  # ...and they get 408 in OpenAI's shape, then the connection closes
            status, headers, body = read_response(sock)
            assert status == 408 and headers["connection"] == "close"
            assert openai_error(body)["code"] == "request_timeout"
            assert closed(sock)
        assert srv.runtime.metrics.client_timeouts.labels("read")._value.get() == 2


@pytest.mark.parametrize("kind", ["idle", "partial head"])
def test_a_head_that_does_not_arrive_gets_408_and_the_connection_closes(kind):
    with serving(READ_TIMEOUT_SECONDS="0.5") as srv:
        sock = connect(srv.port)
        if kind == "partial head":
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\n")
        status, _, body = read_response(sock)
        assert status == 408 and openai_error(body)["code"] == "request_timeout"
        assert closed(sock)


@pytest.mark.parametrize("shape", ["one huge header", "many headers at once", "a huge URL"])
def test_oversized_headers_get_431(shape):
    with serving(MAX_HEADER_BYTES="4096") as srv:
        sock = connect(srv.port)
        if shape == "one huge header":  # sent in pieces: refused before it is complete
            sock.sendall(b"GET /v1/models HTTP/1.1\r\nHost: t\r\nX-Big: ")
            with contextlib.suppress(OSError):
                for _ in range(64):
                    sock.sendall(b"a" * 1024)
        elif shape == "many headers at once":
            headers = "".join(f"X-H{i}: {'b' * 90}\r\n" for i in range(60))
            sock.sendall(f"GET /v1/models HTTP/1.1\r\nHost: t\r\n{headers}\r\n".encode())
        else:
            sock.sendall(b"GET /v1/models?" + b"q" * 8000 + b" HTTP/1.1\r\nHost: t\r\n\r\n")
        status, headers, body = read_response(sock)
        assert status == 431 and headers["connection"] == "close"
        assert openai_error(body)["code"] == "request_header_fields_too_large"
        # A normal request is fine.
        ok = connect(srv.port)
        ok.sendall(b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n")
        assert read_response(ok)[0] == 200


def test_a_body_read_together_with_the_next_requests_head_is_not_counted_as_head():
    big = json.dumps({"model": "m", "messages": [{"role": "user", "content": "x" * 20_000}]}).encode()
    with serving(MAX_HEADER_BYTES="4096") as srv:
        sock = connect(srv.port)
        second = request()
        sock.sendall(request(big) + second[:30])  # pipelined: one read holds a body and a head begun
        time.sleep(0.3)
        sock.sendall(second[30:])
        assert read_response(sock)[0] == 200
        assert read_response(sock)[0] == 200


def test_connections_beyond_max_connections_get_503():
    with serving(MAX_CONNECTIONS="2", RETRY_AFTER_SECONDS="3") as srv:
        held = [connect(srv.port) for _ in range(2)]
        for sock in held:  # each connection answered once: they stay open (keep-alive)
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n")
            assert read_response(sock)[0] == 200
        extra = connect(srv.port)
        extra.sendall(b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n")
        status, headers, body = read_response(extra)
        assert status == 503 and headers["retry-after"] == "3"
        assert openai_error(body)["code"] == "too_many_connections"
        assert closed(extra)
        held[0].close()
        again = wait_for(lambda: _health_on_new_connection(srv.port), timeout=5, what="a free connection slot")
        assert again == 200


def _health_on_new_connection(port: int) -> int | None:
    sock = connect(port)
    sock.sendall(b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n")
    status = read_response(sock)[0]
    sock.close()
    return status if status == 200 else None


def test_a_streaming_client_that_stops_reading_is_cut_and_its_slot_freed():
    # Issue 13.2: the stream's client reads the headers, then nothing; once its
    # buffers are full, WRITE_TIMEOUT_SECONDS later the connection is aborted,
    # the stream closed (vLLM aborts the engine request) and the slot freed.
    with serving(WRITE_TIMEOUT_SECONDS="1", MAX_CONCURRENT_REQUESTS="1") as srv:
        body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True}).encode()
        sock = connect(srv.port, rcvbuf=4096)
        sock.sendall(request(body))
        assert sock.recv(64).startswith(b"HTTP/1.1 200")
        wait_for(lambda: srv.runtime.admission.in_flight == 1, timeout=5, what="the stream to be admitted")
        wait_for(lambda: srv.runtime.admission.in_flight == 0, timeout=20, what="the stalled stream's slot")
        assert srv.fake.streams_closed == 1
        # Noticed after little data: the kernel queues at most NOTSENT_LOWAT unsent
        # (it grew a loopback send buffer to megabytes before).
        assert srv.fake.sent < 512 * 1024
        assert srv.runtime.metrics.in_flight._value.get() == 0
        assert srv.runtime.metrics.client_timeouts.labels("write")._value.get() == 1
        # The slot serves the next client.
        ok = connect(srv.port)
        ok.sendall(request())
        assert read_response(ok)[0] == 200
