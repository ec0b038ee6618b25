"""The gateway on the real control plane, in front of the real runtime, with its own least-privilege token.

ModelEndpoints are reconciled by the real operator (it writes
``status.servedModelName``, the Routable condition and, for autoscaled ones,
acts on the gateway's held annotation). Their Deployments' pods cannot run
here (no CPU node in this tier), so each test creates the runtime pod itself:
a Pod bound to the heartbeat-kept test node, with the operator's labels, the
container port ``http`` of the session's one vLLM runtime, and a status the
test sets (Running, pod IP 127.0.0.1, Ready) as a kubelet would. The gateway
discovers those pods by watching, exactly as it does the local node's pods.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator

import httpx
import pytest
from openai import AuthenticationError, NotFoundError, OpenAI

from fixtures_gateway import GatewayProcess, gateway_identity, runtime_pod, set_pod_ready
from fixtures_operator import mep
from fixtures_runtime import make_lora_adapter
from waiting import wait_for

# Pods of the operator's own Deployments never become ready here: keep them off every node.
NOWHERE = {"gpus": 0, "nodeSelector": {"serving.modelendpoint.dev/gateway-test-nowhere": "true"}}


@pytest.fixture
def ns(kubectl, namespace):
    """The test's namespace; its ModelEndpoints are deleted (and gone) before the next test.

    The runtime serves one name, so every test's ModelEndpoints claim it: one
    left behind in a namespace still being deleted would be older than the
    next test's and own the name.
    """
    yield namespace
    kubectl("delete", "mep", "--all", "-n", namespace, "--wait=true", "--timeout=60s", check=False)


def endpoint(kubectl, namespace: str, name: str, served: str, **spec) -> None:
    kubectl.apply(mep(name, namespace, model="HuggingFaceTB/SmolLM2-135M-Instruct", servedModelName=served,
                      **NOWHERE, **spec))
    wait_for(lambda: (kubectl.get("mep", name, namespace) or {}).get("status", {}).get("servedModelName") == served,
             timeout=60, what=f"the operator to write status.servedModelName of {namespace}/{name}")


def key_secret(kubectl, namespace: str, name: str, keys: str) -> None:
    kubectl.apply({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name, "namespace": namespace},
                   "stringData": {"keys": keys}})


def listed(gw, key: str | None = None) -> list[str]:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    r = httpx.get(gw.base_url + "/models", headers=headers, timeout=10)
    r.raise_for_status()
    return [m["id"] for m in r.json()["data"]]


def client(base_url: str, key: str) -> OpenAI:
    return OpenAI(base_url=base_url, api_key=key, max_retries=0, timeout=120)


MSG = [{"role": "user", "content": "Say hello."}]


def test_real_requests_through_the_gateway_with_the_official_sdk(cluster_gateway, kubectl, ns,
                                                                  runtime_server):
    gw, rt = cluster_gateway, runtime_server
    old_key, new_key = rt.api_keys
    # The Secret holds only the new key; the runtime accepts both, so a 401 for the old one is the gateway's.
    key_secret(kubectl, ns, "keys", new_key)
    endpoint(kubectl, ns, rt.endpoint_id, rt.model, apiKeySecretRef={"name": "keys", "key": "keys"})
    runtime_pod(kubectl, ns, f"{rt.endpoint_id}-pod", rt.endpoint_id, rt.port)
    wait_for(lambda: rt.model in listed(gw, new_key), timeout=10, what="the model listed for its key")
    assert rt.model not in listed(gw) and rt.model not in listed(gw, old_key)

    for base in (gw.base_url, gw.url + "/v1", f"{gw.url}/v2/{rt.endpoint_id}/openai/v1"):
        c = client(base, new_key)
        answer = c.chat.completions.create(model=rt.model, messages=MSG, max_tokens=8, temperature=0)
        assert answer.model == rt.model and answer.choices[0].message.content
        text = "".join(ch.choices[0].delta.content or "" for ch in c.chat.completions.create(
            model=rt.model, messages=MSG, max_tokens=8, temperature=0, stream=True) if ch.choices)
        assert text
    done = client(gw.base_url, new_key).completions.create(model=rt.model, prompt="Once upon", max_tokens=4)
    assert done.choices[0].text is not None
    assert client(gw.base_url, new_key).models.retrieve(rt.model).id == rt.model

    with pytest.raises(NotFoundError) as info:
        client(gw.base_url, new_key).chat.completions.create(model="no-such-model", messages=MSG)
    assert info.value.code == "model_not_found"
    with pytest.raises(AuthenticationError):
        client(gw.base_url, old_key).chat.completions.create(model=rt.model, messages=MSG, max_tokens=2)
    r = httpx.post(gw.base_url + "/chat/completions", json={"messages": MSG}, timeout=10)
    assert r.status_code == 400 and r.json()["error"]["param"] == "model"


def test_a_key_removed_from_the_secret_is_refused_within_30_s(cluster_gateway, kubectl, ns,
                                                              runtime_server):
    gw, rt = cluster_gateway, runtime_server
    old_key, new_key = rt.api_keys
    key_secret(kubectl, ns, "keys", f"{old_key},{new_key}")
    endpoint(kubectl, ns, "rotating", rt.model, apiKeySecretRef={"name": "keys", "key": "keys"})
    runtime_pod(kubectl, ns, "rotating-0", "rotating", rt.port)
    wait_for(lambda: rt.model in listed(gw, old_key), timeout=10, what="the model listed")
    assert client(gw.base_url, old_key).chat.completions.create(model=rt.model, messages=MSG, max_tokens=2)
    key_secret(kubectl, ns, "keys", new_key)
    t0 = time.monotonic()

    def refused() -> bool:
        r = httpx.post(gw.base_url + "/chat/completions", headers={"Authorization": f"Bearer {old_key}"},
                       json={"model": rt.model, "messages": MSG, "max_tokens": 1}, timeout=60)
        return r.status_code == 401

    wait_for(refused, timeout=30, interval=0.5, what="the removed key to be refused")
    assert time.monotonic() - t0 <= 30
    assert client(gw.base_url, new_key).chat.completions.create(model=rt.model, messages=MSG, max_tokens=2)


def test_a_readiness_flip_changes_the_routing_within_a_second(cluster_gateway, kubectl, ns,
                                                              runtime_server):
    gw, rt = cluster_gateway, runtime_server
    endpoint(kubectl, ns, "flip", "flip-model")
    runtime_pod(kubectl, ns, "flip-0", "flip", rt.port)
    wait_for(lambda: "flip-model" in listed(gw), timeout=10, what="flip-model listed")
    for ready, present in ((False, False), (True, True)):
        t0 = time.monotonic()
        set_pod_ready(kubectl, ns, "flip-0", ready)
        written = time.monotonic()
        wait_for(lambda p=present: ("flip-model" in listed(gw)) == p, timeout=5, interval=0.02,
                 what=f"flip-model {'listed' if present else 'gone'}")
        # Measured from the moment the API server accepted the status change.
        assert time.monotonic() - written < 1.0, f"routing changed {time.monotonic() - t0:.2f} s after the write"


def test_the_older_endpoint_owns_a_shared_name_and_the_other_is_marked(cluster_gateway, kubectl, ns,
                                                                       runtime_server):
    gw, rt = cluster_gateway, runtime_server
    endpoint(kubectl, ns, "first", rt.model)
    time.sleep(1.1)  # creationTimestamp has second resolution: make "second" strictly younger
    endpoint(kubectl, ns, "second", rt.model)
    runtime_pod(kubectl, ns, "first-0", "first", rt.port)
    runtime_pod(kubectl, ns, "second-0", "second", rt.port)
    wait_for(lambda: rt.model in listed(gw), timeout=10, what="the shared name listed")

    def served_by() -> str:
        r = httpx.post(gw.base_url + "/chat/completions", headers=rt.headers,
                       json={"model": rt.model, "messages": MSG, "max_tokens": 1}, timeout=60)
        assert r.status_code == 200, r.text
        return r.headers["x-modelendpoint-replica"]

    assert {served_by() for _ in range(3)} == {f"{ns}/first-0"}

    def marked() -> dict:
        conds = (kubectl.get("mep", "second", ns) or {}).get("status", {}).get("conditions", [])
        return next((c for c in conds if c["type"] == "Routable" and c["status"] == "False"), {})

    cond = wait_for(marked, timeout=30, what="Routable=False on the younger ModelEndpoint")
    assert cond["reason"] == "ServedNameConflict" and f"{ns}/first" in cond["message"]
    kubectl("delete", "mep", "first", "-n", ns)
    wait_for(lambda: served_by() == f"{ns}/second-0", timeout=10, what="the name moving to 'second'")


def test_wake_from_zero_holds_the_request_and_the_operator_scales_up(cluster_gateway, kubectl, ns,
                                                                     runtime_server):
    gw, rt = cluster_gateway, runtime_server
    endpoint(kubectl, ns, "sleepy", rt.model,
             autoscaling={"minReplicas": 0, "maxReplicas": 1, "scaleDownDelaySeconds": 0})
    wait_for(lambda: (kubectl.get("deployment", "sleepy", ns) or {}).get("spec", {}).get("replicas") == 0,
             timeout=60, what="the autoscaler to take sleepy to zero")
    wait_for(lambda: rt.model in listed(gw), timeout=10, what="the sleeping model listed (it wakes on demand)")

    lines: list[str] = []
    results: dict = {}

    def stream() -> None:
        with httpx.Client(timeout=120) as h, h.stream(
                "POST", gw.base_url + "/chat/completions", headers=rt.headers,
                json={"model": rt.model, "messages": MSG, "max_tokens": 4, "stream": True}) as r:
            results["status"] = r.status_code
            results["type"] = r.headers.get("content-type")
            for line in r.iter_lines():
                lines.append(line)

    t = threading.Thread(target=stream)
    t.start()
    key = "held.gateway.serving.modelendpoint.dev/gw-it-0"

    def held() -> dict:
        ann = (kubectl.get("mep", "sleepy", ns) or {}).get("metadata", {}).get("annotations", {})
        return json.loads(ann[key]) if key in ann else {}

    assert wait_for(held, timeout=10, what="the held annotation")["held"] == 1
    wait_for(lambda: (kubectl.get("deployment", "sleepy", ns) or {}).get("spec", {}).get("replicas") == 1,
             timeout=10, what="the operator to scale sleepy to one replica")
    assert results.get("status") == 200 and results["type"].startswith("text/event-stream")
    # The Deployment's pod cannot run here: the test's pod plays the replica that became ready.
    runtime_pod(kubectl, ns, "sleepy-0", "sleepy", rt.port)
    t.join(120)
    assert [x for x in lines if x.startswith("data:")][-1] == "data: [DONE]"
    wait_for(lambda: not held(), timeout=15, what="the held annotation removed")


def test_namespaced_mode_serves_only_its_namespaces_with_only_roles_there(control_plane, kubectl, mep_crds,
                                                                           operator, gateway_node, gateway_logs,
                                                                           runtime_server):
    rt = runtime_server
    served, other = f"gw-served-{time.monotonic_ns() % 100000}", f"gw-other-{time.monotonic_ns() % 100000}"
    for name in (served, other):
        kubectl("create", "namespace", name)
        wait_for(lambda n=name: kubectl.get("serviceaccount", "default", n), timeout=30, what=f"namespace {name}")
    try:
        kubeconfig = gateway_identity(control_plane, kubectl, gateway_logs, "gateway-namespaced", [served])
        gw = GatewayProcess({**control_plane.env(), "KUBECONFIG": str(kubeconfig)},
                            gateway_logs / "gateway-namespaced.log", namespaces=served, pod_name="gw-ns-0")
        endpoint(kubectl, served, "inside", "inside-model")
        endpoint(kubectl, other, "outside", "outside-model")
        runtime_pod(kubectl, served, "inside-0", "inside", rt.port)
        runtime_pod(kubectl, other, "outside-0", "outside", rt.port)
        gw.start()
        try:
            wait_for(lambda: "inside-model" in listed(gw), timeout=10, what="inside-model listed")
            assert "outside-model" not in listed(gw)
            r = httpx.post(gw.base_url + "/chat/completions", json={"model": "outside-model", "messages": MSG},
                           timeout=10)
            assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
            # Its Role allows nothing cluster-wide, and it asked for nothing there: no RBAC error in its log.
            assert not [line for line in gw.log_lines() if "403" in json.dumps(line) or "Forbidden" in
                        json.dumps(line)]
        finally:
            assert gw.stop() == 0
    finally:
        for name in (served, other):
            kubectl("delete", "namespace", name, "--wait=false", check=False)


@pytest.fixture
def served_adapter(runtime_server, embedded_model_dir, tmp_path) -> Iterator[str]:
    """A LoRA adapter the session's runtime serves for this test (its adapters file is empty otherwise)."""
    name = "gw-adapter"
    source = make_lora_adapter(embedded_model_dir, tmp_path / name, seed=3)
    runtime_server.write_adapters([{"name": name, "source": str(source)}])
    try:
        runtime_server.settled_adapters({name})
        yield name
    finally:
        runtime_server.write_adapters([])
        runtime_server.settled_adapters(set())


