"""A fast fake OpenAI server for the gateway benchmark: streams chat completions on a fixed pace.

``python hack/bench/fake_openai.py --port P [--chunks 64] [--interval 0.02]``

Each ``POST .../chat/completions`` with ``"stream": true`` gets response
headers and a first chunk (the role) at once, then ``--chunks`` content
chunks ``--interval`` seconds apart, then ``data: [DONE]``, chunked like
uvicorn sends them. Every chunk is formatted once at start-up and each stream
is one timer at a time (each chunk schedules the next), so thousands of
concurrent streams cost this process little: the benchmark measures the
proxy, not this server. Also answers ``GET /health``, ``/v1/models`` and anything else with small JSON (vllm-router
probes workers), and non-streaming requests with one JSON answer.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal

import httptools
import uvloop

MODEL = "bench-model"


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def _event(delta: dict, finish: str | None = None) -> bytes:
    body = {"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 1767225600, "model": MODEL,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
    return _chunk(b"data: " + json.dumps(body, separators=(",", ":")).encode() + b"\n\n")


STREAM_HEAD = (b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream; charset=utf-8\r\n"
               b"cache-control: no-cache\r\ntransfer-encoding: chunked\r\n\r\n")
FIRST = _event({"role": "assistant", "content": ""})
TOKENS = [_event({"content": f" tok{i}"}) for i in range(4096)]
LAST = _event({}, "length") + _chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n"


def _json(status: int, obj: object) -> bytes:
    body = json.dumps(obj).encode()
    return (b"HTTP/1.1 %d OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n" % (status, len(body))
            + body)


MODELS = _json(200, {"object": "list", "data": [{"id": MODEL, "object": "model", "created": 1, "owned_by": "bench"}]})
OK = _json(200, {"status": "ok"})
ANSWER = _json(200, {"id": "chatcmpl-bench", "object": "chat.completion", "created": 1, "model": MODEL,
                     "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"},
                                  "finish_reason": "stop"}],
                     "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}})


class Conn(asyncio.Protocol):
    chunks = 64
    interval = 0.02

    def __init__(self) -> None:
        self.parser = httptools.HttpRequestParser(self)
        self.url = b""
        self.body: list[bytes] = []
        self.transport: asyncio.Transport | None = None
        self.loop = asyncio.get_event_loop()
        self.streaming = False

    def connection_made(self, transport):  # type: ignore[override]
        self.transport = transport

    def connection_lost(self, exc):  # type: ignore[override]
        self.transport = None

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            if self.transport:
                self.transport.close()

    def on_message_begin(self) -> None:
        self.url = b""
        self.body = []

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        t = self.transport
        if t is None:
            return
        path = self.url.split(b"?")[0]
        if path.endswith(b"/completions"):
            body = b"".join(self.body)
            if b'"stream":true' in body.replace(b" ", b""):
                t.write(STREAM_HEAD + FIRST)
                # One pending timer per stream, each chunk scheduling the next on the same absolute
                # pace: uvloop's call_at turns the time into a delay from its cached clock while the
                # timer's start reads a fresh one, so timers scheduled together in one callback that
                # the OS preempts can fire out of order (a chunk after [DONE], measured as a lost
                # chunk here and an extra one in the connection's next stream).
                start = self.loop.time()
                self.loop.call_at(start + self.interval, self._send, 1, start)
                return
            t.write(ANSWER)
        elif path.endswith(b"/models"):
            t.write(MODELS)
        else:
            t.write(OK)

    def _send(self, i: int, start: float) -> None:
        t = self.transport
        if t is None:
            return
        t.write(TOKENS[(i - 1) % len(TOKENS)] + (LAST if i == self.chunks else b""))
        if i < self.chunks:
            self.loop.call_at(start + (i + 1) * self.interval, self._send, i + 1, start)


async def serve(port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(Conn, "127.0.0.1", port, backlog=4096, reuse_address=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"fake OpenAI server on 127.0.0.1:{port}", flush=True)
    await stop.wait()
    server.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--chunks", type=int, default=64)
    p.add_argument("--interval", type=float, default=0.02)
    args = p.parse_args()
    Conn.chunks, Conn.interval = args.chunks, args.interval
    uvloop.run(serve(args.port))


if __name__ == "__main__":
    main()
