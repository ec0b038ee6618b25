"""Admission control, client disconnects, metrics, request logs, stream framing, SIGTERM drain.

All against the shared runtime server (MAX_CONCURRENT_REQUESTS=3, see
tests/fixtures_runtime.py). The drain test SIGTERMs that server, so it is
marked ``runtime_drain`` and runs after every other test of the session.
"""

from __future__ import annotations

import json
import re
import socket
from contextlib import ExitStack
from urllib.parse import urlsplit

import httpx
import openai
import pytest

from waiting import wait_for

LONG = {"max_tokens": 1000, "ignore_eos": True, "temperature": 0}  # ~50 s of CPU time if not aborted


def metric(server, name: str) -> float:
    """The sum of a metric's samples (all label sets)."""
    total, found = 0.0, False
    for line in server.metrics_text().splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            total += float(line.rsplit(" ", 1)[1])
            found = True
    assert found, f"metric {name} not exposed"
    return total


def engine_idle(server) -> bool:
    return metric(server, "vllm:num_requests_running") == 0 and metric(server, "modelendpoint_requests_in_flight") == 0


def next_data(lines) -> str:
    """The next SSE line that is not the blank line between frames."""
    for line in lines:
        if line:
            return line
    raise AssertionError("the stream ended")


def open_streams(stack: ExitStack, server, count: int) -> list:
    """Start ``count`` long streaming completions; return once each produced a token."""
    client = stack.enter_context(httpx.Client(timeout=60, headers=server.headers))
    streams = []
    for i in range(count):
        body = {"model": server.model, "prompt": f"Tell story number {i}", "stream": True, **LONG}
        response = stack.enter_context(client.stream("POST", server.base_url + "/completions", json=body))
        assert response.status_code == 200
        lines = response.iter_lines()
        assert next_data(lines).startswith("data: {")
        streams.append((response, lines))
    return streams


def test_overload_is_immediate_503_with_retry_after_and_disconnect_aborts(runtime_server, openai_client):
    wait_for(lambda: engine_idle(runtime_server), timeout=30, interval=0.1, what="an idle engine before the test")
    generated_before = metric(runtime_server, "vllm:generation_tokens_total")
    with ExitStack() as stack:
        streams = open_streams(stack, runtime_server, 3)  # MAX_CONCURRENT_REQUESTS=3
        assert metric(runtime_server, "modelendpoint_requests_in_flight") == 3
        assert metric(runtime_server, "vllm:num_requests_running") == 3

        # Refused, not queued: the answer comes while all three streams of 1000
        # tokens still run (checked below), and the engine never saw the request.
        r = httpx.post(runtime_server.base_url + "/chat/completions", headers=runtime_server.headers, timeout=60,
                       json={"model": runtime_server.model,
                             "messages": [{"role": "user", "content": "x"}]})  # fmt: skip
        assert metric(runtime_server, "vllm:num_requests_waiting") == 0
        assert r.status_code == 503 and r.headers["Retry-After"] == "2"
        assert r.json()["error"]["code"] == "overloaded" and r.json()["error"]["type"] == "server_error"
        with pytest.raises(openai.InternalServerError) as exc:
            openai_client.completions.create(model=runtime_server.model, prompt="x", max_tokens=1)
        assert exc.value.status_code == 503 and exc.value.response.headers["Retry-After"] == "2"
        assert metric(runtime_server, "modelendpoint_requests_rejected_total") >= 2
        # /ready stays 200: overload is not unreadiness.
        assert httpx.get(runtime_server.root_url + "/ready", timeout=30).status_code == 200

        # The streams are still going...
        for _, lines in streams:
            assert next_data(lines).startswith("data: {")
    # ...and closing them (client disconnect) aborts their engine requests.
    wait_for(lambda: engine_idle(runtime_server), timeout=10, interval=0.1,
             what="the engine to drop the aborted requests")  # fmt: skip
    # Proof they were cut short, not run to their end: far fewer than the
    # 3 x 1000 tokens they asked for were generated.
    assert metric(runtime_server, "vllm:generation_tokens_total") - generated_before < 1500


def test_non_streaming_disconnect_aborts_the_engine_request(runtime_server):
    wait_for(lambda: engine_idle(runtime_server), timeout=30, interval=0.1, what="an idle engine before the test")
    generated_before = metric(runtime_server, "vllm:generation_tokens_total")
    body = {"model": runtime_server.model, "prompt": "Tell a long story", **LONG}
    _post_and_drop(runtime_server, body)
    wait_for(lambda: engine_idle(runtime_server), timeout=10, interval=0.1,
             what="the engine to drop the abandoned request")  # fmt: skip
    assert metric(runtime_server, "vllm:generation_tokens_total") - generated_before < 500  # not 1000


