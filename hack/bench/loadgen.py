"""Load generator of the gateway benchmark: N concurrent keep-alive streams, timed per chunk.

``python hack/bench/loadgen.py --target 127.0.0.1:8080[,...] --concurrency N --warmup S --duration S --out PREFIX``

Each of N workers keeps one connection (to the targets in turn) and sends
streamed chat completions one after another for warmup + duration seconds.
For the streams that start after the warm-up and finish within the window it
records the time to first byte (request written -> first body byte), every
gap between two arrivals of SSE data on the socket, and whether the stream
was complete (HTTP 200, every event, ``[DONE]``). Raw asyncio and httptools
keep the client's own cost per chunk small. Writes PREFIX.json (counts) and
PREFIX.ttfb / PREFIX.gaps (float64 seconds, native byte order).
"""

from __future__ import annotations

import argparse
import array
import asyncio
import json
import time

import httptools
import uvloop


class Stream(asyncio.Protocol):
    def __init__(self, run: Run) -> None:
        self.run = run
        self.parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.loop = asyncio.get_event_loop()
        self.done: asyncio.Future[bool] | None = None
        self.lost = asyncio.get_event_loop().create_future()

    def connection_made(self, transport):  # type: ignore[override]
        self.transport = transport

    def connection_lost(self, exc):  # type: ignore[override]
        self.transport = None
        if self.done is not None and not self.done.done():
            self.done.set_result(False)

    def send(self, request: bytes) -> asyncio.Future[bool]:
        self.done = self.loop.create_future()
        self.status = 0
        self.events = 0
        self.first = 0.0
        self.prev = 0.0
        self.gaps: list[float] = []
        self.tail = b""
        self.pieces: list[bytes] = []
        self.t0 = time.perf_counter()  # loop.time() is in milliseconds under uvloop
        assert self.transport is not None
        self.transport.write(request)
        return self.done

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            if self.transport:
                self.transport.close()

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()

    def on_body(self, body: bytes) -> None:
        now = time.perf_counter()
        if not self.first:
            self.first = now
        else:
            self.gaps.append(now - self.prev)
        self.prev = now
        # A "data: " split across two reads is counted once: 5 bytes of tail hold no whole marker.
        seen = self.tail + body
        self.events += seen.count(b"data: ")
        self.tail = seen[-5:]
        if self.run.args.debug:
            self.pieces.append(body)

    def on_message_complete(self) -> None:
        if self.done is not None and not self.done.done():
            self.done.set_result(self.status == 200 and self.events == self.run.expected_events)


class Run:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.expected_events = args.chunks + 3  # role chunk, content chunks, finish chunk, [DONE]
        body = json.dumps({"model": args.model, "stream": True, "max_tokens": args.chunks,
                           "messages": [{"role": "system", "content": "You are a benchmark."},
                                        {"role": "user", "content": "Tell me a story."}]}).encode()
        self.requests = [
            b"POST %s HTTP/1.1\r\nhost: %s\r\ncontent-type: application/json\r\naccept: application/json\r\n"
            b"authorization: Bearer sk-bench\r\ncontent-length: %d\r\n\r\n%s"
            % (args.path.encode(), t.encode(), len(body), body) for t in args.target.split(",")]
        self.targets = [(t.split(":")[0], int(t.split(":")[1])) for t in args.target.split(",")]
        self.ttfb = array.array("d")
        self.gaps = array.array("d")
        self.ok = 0
        self.errors = 0
        self.error_kinds: dict[str, int] = {}
        self.events = 0

    def error(self, kind: str) -> None:
        self.errors += 1
        self.error_kinds[kind] = self.error_kinds.get(kind, 0) + 1

    async def worker(self, i: int, start: float, end: float) -> None:
        loop = asyncio.get_running_loop()
        host, port = self.targets[i % len(self.targets)]
        request = self.requests[i % len(self.targets)]
        conn: Stream | None = None
        # Spread the first requests over one stream's length, as independent clients would be.
        await asyncio.sleep((i / max(1, self.args.concurrency)) * self.args.chunks * self.args.interval)
        while loop.time() < end:
            try:
                if conn is None or conn.transport is None:
                    _, conn = await loop.create_connection(lambda: Stream(self), host, port)
                t0 = loop.time()
                complete = await asyncio.wait_for(conn.send(request), 120)
            except (TimeoutError, OSError) as exc:
                if loop.time() >= start:
                    self.error(type(exc).__name__)
                conn = None
                await asyncio.sleep(0.05)
                continue
            t1 = loop.time()
            if t0 < start or t1 > end:
                continue
            if not complete:
                self.error(f"status {conn.status}" if conn.status != 200 else f"{conn.events} events")
                if self.args.debug:
                    with open(self.args.out + ".bad", "ab") as f:
                        f.write(b"=== %d events\n" % conn.events + b"|".join(conn.pieces) + b"\n")
                if conn.transport is None:
                    conn = None
                continue
            self.ok += 1
            self.events += conn.events - 1
            self.ttfb.append(conn.first - conn.t0)
            self.gaps.extend(conn.gaps)
        if conn is not None and conn.transport is not None:
            conn.transport.close()

    async def main(self) -> None:
        loop = asyncio.get_running_loop()
        start = loop.time() + self.args.warmup
        end = start + self.args.duration
        await asyncio.gather(*(self.worker(i, start, end) for i in range(self.args.concurrency)))
        prefix = self.args.out
        with open(prefix + ".ttfb", "wb") as f:
            self.ttfb.tofile(f)
        with open(prefix + ".gaps", "wb") as f:
            self.gaps.tofile(f)
        with open(prefix + ".json", "w") as f:
            json.dump({"ok": self.ok, "errors": self.errors, "error_kinds": self.error_kinds,
                       "events": self.events, "window_s": self.args.duration}, f)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--target", required=True)
    p.add_argument("--path", default="/v1/chat/completions")
    p.add_argument("--model", default="bench-model")
    p.add_argument("--concurrency", type=int, required=True)
    p.add_argument("--warmup", type=float, default=3.0)
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--chunks", type=int, default=64)
    p.add_argument("--interval", type=float, default=0.02)
    p.add_argument("--out", required=True)
    p.add_argument("--debug", action="store_true", help="write failed streams' bodies to OUT.bad")
    args = p.parse_args()
    uvloop.run(Run(args).main())


if __name__ == "__main__":
    main()
