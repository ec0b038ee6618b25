"""The gateway under a property-based fuzzer: odd paths, malformed bodies and HTTP, huge headers.

Whatever arrives, the gateway answers no 5xx of its own (its 5xx are for
models that cannot serve, none here), every error it makes is OpenAI-shaped,
and it is still healthy and routing afterwards. The replica behind it is a
fake that answers 200 to anything, so any other 5xx would be the gateway's.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator

import httpx
import pytest
from hypothesis import HealthCheck, assume, given, note, settings
from hypothesis import strategies as st

from fixtures_gateway import DATA_PLANES, FakeCluster, FakeReplica, GatewayThread, mep_obj, pod_obj
from waiting import wait_for

MODEL = "fuzz-model"


@pytest.fixture(scope="module", params=DATA_PLANES)
def gw(request) -> Iterator[GatewayThread]:
    cluster = FakeCluster()
    replica = FakeReplica("r").start()
    cluster.put(mep_obj("ep", "ns", MODEL))
    cluster.put(pod_obj("ep-0", "ns", "ep", "127.0.0.1", replica.port))
    cluster.set_secret("ns", "keys", {"k": "sk-fuzz"})
    cluster.put(mep_obj("keyed", "ns", "keyed-model", apiKeySecretRef={"name": "keys", "key": "k"}))
    cluster.put(pod_obj("keyed-0", "ns", "keyed", "127.0.0.1", replica.port))
    g = GatewayThread(cluster, max_header_bytes=16384, max_body_bytes=65536, access_log="false",
                      data_plane=request.param).start()
    yield g
    g.stop()
    replica.stop()


def check(resp: httpx.Response) -> None:
    assert resp.status_code < 500, (resp.status_code, resp.text[:300])
    if resp.status_code >= 400 and resp.request.method != "HEAD":   # HEAD answers carry no body
        body = resp.json()
        assert set(body) == {"error"}
        assert set(body["error"]) == {"message", "type", "param", "code"}
        assert isinstance(body["error"]["code"], str)


segment = st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x2FFF, exclude_characters="/?#%\x7f"),
                  max_size=12)
paths = st.one_of(
    st.builds(lambda p, segs: p + "/".join(segs),
              st.sampled_from(["/v1/", "/openai/v1/", "/v2/", "/v2/ep/openai/v1/", "/", "//", "/v1/models/",
                               "/openai/v1/models/", "/healthz/", "/v2//openai/v1/"]),
              st.lists(segment, max_size=4)),
    st.sampled_from(["/v1/chat/completions", "/v1/models", "/v1/../v1/models", "/v1/%2e%2e/models",
                     "/v1/models/%00", "/v2/%2F/openai/v1/models", "/openai/v1/models/" + "x" * 3000]),
)
json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                                       max_size=3), max_leaves=8)
bodies = st.one_of(
    st.binary(max_size=300),
    st.builds(lambda m, extra: json.dumps({"model": m, **extra}).encode(),
              st.one_of(st.just(MODEL), st.just("keyed-model"), json_values),
              st.dictionaries(st.sampled_from(["messages", "prompt", "stream", "input", "system"]), json_values,
                              max_size=3)),
    st.builds(lambda v: json.dumps(v).encode(), json_values),
    st.just(b"{" * 5000 + b"}" * 5000),
)
header_names = st.text(alphabet="abcdefghijklmnopqrstuvwxyz-0123456789", min_size=1, max_size=20)
header_values = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=40)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(method=st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD", "PROPFIND"]),
       path=paths, body=bodies, headers=st.dictionaries(header_names, header_values, max_size=5),
       huge=st.sampled_from([0, 0, 0, 20_000, 200_000]))
def test_odd_requests_get_no_5xx_and_openai_shaped_errors(gw, method, path, body, headers, huge):
    if huge:
        headers = {**headers, "x-huge": "h" * huge}
    try:
        resp = httpx.request(method, gw.url + path, content=body, headers=headers, timeout=10)
    except (httpx.LocalProtocolError, httpx.InvalidURL):
        assume(False)  # httpx itself refuses to send it (raw bytes are fuzzed below)
        return
    except httpx.RemoteProtocolError:
        # A request the gateway refuses at the HTTP level may be answered and closed before the
        # client finished sending it (a huge header): acceptable, as long as the gateway lives on.
        return
    note(f"{method} {path[:200]} -> {resp.status_code} {resp.text[:200]}")
    check(resp)


raw = st.one_of(
    st.binary(min_size=1, max_size=400),
    st.builds(lambda m, t, v, rest: m + b" " + t + b" " + v + b"\r\n" + rest,
              st.sampled_from([b"GET", b"POST", b"G\x00T", b"", b"POST" * 50]),
              st.sampled_from([b"/v1/models", b"/v1/chat/completions", b"*", b"http://x/v1/models", b"/\xff"]),
              st.sampled_from([b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2", b"HTTP/1.1 extra", b""]),
              st.sampled_from([b"\r\n", b"host: x\r\n\r\n", b"content-length: 5\r\n\r\nab",
                               b"content-length: -1\r\n\r\n", b"transfer-encoding: chunked\r\n\r\nzz\r\n",
                               b"content-length: 3\r\ncontent-length: 4\r\n\r\nabcd", b"bad header\r\n\r\n",
                               b"upgrade: websocket\r\nconnection: upgrade\r\n\r\n"])),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=raw)
def test_malformed_http_is_refused_cleanly(gw, data):
    with socket.create_connection(("127.0.0.1", gw.settings.port), timeout=10) as s:
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        got = b""
        try:
            while chunk := s.recv(65536):
                got += chunk
        except ConnectionResetError:
            pass
    if not got:
        return  # an incomplete request: the connection ends without an answer
    head, _, rest = got.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    assert status < 500, got[:300]
    if status >= 400:
        body = json.loads(rest.split(b"\r\n")[0] if b"transfer-encoding: chunked" in head else rest[:65536])
        assert set(body["error"]) == {"message", "type", "param", "code"}


def test_still_healthy_and_routing_after_the_fuzzing(gw):
    assert gw.get("/healthz")[0] == 200 and gw.get("/readyz")[0] == 200
    r = httpx.post(gw.url + "/v1/chat/completions", json={"model": MODEL, "messages": []}, timeout=10)
    assert r.status_code == 200 and r.json()["served_by"] == "r"
    # Nothing is left running (the count drops right after each answer's last byte).
    wait_for(lambda: gw.service.api.in_flight == 0, timeout=5, what="no request in flight")