def test_a_lora_adapter_is_routed_by_its_name_and_listed_with_its_parent(cluster_gateway, kubectl, ns,
                                                                         runtime_server, served_adapter):
    gw, rt = cluster_gateway, runtime_server
    # The runtime's own /models lists the adapter with parent = the served name.
    cards = httpx.get(f"{rt.base_url}/models", headers=rt.headers, timeout=10).json()["data"]
    adapter = next(c["id"] for c in cards if c.get("parent") == rt.model)
    assert adapter == served_adapter
    endpoint(kubectl, ns, "lora", rt.model, adapters=[{"name": adapter, "source": "/models/some-adapter"}])
    runtime_pod(kubectl, ns, "lora-0", "lora", rt.port)
    wait_for(lambda: adapter in listed(gw), timeout=10, what="the adapter listed")
    entry = next(m for m in httpx.get(gw.base_url + "/models", timeout=10).json()["data"] if m["id"] == adapter)
    assert entry["parent"] == rt.model

    c = client(gw.base_url, rt.api_key)
    base = c.completions.create(model=rt.model, prompt="The capital of France is", max_tokens=8, temperature=0)
    tuned = c.completions.create(model=adapter, prompt="The capital of France is", max_tokens=8, temperature=0)
    assert tuned.model == adapter and base.model == rt.model
    # The adapter's random weights change greedy output: the runtime ran the adapter, not the base model.
    assert tuned.choices[0].text != base.choices[0].text
    text = "".join(ch.choices[0].delta.content or "" for ch in c.chat.completions.create(
        model=adapter, messages=MSG, max_tokens=8, temperature=0, stream=True) if ch.choices)
    assert text
    with pytest.raises(NotFoundError):
        c.chat.completions.create(model=f"{adapter}-typo", messages=MSG, max_tokens=2)


