"""Micro-benchmark of the HTTP layer alone: CPU per request and per streamed chunk, no engine.

    .venv/bin/python hack/microbench_runtime.py [--servers runtime,vllm,bare] [--chunks 1,129]
        [--requests 500] [--concurrency 8] [--rounds 3]

Each server is an ASGI app whose vLLM serving object is replaced by a stand-in
that streams pre-built completion chunks (one event-loop turn per chunk, as
the engine's output queue would), driven in-process with requests shaped like
``hack/bench_runtime.py``'s (streaming text completions, with usage):

* ``runtime``: this package's app (auth, limits, admission, metrics, the JSON
  log line to stdout, SSE pass-through);
* ``vllm``: vLLM's own api_server app (``build_app``: its middleware, routes
  and Prometheus instrumentator; not uvicorn's access log, which sits outside
  the app);
* ``bare``: the floor, one FastAPI route that validates vLLM's request model
  and returns vLLM's generator in a StreamingResponse.

CPU time (``time.process_time``, every thread of the process) is taken over
``--requests`` requests; each (server, chunk count) runs in its own process,
the servers alternate for ``--rounds`` rounds and the lowest figure is kept
(the machine may be shared). Per chunk is the slope between the two chunk
counts, per request the intercept. Nothing here starts an engine.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import subprocess
import sys
import time
from types import SimpleNamespace
from typing import Any

SERVED = "smollm2-bench"
KEY = "sk-bench"
BODY = json.dumps({
    "model": SERVED, "prompt": "Write a short story about a lighthouse keeper.", "max_tokens": 32, "temperature": 0,
    "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True},
}).encode()  # fmt: skip
HEADERS = [
    (b"host", b"127.0.0.1:8000"), (b"accept", b"*/*"), (b"accept-encoding", b"gzip, deflate"),
    (b"connection", b"keep-alive"), (b"user-agent", b"python-httpx/0.28.1"),
    (b"authorization", b"Bearer " + KEY.encode()), (b"content-length", str(len(BODY)).encode()),
    (b"content-type", b"application/json"),
]  # fmt: skip
_ID = '"id":"cmpl-8d3f0c2a9b7e4f1d","object":"text_completion","created":1764150000,"model":"smollm2-bench"'
USAGE = 'data: {' + _ID + ',"choices":[],"usage":{"prompt_tokens":9,"total_tokens":41,"completion_tokens":32}}\n\n'


def _chunk(i: int) -> str:
    return ('data: {' + _ID + f',"choices":[{{"index":0,"text":" word{i}","logprobs":null,"finish_reason":null,'
            '"stop_reason":null}]}\n\n')


class FakeServing:
    """Plays OpenAIServingCompletion: a stream of ``n`` chunks, usage, ``[DONE]``."""

    def __init__(self, n: int) -> None:
        self.chunks = [_chunk(i) for i in range(n)]

    async def create_completion(self, request: Any, raw_request: Any) -> Any:
        meta = SimpleNamespace(final_usage_info=None)
        raw_request.state.request_metadata = meta
        chunks = self.chunks

        async def stream():
            for chunk in chunks:
                await asyncio.sleep(0)  # a loop turn per token, like the engine's output queue
                yield chunk
            meta.final_usage_info = SimpleNamespace(prompt_tokens=9, completion_tokens=len(chunks))
            yield USAGE
            yield "data: [DONE]\n\n"

        return stream()

    create_chat_completion = create_completion


def build(server: str, n: int) -> Any:
    fake = FakeServing(n)
    if server == "runtime":
        from prometheus_client import CollectorRegistry

        from modelendpoint_runtime.app import Runtime, create_app
        from modelendpoint_runtime.metrics import Metrics
        from modelendpoint_runtime.settings import load_settings

        settings = load_settings({"MODEL_NAME": "/models/bench", "OPENAI_SERVED_MODEL_NAME_OVERRIDE": SERVED,
                                  "API_KEY": KEY, "MAX_CONCURRENT_REQUESTS": "1024"})  # fmt: skip
        runtime = Runtime(settings, Metrics(CollectorRegistry()))

        async def no_engine() -> None:
            raise AssertionError("no engine in the micro-benchmark")

        app = create_app(runtime, no_engine)
        state = SimpleNamespace(openai_serving_completion=fake, openai_serving_chat=fake)
        runtime.engine = SimpleNamespace(state=state, dead=False)
        return app
    if server == "vllm":
        from vllm.entrypoints.launchers.app import build_app

        from modelendpoint_runtime.engine import parse_engine_args

        args = parse_engine_args(["--model", "/models/bench", "--served-model-name", SERVED, "--api-key", KEY])
        app = build_app(args, ("generate",))
        app.state.openai_serving_completion = fake
        return app
    if server == "bare":
        from fastapi import FastAPI
        from fastapi.responses import StreamingResponse
        from starlette.requests import Request
        from vllm.entrypoints.openai.completion.protocol import CompletionRequest

        async def completions(request: Request) -> StreamingResponse:
            req = CompletionRequest.model_validate(json.loads(await request.body()))
            return StreamingResponse(await fake.create_completion(req, request), media_type="text/event-stream")

        app = FastAPI()
        app.router.add_route("/v1/completions", completions, methods=["POST"])
        return app
    raise SystemExit(f"unknown server {server!r}")


async def _one(app: Any, tally: dict[str, int]) -> None:
    # What uvicorn (httptools) hands an app: ASGI spec 2.3, the body in one message,
    # http.disconnect only once the response is complete.
    scope = {
        "type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
        "server": ("127.0.0.1", 8000), "client": ("127.0.0.1", 50000), "scheme": "http", "method": "POST",
        "root_path": "", "path": "/v1/completions", "raw_path": b"/v1/completions", "query_string": b"",
        "headers": HEADERS, "state": {},
    }  # fmt: skip
    complete = asyncio.Event()
    body_sent = False

    async def receive() -> dict[str, Any]:
        nonlocal body_sent
        if not body_sent:
            body_sent = True
            return {"type": "http.request", "body": BODY, "more_body": False}
        await complete.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            tally[str(message["status"])] = tally.get(str(message["status"]), 0) + 1
        elif not message.get("more_body", False):
            complete.set()

    await app(scope, receive, send)


async def _drive(app: Any, requests: int, concurrency: int) -> dict[str, int]:
    left = requests
    tally: dict[str, int] = {}

    async def worker() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            await _one(app, tally)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return tally


def measure(server: str, n: int, requests: int, concurrency: int) -> float:
    """CPU microseconds per request (best of 3), in this process."""
    import uvloop

    from modelendpoint_runtime.logs import setup_logging

    setup_logging("info")  # the request line is part of the runtime's cost (to stdout, as in a pod)
    app = build(server, n)
    loop = uvloop.new_event_loop()
    asyncio.set_event_loop(loop)
    loop.run_until_complete(_drive(app, 200, concurrency))  # warm-up
    gc.collect()
    gc.freeze()  # as vLLM and the runtime do after start-up
    best = float("inf")
    for _ in range(3):
        start = time.process_time()
        tally = loop.run_until_complete(_drive(app, requests, concurrency))
        best = min(best, (time.process_time() - start) / requests * 1e6)
        if tally != {"200": requests}:
            raise SystemExit(f"{server}: unexpected statuses {tally}")
    return best


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--servers", default="runtime,vllm,bare")
    parser.add_argument("--chunks", default="1,129", help="two chunk counts: per chunk is the slope between them")
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--one", nargs=2, metavar=("SERVER", "CHUNKS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.one:
        # The runtime's request log goes to stdout: the figure goes to stderr, last line.
        us = measure(args.one[0], int(args.one[1]), args.requests, args.concurrency)
        print(json.dumps({"us_per_request": us}), file=sys.stderr)
        return

    servers = args.servers.split(",")
    low, high = (int(c) for c in args.chunks.split(","))
    best: dict[tuple[str, int], float] = {}
    for _ in range(args.rounds):
        for server in servers:
            for n in (low, high):
                cmd = [sys.executable, __file__, "--one", server, str(n),
                       "--requests", str(args.requests), "--concurrency", str(args.concurrency)]  # fmt: skip
                done = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                      env=dict(os.environ, VLLM_NO_USAGE_STATS="1"))  # fmt: skip
                if done.returncode != 0:
                    raise SystemExit(f"{server} failed:\n{done.stderr[-2000:]}")
                us = json.loads(done.stderr.strip().splitlines()[-1])["us_per_request"]
                best[server, n] = min(best.get((server, n), us), us)

    print(f"CPU per request, best of {args.rounds} rounds x 3 runs; {args.requests} requests at concurrency "
          f"{args.concurrency}\n")  # fmt: skip
    print(f"| server | us/request ({low} chunks) | us/request ({high} chunks) | us/chunk | us/request fixed |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for server in servers:
        a, b = best[server, low], best[server, high]
        per_chunk = (b - a) / (high - low)
        print(f"| {server} | {a:.0f} | {b:.0f} | {per_chunk:.2f} | {a - per_chunk * low:.0f} |")


if __name__ == "__main__":
    main()
