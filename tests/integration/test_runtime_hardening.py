"""On the real runtime process (shared server, real engine): the worker rule, key rotation, slow clients, metrics port.

* Variables named like vLLM options reach vLLM's engine (issue 10): the
  shared server runs with ``ENABLE_PREFIX_CACHING=false`` and
  ``MAX_NUM_BATCHED_TOKENS=3072``, and vLLM's own start-up lines say so.
* ``API_KEY_FILE`` is re-read while serving (issue 13.11): a key removed from
  the file stops working within the poll period, the new one works, and no
  request with a key that stays valid fails meanwhile; a bad update fails
  closed.
* Slow clients hold no admission slot (issue 13.2): bodies that stall get 408
  while another client is served; a streaming client that stops reading is
  cut, its engine request aborted and its slot freed.
* ``METRICS_PORT`` serves the scrape without a key (issue 12).
"""

from __future__ import annotations

import json
import re
import socket
import threading
from urllib.parse import urlsplit

import httpx

from waiting import wait_for

LONG = {"max_tokens": 1000, "ignore_eos": True, "temperature": 0}


def metric(server, name: str) -> float:
    total = 0.0
    for line in server.metrics_text().splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            total += float(line.rsplit(" ", 1)[1])
    return total


def idle(server) -> bool:
    return metric(server, "vllm:num_requests_running") == 0 and metric(server, "modelendpoint_requests_in_flight") == 0


# issue 10: the rule reaches the engine ----------------------------------------------


def test_variables_named_like_vllm_options_reach_the_engine(runtime_server):
    log = runtime_server.log_text()
    # vLLM's own account of its configuration, not ours:
    engine_line = next(line for line in log.splitlines() if "Initializing a V1 LLM engine" in line)
    assert "enable_prefix_caching=False" in engine_line
    assert "max_num_batched_tokens=3072" in log
    # ...and the runtime's start-up line names where each option came from.
    (options,) = [json.loads(line)["options"] for line in log.splitlines()
                  if line.startswith("{") and '"msg":"engine options"' in line]  # fmt: skip
    assert options["enable_prefix_caching"] == {"value": False, "from": "ENABLE_PREFIX_CACHING"}
    assert options["max_num_batched_tokens"] == {"value": 3072, "from": "MAX_NUM_BATCHED_TOKENS"}
    assert options["max_model_len"] == {"value": 2048, "from": "MAX_MODEL_LEN"}


# issue 13.11: key rotation without a restart ----------------------------------------


def test_a_key_removed_from_the_key_file_stops_working_without_a_restart(runtime_server):
    server = runtime_server
    old, kept = server.api_keys  # the file holds both
    url = server.base_url + "/models"

    def status(key: str | None) -> int:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.get(url, headers=headers, timeout=30).status_code

    failures: list[int] = []
    done = threading.Event()

    def keep_calling() -> None:  # a client whose key stays valid through the rotation
        with httpx.Client(headers={"Authorization": f"Bearer {kept}"}, timeout=30) as client:
            while not done.is_set():
                code = client.get(url).status_code
                if code != 200:
                    failures.append(code)

    caller = threading.Thread(target=keep_calling)
    caller.start()
    try:
        assert status(old) == 200
        server.write_keys(f"{kept}\nsk-test-newest-5555\n")
        # Within the poll period (API_KEY_FILE_POLL_SECONDS=1), with a margin for a busy machine:
        wait_for(lambda: status(old) == 401, timeout=15, interval=0.2, what="the removed key to be refused")
        assert status("sk-test-newest-5555") == 200
    finally:
        done.set()
        caller.join(30)
    assert failures == []
    try:
        # A bad update fails closed: every request refused (not "no auth"), /ready 503.
        server.write_keys("\n")
        wait_for(lambda: status(kept) == 503, timeout=15, interval=0.2, what="an empty key file to refuse everything")
        r = httpx.get(url, timeout=30)
        assert r.status_code == 503 and r.json()["error"]["code"] == "api_keys_unavailable"
        assert httpx.get(server.root_url + "/ready", timeout=30).json() == {"status": "keys_unavailable"}
    finally:
        server.write_keys(",".join(server.api_keys) + "\n")  # as the session started, for the other tests
        wait_for(lambda: status(old) == 200 and status(kept) == 200, timeout=15, interval=0.2, what="the keys back")
    assert httpx.get(server.root_url + "/ready", timeout=30).status_code == 200
    log = server.log_text()
    assert '"msg":"API keys reloaded"' in log and '"msg":"API keys unusable: refusing every request"' in log
    assert "sk-test-newest-5555" not in log and old not in log