def test_two_workers_discover_route_wake_and_stop_cleanly(control_plane, kubectl, mep_crds, operator, gateway_node,
                                                          gateway_logs, ns, runtime_server):
    gw_rt = runtime_server
    kubeconfig = gateway_identity(control_plane, kubectl, gateway_logs, "gateway-workers")
    gw = GatewayProcess({**control_plane.env(), "KUBECONFIG": str(kubeconfig)}, gateway_logs / "gateway-workers.log",
                        pod_name="gw-wk-0", workers=2)
    endpoint(kubectl, ns, "sleepy", gw_rt.model,
             autoscaling={"minReplicas": 0, "maxReplicas": 1, "scaleDownDelaySeconds": 0})
    wait_for(lambda: (kubectl.get("deployment", "sleepy", ns) or {}).get("spec", {}).get("replicas") == 0,
             timeout=60, what="the autoscaler to take sleepy to zero")
    gw.start()
    try:
        wait_for(lambda: gw_rt.model in listed(gw), timeout=10, what="the sleeping model listed")
        results: list[int] = []

        def ask() -> None:
            r = httpx.post(gw.base_url + "/chat/completions", headers={**gw_rt.headers, "connection": "close"},
                           json={"model": gw_rt.model, "messages": MSG, "max_tokens": 2}, timeout=120)
            results.append(r.status_code)

        # As many as the shared runtime admits (MAX_CONCURRENT_REQUESTS=3): more would get its 503 at capacity,
        # passed on since there is no other replica. New connections: the kernel spreads them over the workers.
        threads = [threading.Thread(target=ask) for _ in range(3)]
        for t in threads:
            t.start()

        def keys() -> set[str]:
            ann = (kubectl.get("mep", "sleepy", ns) or {}).get("metadata", {}).get("annotations", {})
            return {k for k in ann if k.startswith("held.gateway.serving.modelendpoint.dev/gw-wk-0")}

        assert wait_for(keys, timeout=10, what="the workers' held annotations") <= {
            "held.gateway.serving.modelendpoint.dev/gw-wk-0-w0", "held.gateway.serving.modelendpoint.dev/gw-wk-0-w1"}
        wait_for(lambda: (kubectl.get("deployment", "sleepy", ns) or {}).get("spec", {}).get("replicas") == 1,
                 timeout=10, what="the operator to scale sleepy up")
        runtime_pod(kubectl, ns, "sleepy-0", "sleepy", gw_rt.port)
        for t in threads:
            t.join(120)
        assert results == [200] * 3
        wait_for(lambda: not keys(), timeout=15, what="the held annotations removed")
        text = gw.metrics()
        assert {line.split('worker="')[1][0] for line in text.splitlines()
                if line.startswith("modelendpoint_gateway_models{")} == {"0", "1"}
    finally:
        assert gw.stop() == 0
