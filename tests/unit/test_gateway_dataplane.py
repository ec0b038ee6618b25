"""The compiled data plane's seams: its snapshot, the handoff, the shared vectors, and its process.

The request path itself runs on both data planes in test_gateway_proxy.py and
test_gateway_fuzz.py (every test there is parametrized); these are what only
the compiled one has.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pytest

from fixtures_gateway import (
    DATA_PLANES,
    FakeCluster,
    FakeReplica,
    GatewayThread,
    StaticGatewayProcess,
    gateway_env,
    mep_obj,
    metric_value,
    pod_obj,
)
from modelendpoint_gateway import dataplane, errors, table, workers
from modelendpoint_gateway.keys import KeySet, digest
from modelendpoint_gateway.router import Router
from modelendpoint_gateway.settings import load_settings
from waiting import wait_for

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "hack"))

import gateway_vectors  # noqa: E402

SETTINGS = load_settings({"MEP_GATEWAY_MAX_ATTEMPTS": "2", "MEP_GATEWAY_RETRY_AFTER_SECONDS": "7"})


def router_of(*objs) -> Router:
    r = Router()
    keys = set()
    for o in objs:
        if o["kind"] == "Pod":
            keys |= r.table.upsert_pod(table.parse_pod(o))
        else:
            keys |= r.table.upsert_endpoint(table.parse_endpoint(o))
    r.sync(keys)
    return r


def test_the_shared_vectors_file_is_what_the_python_side_makes_now():
    # The Rust side's `cargo test` reads the same file (gateway/dataplane/src/vectors.rs).
    assert gateway_vectors.OUT.read_text() == gateway_vectors.render(), "run: python hack/gateway_vectors.py"


def test_the_snapshot_holds_ready_models_only_with_their_names_replicas_and_keys():
    keyset = KeySet.of(("sk-one", "sk-two"))
    r = router_of(
        mep_obj("ready", "ns", "m-ready", adapters=[{"name": "m-lora", "source": "/a"}]),
        pod_obj("ready-0", "ns", "ready", "10.0.0.1", 8000),
        pod_obj("ready-1", "ns", "ready", "fd00::1", 8001),
        mep_obj("keyed", "ns", "m-keyed", apiKeySecretRef={"name": "keys", "key": "k"},
                loadBalancing={"strategy": "PrefixHash", "prefixHash": {"meanLoadPercentage": 150}}),
        pod_obj("keyed-0", "ns", "keyed", "10.0.0.2", 8000),
        mep_obj("stale", "ns", "m-stale", apiKeySecretRef={"name": "other", "key": "k"}),
        pod_obj("stale-0", "ns", "stale", "10.0.0.3", 8000),
        mep_obj("asleep", "ns", "m-asleep", autoscaling={"minReplicas": 0, "maxReplicas": 1}),
        mep_obj("off", "ns", "m-off", replicas=0),
        mep_obj("hidden", "ns", "m-hidden"),
        pod_obj("hidden-0", "ns", "hidden", "10.0.0.4", 8000),
    )
    fresh = {"keys": keyset}   # "other" was not read recently: its model stays with the Python side
    snap = dataplane.snapshot_message(r, lambda info: fresh.get(info.key_secret or ""),
                                      lambda info: info.name == "hidden", SETTINGS)
    models = {m["served_name"]: m for m in snap["models"]}
    assert set(models) == {"m-ready", "m-keyed"}
    ready, keyed = models["m-ready"], models["m-keyed"]
    assert ready["names"] == ["m-lora", "m-ready"] and ready["adapters"] == ["m-lora"]
    assert ready["keys"] is None and ready["prefix_hash"] is None
    assert sorted(x["id"] for x in ready["replicas"]) == ["ns/ready-0", "ns/ready-1"]
    assert {x["host"] for x in ready["replicas"]} == {"10.0.0.1", "fd00::1"}
    assert keyed["keys"] == sorted(d.hex() for d in (digest("sk-one"), digest("sk-two")))
    assert keyed["prefix_hash"]["mean_load_percentage"] == 150
    # Error bodies come from the errors module, per dialect and attempt count.
    un = ready["unreachable"]
    assert un["status"] == 502 and ["Retry-After", "7"] in un["headers"]
    assert un["openai"] == [errors.upstream_unreachable("m-ready", n, 7).body_bytes().decode() for n in (1, 2)]
    assert json.loads(un["anthropic"][0])["type"] == "error"
    assert snap["upstream_broken_event"]["openai"] == errors.upstream_broken().sse_event().decode()
    assert snap["anthropic_suffixes"] == list(errors.ANTHROPIC_SUFFIXES)


def test_handoff_messages_split_whatever_the_reads():
    r = dataplane.HandoffReader()
    stream = (3).to_bytes(8, "big") + b"abc" + (0).to_bytes(8, "big") + (2).to_bytes(8, "big") + b"xy"
    got = []
    fds = iter([10, 11, 12])
    for i, b in enumerate(stream):
        # each descriptor arrives with the first byte of its message
        got += r.feed(bytes([b]), [next(fds)] if i in (0, 11, 19) else [])
    assert got == [(10, b"abc"), (11, b""), (12, b"xy")]


def test_merged_metrics_keep_each_family_and_say_which_data_plane_counted():
    python = ("# HELP modelendpoint_gateway_requests_total Requests.\n"
              "# TYPE modelendpoint_gateway_requests_total counter\n"
              'modelendpoint_gateway_requests_total{code="200",model="m"} 2.0\n')
    compiled = ("# HELP modelendpoint_gateway_requests Requests.\n# TYPE modelendpoint_gateway_requests counter\n"
                'modelendpoint_gateway_requests_total{model="m",code="200"} 5\n'
                "# HELP modelendpoint_gateway_time_to_first_byte_seconds T.\n"
                "# TYPE modelendpoint_gateway_time_to_first_byte_seconds histogram\n"
                'modelendpoint_gateway_time_to_first_byte_seconds_sum{model="m"} 0.5\n'
                'modelendpoint_gateway_time_to_first_byte_seconds_count{model="m"} 5\n'
                'modelendpoint_gateway_time_to_first_byte_seconds_bucket{le="0.5",model="m"} 5\n'
                'modelendpoint_gateway_time_to_first_byte_seconds_bucket{le="+Inf",model="m"} 5\n# EOF\n')
    text = workers.merge_metrics([("python", python), ("compiled", compiled)], label="data_plane",
                                 openmetrics={"compiled"}).decode()
    assert text.count("# TYPE modelendpoint_gateway_requests_total counter") == 1
    assert metric_value(text, "modelendpoint_gateway_requests_total", code="200", model="m", data_plane="python") == 2
    assert metric_value(text, "modelendpoint_gateway_requests_total", code="200", model="m",
                        data_plane="compiled") == 5
    assert metric_value(text, "modelendpoint_gateway_time_to_first_byte_seconds_count", model="m",
                        data_plane="compiled") == 5


@pytest.fixture
def fake():
    r = FakeReplica("r").start()
    yield r
    r.stop()


def chat(model: str = "m", **extra) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], **extra}


def test_the_fast_path_serves_ready_models_and_hands_everything_else_back(fake):
    cluster = FakeCluster()
    cluster.put(mep_obj("ep", "ns", "m"))
    cluster.put(pod_obj("ep-0", "ns", "ep", "127.0.0.1", fake.port))
    gw = GatewayThread(cluster, data_plane="compiled").start()
    before = httpx.get(gw.metrics_url).text  # counters are the process' (other tests' count too)

    def counted(text: str, **labels: str) -> float:
        name = "modelendpoint_gateway_requests_total"
        return metric_value(text, name, **labels) - metric_value(before, name, **labels)

    try:
        with httpx.Client(base_url=gw.url, timeout=10) as h:
            for stream in (False, True, False):
                assert h.post("/v1/chat/completions", json=chat(stream=stream)).status_code == 200
            assert h.get("/v1/models").json()["data"][0]["id"] == "m"     # handed back, same connection
            assert h.post("/v1/chat/completions", json=chat("nope")).json()["error"]["code"] == "model_not_found"
        text = httpx.get(gw.metrics_url).text
        # The fast path counted the three chats; the Python side the /models list and the unknown model.
        assert counted(text, model="m", code="200", data_plane="compiled") == 3
        assert counted(text, model="", code="404", data_plane="python") == 1
        assert metric_value(text, "modelendpoint_gateway_requests_in_flight", model="m", data_plane="compiled") == 0
        # A chunked request body is the Python side's too: it forwards it, with the real peer (the
        # handed-back socket is the client's own).
        body = json.dumps(chat()).encode()
        r = httpx.post(gw.url + "/v1/chat/completions", content=iter([body[:10], body[10:]]),
                       headers={"content-type": "application/json"}, timeout=10)
        assert r.status_code == 200
        seen = {k.lower(): v for k, v in fake.requests[-1]["headers"].items()}
        assert seen["x-forwarded-for"] == "127.0.0.1"
        text = httpx.get(gw.metrics_url).text
        assert counted(text, model="m", code="200", data_plane="python") == 1
    finally:
        gw.stop()


def test_a_data_plane_that_dies_stops_the_gateway_with_status_1(fake):
    cluster = FakeCluster()
    cluster.put(mep_obj("ep", "ns", "m"))
    cluster.put(pod_obj("ep-0", "ns", "ep", "127.0.0.1", fake.port))
    gw = GatewayThread(cluster, data_plane="compiled").start()
    try:
        pid = gw.service.dataplane.proc.pid
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: gw.service.stop.is_set(), timeout=10, what="the gateway to stop")
        assert gw.service.exit_status == 1
    finally:
        gw.stop()


def test_without_the_binary_the_gateway_stops_naming_the_setting(tmp_path):
    from modelendpoint_gateway.main import Fatal, Service

    cluster = FakeCluster()
    settings = load_settings(gateway_env(data_plane="compiled", dataplane_binary=str(tmp_path / "missing")))

    async def start() -> None:
        service = Service(settings, cluster, cluster.secret_data, cluster.annotate)
        with pytest.raises(Fatal, match=r"^invalid MEP_GATEWAY_DATA_PLANE='compiled': modelendpoint-gateway-"
                                        r"dataplane not found \(MEP_GATEWAY_DATAPLANE_BINARY="):
            await service.start()

    asyncio.run(start())


def test_the_process_config_comes_from_the_settings():
    cfg = dataplane.process_config(SETTINGS, (3, 4, 5), threads=2)
    assert cfg["max_attempts"] == 2 and cfg["threads"] == 2 and cfg["listen_fd"] == 3
    assert cfg["client_write_timeout_seconds"] == SETTINGS.client_write_timeout_seconds


def test_the_binary_refuses_a_bad_invocation_in_one_line():
    # It is only ever started by the gateway, with --config; anything else: one line, status 2.
    binary = dataplane.find_binary("")
    assert binary is not None, "modelendpoint-gateway-dataplane is not installed: run `make setup`"
    for argv in ([binary], [binary, "--config", "{not json"]):
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10)
        assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr


@pytest.mark.parametrize("plane", DATA_PLANES)
def test_a_client_s_connection_close_is_answered_and_honoured(fake, plane):
    cluster = FakeCluster()
    cluster.put(mep_obj("ep", "ns", "m"))
    cluster.put(pod_obj("ep-0", "ns", "ep", "127.0.0.1", fake.port))
    gw = GatewayThread(cluster, data_plane=plane).start()
    try:
        body = json.dumps(chat()).encode()
        with socket.create_connection(("127.0.0.1", gw.settings.port), timeout=10) as s:
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nconnection: close\r\n"
                      b"content-type: application/json\r\ncontent-length: %d\r\n\r\n%b" % (len(body), body))
            got = b""
            while chunk := s.recv(65536):   # ends: the gateway closes after the answer
                got += chunk
        head = got.split(b"\r\n\r\n", 1)[0].lower()
        assert head.startswith(b"http/1.1 200") and b"\r\nconnection: close" in head
    finally:
        gw.stop()


def test_sigterm_to_the_whole_process_group_lets_the_stream_finish_and_exits_0(tmp_path, fake):
    # As a terminal's Ctrl-C or `kill -- -<pgid>` does: the data plane gets the signal too, and leaves
    # the drain to the Python gateway.
    fake.chunks, fake.delay = 8, 0.1
    gw = StaticGatewayProcess(tmp_path, [mep_obj("ep", "ns", "m"), pod_obj("ep-0", "ns", "ep", "127.0.0.1", fake.port)],
                              data_plane="compiled").start()
    try:
        wait_for(lambda: gw.proc.poll() is None and httpx.get(gw.url + "/readyz", timeout=2).status_code == 200,
                 timeout=30, what="the gateway ready")
        lines: list[str] = []

        def stream() -> None:
            with httpx.Client(timeout=30) as h, h.stream("POST", gw.url + "/v1/chat/completions",
                                                          json={"model": "m", "stream": True}) as r:
                lines.extend(r.iter_lines())

        t = threading.Thread(target=stream)
        t.start()
        wait_for(lambda: fake.in_flight == 1, timeout=10, what="the stream started")
        os.killpg(gw.proc.pid, signal.SIGTERM)
        t.join(30)
        assert [x for x in lines if x.startswith("data:")][-1] == "data: [DONE]", lines
        assert gw.proc.wait(30) == 0, gw.log_tail()
        assert not any(line.get("msg", "").startswith("the compiled data plane exited") for line in gw.log_lines())
    finally:
        gw.stop()