# issue 13.2: slow clients ------------------------------------------------------------


def _raw_post(server, body: bytes, send: bytes | None = None, rcvbuf: int | None = None) -> socket.socket:
    u = urlsplit(server.base_url)
    sock = socket.socket()
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.connect((u.hostname, u.port))
    sock.settimeout(60)
    head = (f"POST {u.path}/completions HTTP/1.1\r\nHost: {u.hostname}\r\n"
            f"Authorization: {server.headers['Authorization']}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()  # fmt: skip
    sock.sendall(head + (body if send is None else send))
    return sock


def test_clients_that_stall_their_bodies_do_not_stop_another_clients_request(runtime_server):
    server = runtime_server
    wait_for(lambda: idle(server), timeout=30, interval=0.1, what="an idle engine before the test")
    body = json.dumps({"model": server.model, "prompt": "Hello", "max_tokens": 2}).encode()
    # As many stalled clients as MAX_CONCURRENT_REQUESTS (3): headers and half a body, then nothing.
    stalled = [_raw_post(server, body, send=body[: len(body) // 2]) for _ in range(3)]
    try:
        r = httpx.post(server.base_url + "/completions", headers=server.headers, json=json.loads(body), timeout=60)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2
        for sock in stalled:  # READ_TIMEOUT_SECONDS=5 after their first byte: 408, then the connection closes
            data = b""
            while not data.endswith(b"}"):
                part = sock.recv(4096)
                if not part:
                    break
                data += part
            assert data.startswith(b"HTTP/1.1 408 "), data[:200]
            assert json.loads(data.split(b"\r\n\r\n", 1)[1])["error"]["code"] == "request_timeout"
            assert sock.recv(1) == b""
    finally:
        for sock in stalled:
            sock.close()


def test_a_streaming_client_that_stops_reading_releases_its_slot(runtime_server):
    server = runtime_server
    wait_for(lambda: idle(server), timeout=30, interval=0.1, what="an idle engine before the test")
    generated_before = metric(server, "vllm:generation_tokens_total")
    # Three sequences with five alternatives per token: big chunks, so that the
    # client's buffers (and the runtime's ~80 KiB) fill in a few seconds.
    # (n > 1 cannot be greedy: temperature 1.)
    body = {"model": server.model, "prompt": "Tell a long story", "stream": True, **LONG, "n": 3, "logprobs": 5,
            "temperature": 1.0, "seed": 1}  # fmt: skip
    sock = _raw_post(server, json.dumps(body).encode(), rcvbuf=4096)  # reads the first bytes, then nothing more
    try:
        assert sock.recv(64).startswith(b"HTTP/1.1 200")
        wait_for(lambda: metric(server, "vllm:num_requests_running") >= 1, timeout=20, interval=0.1,
                 what="the engine to run the stream")  # fmt: skip
        # Its buffers fill; WRITE_TIMEOUT_SECONDS=5 later it is cut.
        wait_for(lambda: idle(server), timeout=90, interval=0.2, what="the stalled stream's slot to be freed")
    finally:
        sock.close()
    assert metric(server, "modelendpoint_requests_in_flight") == 0
    assert metric(server, 'modelendpoint_client_timeouts_total{kind="write"}') == 1
    # Aborted, not run to its end (3 x 1000 tokens).
    assert metric(server, "vllm:generation_tokens_total") - generated_before < 1000
    lines = [json.loads(line) for line in server.log_text().splitlines()
             if line.startswith("{") and '"error_code":"write_timeout"' in line]  # fmt: skip
    assert len(lines) == 1 and lines[0]["stream"] is True


# issue 12: METRICS_PORT ---------------------------------------------------------------


def test_metrics_port_serves_the_scrape_without_a_key(runtime_server):
    base = f"http://127.0.0.1:{runtime_server.metrics_port}"
    r = httpx.get(base + "/metrics", timeout=30)
    assert r.status_code == 200
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting", "modelendpoint_requests_in_flight",
                 "modelendpoint_sequences_in_flight"):  # fmt: skip
        assert re.search(rf"^{re.escape(name)}[{{ ]", r.text, re.M), name
    assert httpx.get(base + "/ready", timeout=30).json() == {"status": "ready"}
    assert httpx.get(base + "/health", timeout=30).status_code == 200
    # Only those: the API is not there, with or without a key; and the API port still wants one.
    r = httpx.get(base + "/v1/models", headers=runtime_server.headers, timeout=30)
    assert r.status_code == 404 and r.json()["error"]["code"] == "unknown_url"
    assert httpx.get(runtime_server.root_url + "/metrics", timeout=30).status_code == 401
