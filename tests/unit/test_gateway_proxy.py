"""The gateway as a process sees it: real Service and HTTP path, fake cluster view, fake replicas.

The cluster view (FakeCluster) and the replicas (FakeReplica, aiohttp) are
the fakes; everything between them is the gateway's own code on its own
event loop, reached over loopback sockets with httpx and the official SDK.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import logging
import socket
import threading
import time

import httpx
import pytest
from openai import APIError, AuthenticationError, NotFoundError, OpenAI

from fixtures_gateway import DATA_PLANES, FakeCluster, FakeReplica, GatewayThread, mep_obj, metric_value, pod_obj
from waiting import wait_for

KEY = "sk-gw-test-123456"


@pytest.fixture
def cluster() -> FakeCluster:
    return FakeCluster()


@pytest.fixture(params=DATA_PLANES)
def started(request, cluster, replicas):
    """Start a gateway, on each data plane in turn (every test here runs against both)."""
    gateways: list[GatewayThread] = []

    def start(**settings) -> GatewayThread:
        gw = GatewayThread(cluster, **{"data_plane": request.param, **settings}).start()
        gateways.append(gw)
        return gw

    yield start
    for gw in gateways:
        gw.stop()


def replica(replicas, name: str, **kw) -> FakeReplica:
    r = FakeReplica(name, **kw).start()
    replicas.append(r)
    return r


def serve(cluster: FakeCluster, ns: str, name: str, served: str, *pods: FakeReplica, **spec) -> None:
    cluster.put(mep_obj(name, ns, served, **spec))
    for i, r in enumerate(pods):
        cluster.put(pod_obj(f"{name}-{i}", ns, name, "127.0.0.1", r.port))


def chat(model: str | None = "m", stream: bool = False, **extra) -> dict:
    body: dict = {"messages": [{"role": "user", "content": "hello"}], "stream": stream, **extra}
    if model is not None:
        body["model"] = model
    return body


def sdk(gw: GatewayThread, key: str = KEY) -> OpenAI:
    return OpenAI(base_url=gw.base_url, api_key=key, max_retries=0, timeout=30)


def error_of(resp: httpx.Response) -> dict:
    body = resp.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]


# --- routing -----------------------------------------------------------------------------------


def test_routes_by_model_keeping_path_query_and_authorization(cluster, replicas, started):
    a, b = replica(replicas, "a"), replica(replicas, "b")
    serve(cluster, "ns1", "ep-a", "model-a", a)
    serve(cluster, "ns2", "ep-b", "model-b", b)
    gw = started()
    with httpx.Client(base_url=gw.url, timeout=10) as h:
        for path in ("/openai/v1/chat/completions", "/v1/completions", "/v1/embeddings?x=1", "/v1/messages",
                     "/openai/v1/responses", "/v1/tokenize"):
            r = h.post(path, json=chat("model-b"), headers={"Authorization": "Bearer whatever"})
            assert r.status_code == 200, r.text
            assert r.json()["served_by"] == "b"
            assert r.json()["path"] == path and r.json()["authorization"] == "Bearer whatever"
        assert h.post("/v1/chat/completions", json=chat("model-a")).json()["served_by"] == "a"
    assert [q["path"] for q in a.requests] == ["/v1/chat/completions"]
    assert b.requests[0]["headers"]["X-Forwarded-For"] == "127.0.0.1"


def test_official_sdk_streaming_and_not(cluster, replicas, started):
    a = replica(replicas, "a")
    serve(cluster, "ns", "ep", "m", a)
    gw = started()
    client = sdk(gw)
    answer = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
    assert answer.choices[0].message.content == "from a"
    chunks = list(client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}],
                                                 stream=True))
    assert [c.choices[0].delta.content for c in chunks] == ["t0 ", "t1 ", "t2 "]


def test_unknown_model_404_reaches_no_pod_and_bad_bodies_400(cluster, replicas, started):
    a = replica(replicas, "a")
    serve(cluster, "ns", "ep", "m", a)
    gw = started()
    with httpx.Client(base_url=gw.url, timeout=10) as h:
        err = error_of(r := h.post("/v1/chat/completions", json=chat("m-typo")))
        assert r.status_code == 404 and err["code"] == "model_not_found" and err["param"] == "model"
        err = error_of(r := h.post("/v1/chat/completions", json=chat(None)))
        assert r.status_code == 400 and err["param"] == "model" and err["code"] == "missing_required_parameter"
        err = error_of(r := h.post("/v1/chat/completions", json=chat(5)))  # type: ignore[arg-type]
        assert r.status_code == 400 and err["param"] == "model"
        err = error_of(r := h.post("/v1/chat/completions", content=b"{not json"))
        assert r.status_code == 400 and err["code"] == "invalid_json"
        assert h.post("/v1/chat/completions", content=b"[1,2]").status_code == 400
        err = error_of(r := h.get("/v1/chat/completions"))
        assert r.status_code == 404 and err["code"] == "unknown_url"
        assert error_of(h.get("/nothing/here"))["code"] == "unknown_url"
    assert a.requests == []


def test_v2_goes_straight_to_the_named_endpoint(cluster, replicas, started):
    old, new = replica(replicas, "old"), replica(replicas, "new")
    serve(cluster, "a", "first", "shared", old, created=0)
    serve(cluster, "b", "second", "shared", new, created=10)    # loses the served name, still has /v2
    gw = started()
    with httpx.Client(base_url=gw.url, timeout=10) as h:
        assert h.post("/v1/chat/completions", json=chat("shared")).json()["served_by"] == "old"
        r = h.post("/v2/second/openai/v1/chat/completions", json=chat("shared"))
        assert r.json()["served_by"] == "new" and r.json()["path"] == "/v2/second/openai/v1/chat/completions"
        assert h.get("/v2/second/openai/v1/models").json()["data"][0]["id"] == "m"
        err = error_of(r := h.post("/v2/nobody/openai/v1/chat/completions", json=chat("shared")))
        assert r.status_code == 404 and err["code"] == "endpoint_not_found"


# --- LoRA adapters ---------------------------------------------------------------------------------


def adapters(*names: str) -> list[dict]:
    return [{"name": n, "source": f"org/{n}"} for n in names]


def test_an_adapter_name_routes_to_its_endpoint_with_the_body_unchanged(cluster, replicas, started):
    a, b = replica(replicas, "a"), replica(replicas, "b")
    serve(cluster, "ns", "ep-a", "base-a", a, adapters=adapters("a-sql", "a-chat"))
    serve(cluster, "ns", "ep-b", "base-b", b, adapters=adapters("b-sql"))
    gw = started()
    # Counters are the process' (both data planes' runs of this test count under these labels).
    before = metric_value(gw.metrics(), "modelendpoint_gateway_requests_total", model="base-a", code="200")
    answer = sdk(gw).chat.completions.create(model="a-sql", messages=[{"role": "user", "content": "hi"}])
    assert answer.model == "a-sql" and answer.choices[0].message.content == "from a"
    chunks = list(sdk(gw).chat.completions.create(model="b-sql", messages=[{"role": "user", "content": "hi"}],
                                                  stream=True))
    assert chunks[0].id == "b-0" and chunks[0].model == "b-sql"
    with httpx.Client(base_url=gw.url, timeout=10) as h:
        r = h.post("/v2/ep-a/openai/v1/completions", json={"model": "a-chat", "prompt": "x"})
        assert r.json()["served_by"] == "a" and r.json()["model"] == "a-chat"
        err = error_of(r := h.post("/v1/chat/completions", json=chat("c-sql")))
        assert r.status_code == 404 and err["code"] == "model_not_found"
    assert [json.loads(q["body"])["model"] for q in a.requests] == ["a-sql", "a-chat"]
    # The adapter's requests count under its ModelEndpoint's served name (bounded labels).
    text = gw.metrics()
    assert metric_value(text, "modelendpoint_gateway_requests_total", model="base-a", code="200") - before == 2
    assert "a-sql" not in text


def test_models_lists_adapters_with_their_parent_filtered_by_key(cluster, replicas, started):
    a = replica(replicas, "a")
    cluster.set_secret("ns", "keys", {"k": KEY})
    serve(cluster, "ns", "open", "open-model", a, adapters=adapters("open-lora"))
    serve(cluster, "ns", "keyed", "keyed-model", a, adapters=adapters("keyed-lora"),
          apiKeySecretRef={"name": "keys", "key": "k"})
    serve(cluster, "ns", "sleepy", "sleepy-model", adapters=adapters("sleepy-lora"),
          autoscaling={"minReplicas": 0, "maxReplicas": 1})
    serve(cluster, "ns", "off", "off-model", adapters=adapters("off-lora"), replicas=0)
    gw = started()
    with httpx.Client(base_url=gw.url, timeout=10) as h:
        data = h.get("/v1/models", headers={"Authorization": f"Bearer {KEY}"}).json()["data"]
        assert [(m["id"], m.get("parent")) for m in data] == [
            ("keyed-lora", "keyed-model"), ("keyed-model", None), ("open-lora", "open-model"), ("open-model", None),
            ("sleepy-lora", "sleepy-model"), ("sleepy-model", None)]
        assert {"id", "object", "created", "owned_by", "parent"} == set(data[0])
        anonymous = [m["id"] for m in h.get("/v1/models").json()["data"]]
        assert anonymous == ["open-lora", "open-model", "sleepy-lora", "sleepy-model"]
        one = h.get("/openai/v1/models/keyed-lora", headers={"Authorization": f"Bearer {KEY}"}).json()
        assert one["id"] == "keyed-lora" and one["parent"] == "keyed-model"
        assert h.get("/v1/models/keyed-lora").status_code == 404
        assert h.get("/v1/models/off-lora").status_code == 404
        r = h.post("/v1/chat/completions", json=chat("keyed-lora"))
        assert r.status_code == 401 and error_of(r)["code"] == "invalid_api_key"
    assert sdk(gw).models.retrieve("open-lora").id == "open-lora"
    assert a.requests == []


def test_a_replica_without_the_adapter_yet_is_passed_over(cluster, replicas, started):
    a, b = replica(replicas, "a"), replica(replicas, "b")
    a.unknown_models = {"new-lora"}          # a has not read the new adapter list yet
    serve(cluster, "ns", "ep", "base", a, b, adapters=adapters("new-lora"))
    gw = started()
    retried = metric_value(gw.metrics(), "modelendpoint_gateway_retries_total", model="base", reason="404")
    for _ in range(4):                      # ties rotate: some of them try a first
        r = httpx.post(gw.url + "/v1/chat/completions", json=chat("new-lora"), timeout=10)
        assert r.status_code == 200 and r.json()["served_by"] == "b"
    assert len(a.requests) >= 1 and len(b.requests) == 4
    retries = metric_value(gw.metrics(), "modelendpoint_gateway_retries_total", model="base", reason="404")
    assert retries - retried == len(a.requests)
    # For the base model a replica's 404 is its answer: passed on, not retried.
    a.unknown_models = b.unknown_models = {"base"}
    before = len(a.requests) + len(b.requests)
    r = httpx.post(gw.url + "/v1/chat/completions", json=chat("base"), timeout=10)
    assert r.status_code == 404 and len(a.requests) + len(b.requests) == before + 1
    # Loaded nowhere: the last replica's 404 passes through unchanged.
    b.unknown_models = {"new-lora"}
    a.unknown_models = {"new-lora"}
    r = httpx.post(gw.url + "/v1/chat/completions", json=chat("new-lora"), timeout=10)
    assert r.status_code == 404 and error_of(r)["message"] == "The model `new-lora` does not exist."


def test_an_adapter_of_a_model_at_zero_wakes_it(cluster, replicas, started):
    a = replica(replicas, "a")
    serve(cluster, "ns", "sleepy", "base", adapters=adapters("lora"), autoscaling={"minReplicas": 0})
    gw = started()
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        fut = pool.submit(lambda: httpx.post(gw.url + "/v1/chat/completions", json=chat("lora"), timeout=30))
        wait_for(lambda: cluster.held_annotations("ns", "sleepy"), timeout=5, what="the held annotation")
        cluster.put(pod_obj("sleepy-0", "ns", "sleepy", "127.0.0.1", a.port))
        r = fut.result()
    assert r.status_code == 200 and r.json()["model"] == "lora"


# --- /models and keys ---------------------------------------------------------------------------


def test_models_list_ready_and_wakeable_filtered_by_key(cluster, replicas, started):
    a = replica(replicas, "a")
    cluster.set_secret("ns", "keys", {"k": f"{KEY},sk-other"})
    serve(cluster, "ns", "open", "open-model", a)
    serve(cluster, "ns", "keyed", "org/keyed-model", a, apiKeySecretRef={"name": "keys", "key": "k"})
    serve(cluster, "ns", "sleepy", "sleepy-model", autoscaling={"minReplicas": 0, "maxReplicas": 1})
    serve(cluster, "ns", "off", "off-model", replicas=0)
    serve(cluster, "ns", "loading", "loading-model")   # replicas wanted, none ready yet
    gw = started()
    ids = sorted(m.id for m in sdk(gw).models.list())
    assert ids == ["open-model", "org/keyed-model", "sleepy-model"]
    assert sorted(m.id for m in sdk(gw, "sk-wrong").models.list()) == ["open-model", "sleepy-model"]
    with httpx.Client(base_url=gw.url, timeout=10) as h:
        listing = h.get("/v1/models", headers={"x-api-key": KEY}).json()
        assert listing["object"] == "list" and {"id", "object", "created", "owned_by"} == set(listing["data"][0])
        assert "org/keyed-model" in [m["id"] for m in listing["data"]]
    assert sdk(gw).models.retrieve("org/keyed-model").id == "org/keyed-model"
    with pytest.raises(NotFoundError):
        sdk(gw, "sk-wrong").models.retrieve("org/keyed-model")
    with pytest.raises(NotFoundError):
        sdk(gw).models.retrieve("off-model")


def test_keys_checked_before_forwarding_and_rotation_within_a_refresh(cluster, replicas, started, caplog):
    caplog.set_level(logging.INFO)
    a = replica(replicas, "a")
    cluster.set_secret("ns", "keys", {"k": f"sk-old-key,{KEY}"})
    serve(cluster, "ns", "keyed", "m", a, apiKeySecretRef={"name": "keys", "key": "k"})
    gw = started(key_refresh_seconds=0.3)
    with pytest.raises(AuthenticationError) as info:
        sdk(gw, "sk-wrong").chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
    assert info.value.code == "invalid_api_key"
    with httpx.Client(base_url=gw.url, timeout=10) as h:
        r = h.post("/v1/chat/completions", json=chat("m"))
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    assert a.requests == []
    assert sdk(gw, "sk-old-key").chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
    cluster.set_secret("ns", "keys", {"k": KEY})

    def old_refused() -> bool:
        try:
            sdk(gw, "sk-old-key").chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
        except AuthenticationError:
            return True
        return False

    t0 = time.monotonic()
    wait_for(old_refused, timeout=5, what="the rotated-out key to be refused")
    assert time.monotonic() - t0 < 3
    assert sdk(gw).chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
    logged = caplog.text
    assert "sk-old-key" not in logged and KEY not in logged and "hello" not in logged
    assert '"msg":"request"' in logged or "request" in logged


def test_a_public_gateway_serves_a_keyless_model_only_if_it_opts_in(cluster, replicas, started):
    # MEP_GATEWAY_PUBLIC (the chart's published gateway): the allowUnauthenticated opt-in that
    # the API server asks of a keyless ModelEndpoint's own Ingress.
    cluster.set_secret("ns", "keys", {"k": KEY})
    quiet, opted, keyed = replica(replicas, "quiet"), replica(replicas, "opted"), replica(replicas, "keyed")
    serve(cluster, "ns", "quiet", "quiet-model", quiet)
    serve(cluster, "ns", "opted", "opted-model", opted, allowUnauthenticated=True)
    serve(cluster, "ns", "keyed", "keyed-model", keyed, apiKeySecretRef={"name": "keys", "key": "k"})
    serve(cluster, "ns", "asleep", "asleep-model", autoscaling={"minReplicas": 0, "maxReplicas": 1})
    gw = started(public="true")
    with httpx.Client(base_url=gw.url, timeout=10, headers={"Authorization": f"Bearer {KEY}"}) as h:
        assert {m["id"] for m in h.get("/v1/models").json()["data"]} == {"opted-model", "keyed-model"}
        for name in ("quiet-model", "asleep-model"):
            err = error_of(r := h.post("/v1/chat/completions", json=chat(name)))
            assert r.status_code == 403 and err["code"] == "model_not_published", err
            assert "allowUnauthenticated: true" in err["message"]
            assert h.get(f"/v1/models/{name}").status_code == 404
        assert h.post("/v2/quiet/openai/v1/chat/completions", json=chat("quiet-model")).status_code == 403
        assert h.post("/v1/chat/completions", json=chat("opted-model")).status_code == 200
        assert h.post("/v1/chat/completions", json=chat("keyed-model")).status_code == 200
    assert quiet.requests == [] and len(opted.requests) == 1 and len(keyed.requests) == 1
    time.sleep(1.2)   # one writer tick: the keyless model at zero was not woken
    assert cluster.annotations == []
    # Not published (the default): every keyless model is open, as before.
    inside = started()
    with httpx.Client(base_url=inside.url, timeout=10) as h:
        assert h.post("/v1/chat/completions", json=chat("quiet-model")).status_code == 200


def test_unreadable_keys_fail_closed_with_503(cluster, replicas, started):
    a = replica(replicas, "a")
    cluster.fail_secrets = True
    serve(cluster, "ns", "keyed", "m", a, apiKeySecretRef={"name": "keys", "key": "k"})
    gw = started()
    with httpx.Client(base_url=gw.url, timeout=10) as h:
        r = h.post("/v1/chat/completions", json=chat("m"), headers={"Authorization": f"Bearer {KEY}"})
        assert r.status_code == 503 and error_of(r)["code"] == "keys_unavailable" and r.headers["retry-after"]
    assert a.requests == []


# --- balancing -----------------------------------------------------------------------------------


def _concurrently(fn, n: int) -> list:
    with concurrent.futures.ThreadPoolExecutor(n) as pool:
        return [f.result() for f in [pool.submit(fn, i) for i in range(n)]]


def test_least_requests_spreads_outstanding_requests(cluster, replicas, started):
    gate = threading.Event()
    a, b = replica(replicas, "a"), replica(replicas, "b")
    a.gate = b.gate = gate
    serve(cluster, "ns", "ep", "m", a, b)
    gw = started()

    def one(_: int) -> str:
        return httpx.post(gw.url + "/v1/chat/completions", json=chat("m"), timeout=20).json()["served_by"]

    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(one, i) for i in range(6)]
        wait_for(lambda: a.in_flight + b.in_flight == 6, timeout=10, what="6 requests in flight")
        assert (a.in_flight, b.in_flight) == (3, 3)
        gate.set()
        assert sorted(f.result() for f in futures) == ["a"] * 3 + ["b"] * 3


def test_prefix_hash_keeps_a_prefix_on_one_replica_until_the_bound(cluster, replicas, started):
    gate = threading.Event()
    rs = [replica(replicas, n) for n in ("a", "b", "c")]
    serve(cluster, "ns", "ep", "m", *rs, loadBalancing={"strategy": "PrefixHash", "prefixHash": {
        "meanLoadPercentage": 150, "replication": 64, "prefixCharLength": 40}})
    gw = started()
    system = {"role": "system", "content": "You are the shared long system prompt of this app."}

    def ask(i: int) -> str:
        body = {"model": "m", "messages": [system, {"role": "user", "content": f"question {i}"}]}
        return httpx.post(gw.url + "/v1/chat/completions", json=body, timeout=20).json()["served_by"]

    homes = {ask(i) for i in range(10)}   # one after another: never loaded, always home
    assert len(homes) == 1
    home = next(r for r in rs if r.name in homes)
    others = {ask_other(gw, i) for i in range(30)}
    assert len(others) >= 2               # other prefixes spread over the replicas
    # Held in flight at once: home takes up to ceil(1.5 * n / 3) of them, the rest go elsewhere.
    for r in rs:
        r.gate = gate
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(ask, i) for i in range(6)]
        wait_for(lambda: sum(r.in_flight for r in rs) == 6, timeout=10, what="6 requests in flight")
        assert 2 <= home.in_flight <= 3
        gate.set()
        served = [f.result() for f in futures]
    assert served.count(home.name) == home.max_in_flight or served.count(home.name) >= 2


def ask_other(gw: GatewayThread, i: int) -> str:
    body = {"model": "m", "messages": [{"role": "system", "content": f"another app number {i}"}]}
    return httpx.post(gw.url + "/v1/chat/completions", json=body, timeout=20).json()["served_by"]


# --- retries -------------------------------------------------------------------------------------


def test_a_503_before_the_first_byte_is_retried_on_another_replica(cluster, replicas, started):
    a, b = replica(replicas, "a"), replica(replicas, "b")
    a.fail_503 = 1000
    serve(cluster, "ns", "ep", "m", a, b)
    gw = started()
    retries = metric_value(gw.metrics(), "modelendpoint_gateway_retries_total", model="m", reason="503")
    for _ in range(4):   # ties rotate: some of them try a first
        r = httpx.post(gw.url + "/v1/chat/completions", json=chat("m"), timeout=10)
        assert r.status_code == 200 and r.json()["served_by"] == "b"
    assert len(a.requests) >= 1 and len(b.requests) == 4
    after = metric_value(gw.metrics(), "modelendpoint_gateway_retries_total", model="m", reason="503")
    assert after - retries == len(a.requests)


def test_the_only_replica_s_503_passes_through_unchanged(cluster, replicas, started):
    a = replica(replicas, "a")
    a.fail_503 = 5
    serve(cluster, "ns", "ep", "m", a)
    gw = started()
    r = httpx.post(gw.url + "/v1/chat/completions", json=chat("m"), timeout=10)
    assert r.status_code == 503 and r.headers["retry-after"] == "2"
    assert r.json()["error"]["code"] == "overloaded" and r.json()["error"]["message"] == "The server is at capacity"
    assert len(a.requests) == 1


def test_connection_failures_are_retried_and_all_down_is_a_502(cluster, replicas, started):
    a, b = replica(replicas, "a"), replica(replicas, "b")
    a.close_before = 1        # drops the connection after reading the request, before answering
    serve(cluster, "ns", "ep", "m", a, b)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead_port = s.getsockname()[1]        # nothing listens there
    cluster.put(pod_obj("ep-dead", "ns", "ep", "127.0.0.1", dead_port))
    gw = started()
    for _ in range(3):   # at worst: the dead one, a's dropped connection, then b (3 attempts)
        r = httpx.post(gw.url + "/v1/chat/completions", json=chat("m"), timeout=10)
        assert r.status_code == 200, r.text
    assert a.close_before == 0
    serve(cluster, "ns", "down", "m-down")
    cluster.put(pod_obj("down-0", "ns", "down", "127.0.0.1", dead_port))
    wait_for(lambda: gw.get("/v1/models")[1].count(b"m-down"), timeout=5, what="m-down listed")
    r = httpx.post(gw.url + "/v1/chat/completions", json=chat("m-down"), timeout=10)
    assert r.status_code == 502 and error_of(r)["code"] == "upstream_unreachable"


def test_no_retry_once_the_answer_started(cluster, replicas, started):
    a, b = replica(replicas, "a"), replica(replicas, "b")
    a.break_after = b.break_after = 1
    serve(cluster, "ns", "ep", "m", a, b)
    gw = started()
    with httpx.Client(timeout=10) as h, h.stream("POST", gw.url + "/v1/chat/completions",
                                                  json=chat("m", stream=True)) as r:
        events = [line for line in r.iter_lines() if line.startswith("data:")]
    assert len(a.requests) + len(b.requests) == 1
    assert events[0].startswith("data: {") and events[-1] == "data: [DONE]"
    assert json.loads(events[-2].removeprefix("data: "))["error"]["code"] == "upstream_broken"


# --- holding and waking ------------------------------------------------------------------------------


def test_wake_from_zero_holds_then_forwards_and_annotates(cluster, replicas, started):
    a = replica(replicas, "a")
    serve(cluster, "ns", "sleepy", "m-wake", autoscaling={"minReplicas": 0, "maxReplicas": 2})
    gw = started(pod_name="gw-pod-1")
    wakes = metric_value(gw.metrics(), "modelendpoint_gateway_wakes_total", model="m-wake")
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(lambda: httpx.post(gw.url + "/v1/chat/completions", json=chat("m-wake"),
                                                  timeout=30)) for _ in range(3)]
        wait_for(lambda: cluster.held_annotations("ns", "sleepy"), timeout=5, what="the held annotation")
        key, value = cluster.held_annotations("ns", "sleepy")[0]
        assert key == "held.gateway.serving.modelendpoint.dev/gw-pod-1"
        assert json.loads(value)["held"] >= 1 and json.loads(value)["at"].endswith("Z")
        wait_for(lambda: metric_value(gw.metrics(), "modelendpoint_gateway_requests_held", model="m-wake") == 3,
                 timeout=5, what="3 held")
        cluster.put(pod_obj("sleepy-0", "ns", "sleepy", "127.0.0.1", a.port))     # the replica is up
        assert [f.result().status_code for f in futures] == [200, 200, 200]
    wait_for(lambda: cluster.held_annotations("ns", "sleepy")[-1][1] is None, timeout=5,
             what="the annotation removed")
    text = gw.metrics()
    assert metric_value(text, "modelendpoint_gateway_wakes_total", model="m-wake") - wakes == 1
    assert metric_value(text, "modelendpoint_gateway_requests_held", model="m-wake") == 0


def test_a_held_stream_gets_headers_and_comments_then_the_answer(cluster, replicas, started):
    a = replica(replicas, "a")
    serve(cluster, "ns", "sleepy", "m", autoscaling={"minReplicas": 0, "maxReplicas": 1})
    gw = started(hold_keepalive_seconds=0.2)
    lines: list[str] = []
    with httpx.Client(timeout=30) as h, h.stream("POST", gw.url + "/v1/chat/completions",
                                                  json=chat("m", stream=True)) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        it = r.iter_lines()
        for line in it:
            lines.append(line)
            if lines.count(": waiting for the model") == 3:
                break
        cluster.put(pod_obj("sleepy-0", "ns", "sleepy", "127.0.0.1", a.port))
        lines.extend(it)
    data = [x for x in lines if x.startswith("data:")]
    assert data[-1] == "data: [DONE]" and json.loads(data[0].removeprefix("data: "))["id"] == "a-0"


def test_a_held_stream_keeps_getting_comments_until_the_replica_s_first_byte(cluster, replicas, started):
    gate = threading.Event()
    a = replica(replicas, "a")
    a.gate = gate                      # the replica is ready but slow to answer (a long prefill)
    serve(cluster, "ns", "sleepy", "m", autoscaling={"minReplicas": 0, "maxReplicas": 1})
    gw = started(hold_keepalive_seconds=0.2)
    lines: list[str] = []
    with httpx.Client(timeout=30) as h, h.stream("POST", gw.url + "/v1/chat/completions",
                                                  json=chat("m", stream=True)) as r:
        it = r.iter_lines()
        assert next(it) == ": waiting for the model"
        cluster.put(pod_obj("sleepy-0", "ns", "sleepy", "127.0.0.1", a.port))
        wait_for(lambda: a.in_flight == 1, timeout=5, interval=0.01, what="the request forwarded")
        forwarded = time.monotonic()
        for line in it:
            lines.append(line)
            if lines.count(": waiting for the model") == 4:
                break
        # At most one comment can predate the forward (the hold ends within milliseconds of the pod):
        # the others came while the replica was working, 0.2 s apart.
        assert time.monotonic() - forwarded >= 0.4
        gate.set()
        lines.extend(it)
    data = [x for x in lines if x.startswith("data:")]
    assert data[-1] == "data: [DONE]" and len(data) == 4


def test_the_sdk_ignores_the_waiting_comments(cluster, replicas, started):
    a = replica(replicas, "a")
    serve(cluster, "ns", "sleepy", "m", autoscaling={"minReplicas": 0, "maxReplicas": 1})
    gw = started(hold_keepalive_seconds=0.1)
    threading.Timer(0.5, lambda: cluster.put(pod_obj("sleepy-0", "ns", "sleepy", "127.0.0.1", a.port))).start()
    stream = sdk(gw).chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}], stream=True)
    assert [c.choices[0].delta.content for c in stream] == ["t0 ", "t1 ", "t2 "]


def test_hold_timeout_503_with_retry_after_or_an_error_event(cluster, replicas, started):
    serve(cluster, "ns", "sleepy", "m", autoscaling={"minReplicas": 0, "maxReplicas": 1})
    gw = started(hold_timeout_seconds=0.5, retry_after_seconds=7, hold_keepalive_seconds=0.2)
    r = httpx.post(gw.url + "/v1/chat/completions", json=chat("m"), timeout=10)
    assert r.status_code == 503 and r.headers["retry-after"] == "7" and error_of(r)["code"] == "model_not_ready"
    with httpx.Client(timeout=10) as h, h.stream("POST", gw.url + "/v1/chat/completions",
                                                  json=chat("m", stream=True)) as s:
        lines = [x for x in s.iter_lines() if x]
    assert lines[0] == ": waiting for the model" and lines[-1] == "data: [DONE]"
    assert json.loads(lines[-2].removeprefix("data: "))["error"]["code"] == "model_not_ready"
    with pytest.raises(APIError):
        list(sdk(gw).chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}], stream=True))


def test_the_number_held_is_bounded(cluster, replicas, started):
    serve(cluster, "ns", "sleepy", "m", autoscaling={"minReplicas": 0, "maxReplicas": 1})
    gw = started(max_held_requests=1, hold_timeout_seconds=3)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        first = pool.submit(lambda: httpx.post(gw.url + "/v1/chat/completions", json=chat("m"), timeout=10))
        wait_for(lambda: metric_value(gw.metrics(), "modelendpoint_gateway_requests_held", model="m") == 1,
                 timeout=5, what="one held")
        t0 = time.monotonic()
        r = httpx.post(gw.url + "/v1/chat/completions", json=chat("m"), timeout=10)
        assert r.status_code == 503 and error_of(r)["code"] == "overloaded" and r.headers["retry-after"]
        assert time.monotonic() - t0 < 1
        assert first.result().status_code == 503


def test_switched_off_and_unauthenticated_wake_nothing(cluster, replicas, started):
    cluster.set_secret("ns", "keys", {"k": KEY})
    serve(cluster, "ns", "off", "off-model", replicas=0)
    serve(cluster, "ns", "sleepy", "keyed", autoscaling={"minReplicas": 0, "maxReplicas": 1},
          apiKeySecretRef={"name": "keys", "key": "k"})
    serve(cluster, "ns", "broken", "broken-model", phase="Failed", status={"message": "SecretNotFound: keys"})
    gw = started()
    wakes = metric_value(gw.metrics(), "modelendpoint_gateway_wakes_total")
    with httpx.Client(base_url=gw.url, timeout=10) as h:
        r = h.post("/v1/chat/completions", json=chat("off-model"))
        assert r.status_code == 503 and error_of(r)["code"] == "model_unavailable"
        assert "switched off" in error_of(r)["message"]
        assert h.post("/v1/chat/completions", json=chat("keyed"),
                      headers={"Authorization": "Bearer sk-wrong"}).status_code == 401
        r = h.post("/v1/chat/completions", json=chat("broken-model"))
        assert r.status_code == 503 and "Failed" in error_of(r)["message"]
    time.sleep(1.2)   # one writer tick: nothing may have been written
    assert cluster.annotations == []
    assert metric_value(gw.metrics(), "modelendpoint_gateway_wakes_total") == wakes


def test_replica_readiness_flip_moves_traffic_within_a_second(cluster, replicas, started):
    a, b = replica(replicas, "a"), replica(replicas, "b")
    serve(cluster, "ns", "ep", "m", a)
    gw = started()
    assert httpx.post(gw.url + "/v1/chat/completions", json=chat("m")).json()["served_by"] == "a"
    t0 = time.monotonic()
    cluster.put(pod_obj("ep-0", "ns", "ep", "127.0.0.1", a.port, ready=False))
    cluster.put(pod_obj("ep-1", "ns", "ep", "127.0.0.1", b.port))
    wait_for(lambda: httpx.post(gw.url + "/v1/chat/completions", json=chat("m")).json()["served_by"] == "b",
             timeout=1, interval=0.01, what="traffic on b")
    assert time.monotonic() - t0 < 1
    before = len(a.requests)
    for _ in range(5):
        assert httpx.post(gw.url + "/v1/chat/completions", json=chat("m")).json()["served_by"] == "b"
    assert len(a.requests) == before


# --- the HTTP layer ------------------------------------------------------------------------------------


def test_protocol_limits_are_openai_shaped(cluster, replicas, started):
    a = replica(replicas, "a")
    serve(cluster, "ns", "ep", "m", a)
    gw = started(max_body_bytes=4096, max_header_bytes=2048)
    with httpx.Client(base_url=gw.url, timeout=10) as h:
        r = h.post("/v1/chat/completions", json=chat("m", pad="x" * 10_000))
        assert r.status_code == 413 and error_of(r)["code"] == "request_too_large"
        r = h.post("/v1/chat/completions", json=chat("m"), headers={"x-big": "y" * 5000})
        assert r.status_code == 431 and error_of(r)["code"] == "request_header_fields_too_large"
    with socket.create_connection(("127.0.0.1", gw.settings.port)) as s:
        s.sendall(b"GARBAGE / HTTP/9\r\n\r\n")
        data = s.recv(65536)
    assert data.startswith(b"HTTP/1.1 400") and b'"code":"bad_request"' in data
    assert gw.get("/healthz")[0] == 200


class RawReplica:
    """A replica that answers its requests, in order, with the bytes given: framing the aiohttp fake
    cannot make (interim answers, bodiless statuses, a reset). An answer ``(data, "reset")``: send
    ``data``, then reset the connection once the gateway had time to read it."""

    def __init__(self, answers: list[bytes | tuple[bytes, str]]) -> None:
        self.answers = list(answers)
        self.heads: list[bytes] = []
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        buf = b""
        with conn:
            while self.answers:
                while b"\r\n\r\n" not in buf:
                    data = conn.recv(65536)
                    if not data:
                        return
                    buf += data
                head, _, buf = buf.partition(b"\r\n\r\n")
                length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                               if line.lower().startswith(b"content-length:")), 0)
                while len(buf) < length:
                    buf += conn.recv(65536)
                buf = buf[length:]
                self.heads.append(head)
                answer = self.answers.pop(0)
                if isinstance(answer, tuple):
                    conn.sendall(answer[0])
                    time.sleep(0.3)
                    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                    return
                conn.sendall(answer)

    def stop(self) -> None:
        self.sock.close()


def _raw_request(port: int, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(data)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    return out


def test_a_body_that_arrives_in_the_read_of_its_head_is_not_counted_as_head(cluster, replicas, started):
    a = replica(replicas, "a")
    serve(cluster, "ns", "ep", "m", a)
    gw = started(max_header_bytes=2048)
    body = json.dumps(chat("m", pad="x" * 20_000)).encode()
    out = _raw_request(gw.settings.port, b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n"
                       b"content-type: application/json\r\nconnection: close\r\ncontent-length: %d\r\n\r\n%s"
                       % (len(body), body))
    assert out.startswith(b"HTTP/1.1 200"), out[:200]
    assert len(a.requests[0]["body"]) == len(body)


def test_interim_and_bodiless_answers_keep_both_connections_in_step(cluster, started):
    ok = b'{"from":"raw"}'
    raw = RawReplica([
        b"HTTP/1.1 103 Early Hints\r\nlink: </a.css>\r\n\r\n"
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (len(ok), ok),
        b"HTTP/1.1 204 No Content\r\nx-n: 2\r\n\r\n",
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nconnection: x-hop\r\nx-hop: 1\r\n"
        b"content-length: 7\r\n\r\n{\"n\":3}",
    ])
    try:
        serve(cluster, "ns", "ep", "m", raw)
        gw = started()
        with httpx.Client(base_url=gw.url, timeout=10) as h:  # one client connection throughout
            r = h.post("/v1/chat/completions", json=chat("m"))
            assert r.status_code == 200 and r.json() == {"from": "raw"} and "link" not in r.headers
            r = h.post("/v1/chat/completions", json=chat("m"))
            assert r.status_code == 204 and r.content == b"" and r.headers["x-n"] == "2"
            assert "transfer-encoding" not in r.headers and "content-length" not in r.headers
            r = h.post("/v1/chat/completions", json=chat("m"))
            assert r.status_code == 200 and r.json() == {"n": 3}
            assert "x-hop" not in r.headers  # listed in the replica's Connection header
        assert len(raw.heads) == 3
    finally:
        raw.stop()


@pytest.mark.parametrize("answer", [
    b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n\r\npartial",  # ends when the connection does
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncontent-length: 999\r\n\r\ndata: {}\n\n",
], ids=["close-delimited", "sized-events"])
def test_a_reset_replica_cuts_its_answer_for_the_client_rather_than_ending_it(cluster, started, answer):
    raw = RawReplica([(answer, "reset")])
    try:
        serve(cluster, "ns", "ep", "m", raw)
        gw = started()
        cut = (httpx.RemoteProtocolError, httpx.ReadError)  # not a clean end of "partial"
        with httpx.Client(base_url=gw.url, timeout=5) as h, pytest.raises(cut):
            h.post("/v1/chat/completions", json=chat("m"))
        assert gw.get("/healthz")[0] == 200
    finally:
        raw.stop()


def test_connection_listed_headers_and_trailers_are_not_forwarded(cluster, replicas, started):
    a = replica(replicas, "a")
    serve(cluster, "ns", "ep", "m", a)
    gw = started()
    body = json.dumps(chat("m")).encode()
    out = _raw_request(gw.settings.port, b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n"
                       b"connection: close, x-private\r\nx-private: 1\r\nx-kept: 2\r\n"
                       b"x-forwarded-for: 10.0.0.1\r\nx-forwarded-for: 10.0.0.2\r\n"
                       b"transfer-encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\nx-trailer: 3\r\n\r\n"
                       % (len(body), body))
    assert out.startswith(b"HTTP/1.1 200"), out[:200]
    headers = {k.lower(): v for k, v in a.requests[0]["headers"].items()}
    assert "x-kept" in headers and "x-private" not in headers and "x-trailer" not in headers
    assert headers["x-forwarded-for"] == "10.0.0.1, 10.0.0.2, 127.0.0.1"  # both of the client's, then its peer
    assert a.requests[0]["body"] == body


def test_100_continue_for_a_pipelined_request_comes_after_the_answer_before_it(cluster, replicas, started):
    a = replica(replicas, "a")
    a.delay = 0.3
    serve(cluster, "ns", "ep", "m", a)
    gw = started()
    body = json.dumps(chat("m")).encode()
    first = b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body)
    second = (b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nexpect: 100-continue\r\nconnection: close\r\n"
              b"content-length: %d\r\n\r\n" % len(body))
    with socket.create_connection(("127.0.0.1", gw.settings.port)) as s:
        s.settimeout(10)
        s.sendall(first + second)
        data = b""
        while b"HTTP/1.1 100 Continue\r\n\r\n" not in data:
            chunk = s.recv(65536)
            assert chunk, data
            data += chunk
        assert data.startswith(b"HTTP/1.1 200")  # the first answer, whole, then the 100
        s.sendall(body)
        while chunk := s.recv(65536):
            data += chunk
    assert data.count(b"HTTP/1.1 200") == 2 and len(a.requests) == 2


def test_a_head_trickled_in_is_closed_after_the_idle_time(cluster, replicas, started):
    gw = started(client_idle_seconds=1)
    with socket.create_connection(("127.0.0.1", gw.settings.port)) as s:  # blocking: MSG_DONTWAIT peeks
        started_at = time.monotonic()
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n")

        def closed() -> bool:
            try:
                s.sendall(b"x")  # one byte at a time, well inside the idle time
                time.sleep(0.2)
                return s.recv(1, socket.MSG_DONTWAIT) == b""
            except BlockingIOError:
                return False
            except OSError:
                return True

        wait_for(closed, timeout=10, what="the gateway to close a head that never ends")
    assert time.monotonic() - started_at >= 1


@pytest.mark.parametrize("held", [False, True], ids=["ready", "held"])
def test_a_client_that_stops_reading_stops_the_replica_s_stream_too(cluster, replicas, started, held):
    a = replica(replicas, "a")
    # 65 MB: beyond what the kernel buffers on loopback (it autotunes a receive buffer up to 32 MB).
    a.chunks, a.chunk_padding = 1000, 64 * 1024
    if held:
        serve(cluster, "ns", "ep", "m", autoscaling={"minReplicas": 0, "maxReplicas": 1})
    else:
        serve(cluster, "ns", "ep", "m", a)
    gw = started()
    body = json.dumps(chat("m", stream=True)).encode()
    with socket.create_connection(("127.0.0.1", gw.settings.port)) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nconnection: close\r\n"
                  b"content-length: %d\r\n\r\n%s" % (len(body), body))
        if held:
            time.sleep(0.3)
            cluster.put(pod_obj("ep-0", "ns", "ep", "127.0.0.1", a.port))
        wait_for(lambda: a.chunks_written > 0, timeout=10, what="the stream to start")
        time.sleep(2)  # nothing read: the sockets' buffers fill, then the replica has to wait
        assert a.chunks_written < a.chunks, "the gateway read the whole stream into its memory"
        stalled_at = a.chunks_written
        received = 0
        while chunk := s.recv(1 << 20):
            received += len(chunk)
    assert a.chunks_written == a.chunks and received > a.chunks * a.chunk_padding, stalled_at


def test_a_client_that_reads_nothing_is_cut_after_the_write_timeout(cluster, replicas, started):
    a = replica(replicas, "a")
    a.chunks, a.chunk_padding = 1000, 64 * 1024  # 65 MB: more than the kernel buffers on loopback
    serve(cluster, "ns", "ep", "m", a)
    gw = started(client_write_timeout_seconds=1)
    body = json.dumps(chat("m", stream=True)).encode()
    with socket.create_connection(("127.0.0.1", gw.settings.port)) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n"
                  b"content-length: %d\r\n\r\n%s" % (len(body), body))
        wait_for(lambda: a.chunks_written > 0, timeout=10, what="the stream to start")
        cut_at = time.monotonic()
        # The replica's side is cut too: its handler ends with the stream unfinished.
        wait_for(lambda: a.in_flight == 0, timeout=15, what="the gateway to cut the client that reads nothing")
        assert time.monotonic() - cut_at >= 1
        assert a.chunks_written < a.chunks
        received = 0
        with contextlib.suppress(ConnectionResetError):
            while chunk := s.recv(1 << 20):
                received += len(chunk)
    assert received < a.chunks * a.chunk_padding
    assert gw.get("/healthz")[0] == 200


def test_pipelined_requests_are_answered_in_order(cluster, replicas, started):
    a = replica(replicas, "a")
    serve(cluster, "ns", "ep", "m", a)
    gw = started()
    body = json.dumps(chat("m")).encode()
    req = b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n" \
          b"content-length: %d\r\n\r\n%s" % (len(body), body)
    with socket.create_connection(("127.0.0.1", gw.settings.port)) as s:
        s.sendall(req + req + b"GET /healthz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    assert data.count(b"HTTP/1.1 200") == 3 and data.rstrip().endswith(b'{"status":"ok"}')


def test_drain_lets_the_stream_in_flight_finish(cluster, replicas, started):
    a = replica(replicas, "a")
    a.chunks, a.delay = 10, 0.1
    serve(cluster, "ns", "ep", "m", a)
    gw = started(drain_timeout_seconds=20)
    got: list[str] = []
    with httpx.Client(timeout=30) as h, h.stream("POST", gw.url + "/v1/chat/completions",
                                                  json=chat("m", stream=True)) as r:
        it = r.iter_lines()
        got.append(next(it))
        gw.loop.call_soon_threadsafe(gw.service.signal)   # SIGTERM
        wait_for(lambda: gw.get("/readyz")[0] == 503 if _accepts(gw) else True, timeout=5,
                 what="readyz 503 or the listener closed")
        got.extend(it)
    assert [x for x in got if x.startswith("data:")][-1] == "data: [DONE]"
    assert len([x for x in got if x.startswith("data: {")]) == 10
    gw.thread.join(10)
    assert not gw.thread.is_alive()


def _accepts(gw: GatewayThread) -> bool:
    try:
        socket.create_connection(("127.0.0.1", gw.settings.port), timeout=1).close()
        return True
    except OSError:
        return False


def test_metrics_per_model(cluster, replicas, started):
    a = replica(replicas, "a")
    serve(cluster, "ns", "ep", "m-metrics", a)
    gw = started()
    before = gw.metrics()
    for _ in range(3):
        httpx.post(gw.url + "/v1/chat/completions", json=chat("m-metrics"))
    httpx.post(gw.url + "/v1/chat/completions", json=chat("nope"))
    text = gw.metrics()

    def delta(name: str, **labels: str) -> float:
        return metric_value(text, name, **labels) - metric_value(before, name, **labels)

    assert delta("modelendpoint_gateway_requests_total", model="m-metrics", code="200") == 3
    assert delta("modelendpoint_gateway_requests_total", model="", code="404") == 1
    assert delta("modelendpoint_gateway_time_to_first_byte_seconds_count", model="m-metrics") == 3
    # One connection to the replica, opened by the first request and reused by the next two.
    assert delta("modelendpoint_gateway_upstream_connections_opened_total") == 1
    assert metric_value(text, "modelendpoint_gateway_requests_in_flight", model="m-metrics") == 0
    assert metric_value(text, "modelendpoint_gateway_ready_replicas", model="m-metrics") == 1
    assert "nope" not in text


def test_messages_route_errors_are_anthropic_shaped_for_the_anthropic_sdk(cluster, replicas, started):
    import anthropic

    a = replica(replicas, "a")
    cluster.set_secret("ns", "keys", {"k": KEY})
    serve(cluster, "ns", "keyed", "m", a, apiKeySecretRef={"name": "keys", "key": "k"})
    gw = started()
    msg = {"max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}
    client = anthropic.Anthropic(base_url=gw.url, api_key=KEY, max_retries=0)
    with pytest.raises(anthropic.NotFoundError) as missing:
        client.messages.create(model="no-such-model", **msg)
    assert missing.value.body == {"type": "error", "error": {"type": "not_found_error",
                                                             "message": missing.value.body["error"]["message"]}}
    assert "no-such-model" in missing.value.body["error"]["message"]
    with pytest.raises(anthropic.AuthenticationError) as denied:
        anthropic.Anthropic(base_url=gw.url, api_key="sk-wrong", max_retries=0).messages.create(model="m", **msg)
    assert denied.value.body["error"]["type"] == "authentication_error"
    assert a.requests == []
    with httpx.Client(base_url=gw.url, timeout=10) as h:  # the OpenAI routes keep OpenAI's shape
        assert h.post("/v1/chat/completions", json=chat("no-such-model")).json()["error"]["code"] == "model_not_found"