def _post_and_drop(server, body: dict) -> None:
    """Send a non-streaming request, wait until the engine runs it, then hang up."""
    u = urlsplit(server.base_url + "/completions")
    payload = json.dumps(body).encode()
    auth = server.headers["Authorization"]
    sock = socket.create_connection((u.hostname, u.port))
    sock.sendall(
        f"POST {u.path} HTTP/1.1\r\nHost: {u.hostname}\r\nAuthorization: {auth}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n".encode() + payload
    )
    wait_for(lambda: metric(server, "vllm:num_requests_running") == 1, timeout=20, interval=0.1,
             what="the engine to start the request")  # fmt: skip
    sock.close()


def samples(server) -> dict[tuple[str, frozenset], float]:
    """Every sample of one scrape: (name, labels) -> value."""
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for family in text_string_to_metric_families(server.metrics_text()):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def test_metrics_expose_runtime_and_engine_series(runtime_server, openai_client):
    """This test's own requests move the counters by exactly what they did."""
    route = "/v2/{endpoint_id}/openai/v1/completions"
    ok = frozenset({"route": route, "method": "POST", "status": "200"}.items())
    at_route = frozenset({"route": route}.items())

    def key(name, labels):
        return (name, labels)

    watched = {
        "requests": key("modelendpoint_requests_total", ok),
        "duration": key("modelendpoint_request_duration_seconds_count", at_route),
        "ttft_stream": key("modelendpoint_time_to_first_token_seconds_count",
                           frozenset({"route": route, "stream": "true"}.items())),
        "ttft_plain": key("modelendpoint_time_to_first_token_seconds_count",
                          frozenset({"route": route, "stream": "false"}.items())),
        "prompt": key("modelendpoint_prompt_tokens_total", at_route),
        "completion": key("modelendpoint_completion_tokens_total", at_route),
    }  # fmt: skip

    def snapshot():
        all_samples = samples(runtime_server)
        values = {name: all_samples.get(k, 0.0) for name, k in watched.items()}
        values["vllm_generated"] = metric(runtime_server, "vllm:generation_tokens_total")
        return values

    wait_for(lambda: engine_idle(runtime_server), timeout=30, interval=0.1, what="an idle engine before the test")
    before = snapshot()
    plain = openai_client.completions.create(model=runtime_server.model, prompt="Hi", max_tokens=2)
    chunks = list(openai_client.completions.create(model=runtime_server.model, prompt="Hello there", max_tokens=3,
                                                   stream=True, stream_options={"include_usage": True}))  # fmt: skip
    streamed = chunks[-1].usage
    generated = plain.usage.completion_tokens + streamed.completion_tokens
    expected = {
        "requests": 2, "duration": 2, "ttft_stream": 1, "ttft_plain": 1,
        "prompt": plain.usage.prompt_tokens + streamed.prompt_tokens, "completion": generated,
        "vllm_generated": generated,
    }  # fmt: skip

    def deltas():
        after = snapshot()
        return {name: after[name] - before[name] for name in expected}

    # The stream's usage and the request counters are recorded as its
    # response ends, which may be just after the client saw [DONE].
    wait_for(lambda: deltas() == expected, timeout=10, interval=0.2, what="the metrics of this test's requests")
    assert deltas() == expected

    text = runtime_server.metrics_text()
    for name in (
        "modelendpoint_requests_in_flight",
        "modelendpoint_ready",
        "modelendpoint_request_duration_seconds_bucket",
        "modelendpoint_time_to_first_token_seconds_bucket",
        # vLLM's own engine metrics, same scrape:
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:prompt_tokens_total",
    ):
        assert re.search(rf"^{re.escape(name)}[{{ ]", text, re.M), name
    assert metric(runtime_server, "modelendpoint_ready") == 1
    # The endpoint id never becomes a label value.
    assert runtime_server.endpoint_id not in text


def test_one_json_log_line_per_request_without_prompt_text(runtime_server, openai_client):
    def logged():
        return [
            json.loads(line)
            for line in runtime_server.log_text().splitlines()
            if line.startswith("{") and '"msg":"request"' in line and 'chat/completions"' in line
        ]

    before = len(logged())
    secret_prompt = "zebra-quartz-7781 tell me a secret"
    r = openai_client.chat.completions.create(
        model=runtime_server.model, messages=[{"role": "user", "content": secret_prompt}], max_tokens=3
    )
    wait_for(lambda: len(logged()) > before, timeout=10, interval=0.1, what="the request's log line")
    entries = logged()[before:]
    assert len(entries) == 1  # exactly one line for the one request
    (entry,) = entries
    assert entry["method"] == "POST" and entry["status"] == 200 and entry["model"] == runtime_server.model
    assert entry["route"] == "/v2/{endpoint_id}/openai/v1/chat/completions"
    assert entry["prompt_tokens"] == r.usage.prompt_tokens
    assert entry["completion_tokens"] == r.usage.completion_tokens
    assert entry["latency_ms"] > 0 and entry["stream"] is False

    # A streamed request: one line too, with the stream's token counts.
    before = len(logged())
    chunks = list(openai_client.chat.completions.create(
        model=runtime_server.model, messages=[{"role": "user", "content": secret_prompt}], max_tokens=4,
        stream=True, stream_options={"include_usage": True},
    ))  # fmt: skip
    usage = chunks[-1].usage
    wait_for(lambda: len(logged()) > before, timeout=10, interval=0.1, what="the streamed request's log line")
    (entry,) = logged()[before:]
    assert entry["status"] == 200 and entry["stream"] is True and entry["ttft_ms"] > 0
    assert (entry["prompt_tokens"], entry["completion_tokens"]) == (usage.prompt_tokens, usage.completion_tokens)
    assert usage.completion_tokens > 0
    assert "zebra-quartz" not in runtime_server.log_text()


def test_ndjson_stream_when_asked(runtime_server):
    # RAW_OPENAI_OUTPUT=0 makes NDJSON the default; a client can also ask for it.
    body = {"model": runtime_server.model, "prompt": "Hello", "max_tokens": 4, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}  # fmt: skip
    h = dict(runtime_server.headers, Accept="application/x-ndjson")
    r = httpx.post(runtime_server.base_url + "/completions", json=body, headers=h, timeout=60)
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/x-ndjson")
    lines = r.text.splitlines()
    objs = [json.loads(line) for line in lines]  # every line is one JSON object
    assert "[DONE]" not in r.text and not any(line.startswith("data:") for line in lines)
    assert objs[-1]["usage"]["completion_tokens"] == 4
    text = "".join(o["choices"][0]["text"] for o in objs if o["choices"])
    sse = httpx.post(runtime_server.base_url + "/completions", json=body, headers=runtime_server.headers, timeout=60)
    assert sse.headers["content-type"].startswith("text/event-stream")
    frames = [f for f in sse.text.split("\n\n") if f]
    assert frames[-1] == "data: [DONE]"
    assert "".join(json.loads(f[6:])["choices"][0]["text"] for f in frames[:-1] if json.loads(f[6:])["choices"]) == text


def test_health_and_ready(runtime_server):
    assert httpx.get(runtime_server.root_url + "/health").json() == {"status": "ok"}
    assert httpx.get(runtime_server.root_url + "/ready").json() == {"status": "ready"}


@pytest.mark.runtime_drain
def test_sigterm_drains_then_exits_zero(runtime_server):
    """Runs last: readiness 503, new requests 503, the in-flight stream completes, exit 0."""
    server = runtime_server
    client = httpx.Client(timeout=120, headers=server.headers)
    # Long enough that the drain outlasts the checks below even when the engine
    # runs fast: with 60 tokens the stream once finished, and the server exited,
    # between two of them. 1000 tokens at a slow 10/s still end well inside
    # DRAIN_TIMEOUT_SECONDS=300.
    body = {"model": server.model, "prompt": "Count slowly", "stream": True, **LONG}
    with client.stream("POST", server.base_url + "/completions", json=body) as response:
        lines = response.iter_lines()
        assert next_data(lines).startswith("data: {")
        server.process.send_signal(15)  # SIGTERM

        wait_for(lambda: httpx.get(server.root_url + "/ready", timeout=30).status_code == 503, timeout=30,
                 interval=0.1, what="/ready to turn 503")  # fmt: skip
        assert httpx.get(server.root_url + "/ready", timeout=30).json() == {"status": "draining"}
        refused = httpx.post(server.base_url + "/completions", headers=server.headers, timeout=30,
                             json={"model": server.model, "prompt": "x", "max_tokens": 1})  # fmt: skip
        assert refused.status_code == 503 and "Retry-After" in refused.headers
        assert refused.json()["error"]["code"] == "shutting_down"
        assert server.alive()

        rest = list(lines)
    frames = [line for line in rest if line]
    assert frames[-1] == "data: [DONE]"
    last = json.loads(frames[-2][6:])
    assert last["choices"][0]["finish_reason"] == "length"  # finished, not cut off
    assert server.process.wait(60) == 0
    assert '"msg":"drained"' in server.log_text()
