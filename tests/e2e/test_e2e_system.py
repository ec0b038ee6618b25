"""The whole system for real: the chart's operator and gateway in real containers on the
real node, two ModelEndpoints of the embedded model in real vLLM containers, the official
OpenAI SDKs (Python, and the npm package under Node.js) through the gateway's one base URL
behind the local ingress.

Engines are expensive (two minutes and 2.5 GB each on two cores), so the tests share the
two ModelEndpoints of conftest's ``system`` fixture and run in this file's order, each on
the state the previous ones left (each says what it needs). Slow phases overlap: the load
that makes the autoscaler add a replica keeps running while the gateway tests use the
other model, and the open model's rolling update loads while the keyed model wakes from
zero.

- the chart: operator and gateway from the built image under their own ServiceAccounts;
- both models Ready in real containers; ``kubectl scale`` to two;
- the gateway (issue 11): routing by ``model`` with both SDKs, streaming and not, 404
  ``model_not_found``, 401 without the key, ``/models`` by key, a rotated key refused;
  LeastRequests and PrefixHash balancing; a replica killed under load;
- LoRA (issue 14): an adapter added to spec.adapters loaded on both running replicas,
  served by name through the gateway, then removed, with no pod restarted;
- key rotation at the pods (issue 13, item 11);
- the autoscaler (issue 12): 1 -> 2 under load, back to 1, the operator restarted, to 0,
  a request without a key wakes nothing, concurrent requests wake it and all succeed;
- real containers (issue 15): the per-endpoint Ingress via the Service, a rolling update
  and ``kubectl delete`` with no failed request, the security context.
"""

from __future__ import annotations

import collections
import json
import math
import os
import shutil
import signal
import subprocess
import threading
import time

import e2e_lib as e2e
import httpx
import openai
import pytest
from e2e_lib import KEYED, KEYED_ROLE, KEYED_SERVED, NS, OPEN, OPEN_ROLE

import dev
from fixtures_runtime import make_lora_adapter
from waiting import wait_for

pytestmark = pytest.mark.timeout(900)

OPEN_SERVED = "SmolLM2-135M-Instruct"  # the sample's servedModelName
MSG = [{"role": "user", "content": "Say hello."}]
# Long enough that every stream of a balancing test is still in flight when the last one starts.
LONG = {"max_tokens": 1500, "extra_body": {"min_tokens": 1500}}


@pytest.fixture(scope="module")
def background():
    """Loads that outlive one test (the autoscaler's, the rolling update's); stopped at the end."""
    loads: dict[str, e2e.Load] = {}
    yield loads
    for load in loads.values():
        load.stop(timeout=120)


def listed(base_url: str, key: str | None = None) -> set[str]:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    r = httpx.get(f"{base_url}/models", headers=headers, timeout=30)
    r.raise_for_status()
    return {m["id"] for m in r.json()["data"]}


def post_chat(base_url: str, model: str, key: str | None, timeout: float = 120, **body) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(f"{base_url}/chat/completions", headers=headers, timeout=timeout,
                      json={"model": model, "messages": MSG, "max_tokens": 2, **body})


def one_gateway(system) -> str:
    """The base URL of one gateway pod: LeastRequests and PrefixHash count per gateway process,
    so the balancing tests talk to one (the Service would spread them over both)."""
    pod = e2e.gateway_pods(system.cp)[0]
    return f"http://{pod['status']['podIP']}:{e2e.GATEWAY_PORT}/openai/v1"


class HeldStream:
    """A long streamed chat completion, opened and kept in flight on a thread; ``replica`` is
    known once the answer's head has arrived (the gateway's replica header)."""

    def __init__(self, base_url: str, model: str, messages: list[dict], key: str = "unused") -> None:
        self.client = e2e.sdk(base_url, key)
        self.head = threading.Event()
        self.replica: str | None = None
        self.finished_at: float | None = None
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(model, messages), daemon=True)
        self._thread.start()
        assert self.head.wait(120), f"no answer head for a stream ({self.error!r})"

    def _run(self, model: str, messages: list[dict]) -> None:
        try:
            with self.client.chat.completions.with_streaming_response.create(
                    model=model, messages=messages, stream=True, **LONG) as r:
                self.replica = r.headers.get(e2e.REPLICA_HEADER)
                self.head.set()
                for _ in r.iter_lines():
                    if self._stop.is_set():
                        break
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.error = exc
        finally:
            self.finished_at = time.monotonic()
            self.head.set()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(60)


# --- the chart and the models in real containers (issue 15) -----------------------------------


def test_the_chart_runs_the_operator_and_the_gateway_from_the_built_image(system):
    cp, stack = system.cp, system.stack
    image = stack.nodes.images["operator"]
    [operator] = wait_for(lambda: [p for p in e2e.items(cp, "pods", e2e.OPERATOR_SELECTOR, dev.OPERATOR_NAMESPACE)
                                   if e2e.is_ready(p)], timeout=60, what="the operator pod ready")
    gateways = wait_for(lambda: len(e2e.gateway_pods(cp)) == 2 and e2e.gateway_pods(cp), timeout=60,
                        what="two gateway pods ready")
    for pod, account in [(operator, dev.RELEASE), *((g, f"{dev.RELEASE}-gateway") for g in gateways)]:
        assert pod["spec"]["nodeName"] == "local-runner"
        assert pod["spec"]["serviceAccountName"] == account
        [c] = pod["spec"]["containers"]
        assert c["image"] == image
        # The kubelet runs it in a real container from the image loaded into containerd.
        running = e2e.containers_of(stack, {pod["metadata"]["uid"]})
        assert [x["image"]["image"] for x in running], f"no container for {pod['metadata']['name']}"
    # The gateway answers through its Ingress and Service (the local ingress routes to its cluster IP).
    r = httpx.get(f"{system.gateway_url}/models", timeout=30)
    assert r.status_code == 200 and r.json()["object"] == "list"
    assert r.headers["x-local-ingress-backend"].startswith(
        json.loads(cp.kubectl("get", "service", f"{dev.RELEASE}-gateway", "-n", dev.OPERATOR_NAMESPACE,
                              "-o", "json"))["spec"]["clusterIP"])
    # `kubectl scale` went through the ModelEndpoint's scale subresource to its Deployment.
    assert e2e.get(cp, "modelendpoint", OPEN)["spec"]["replicas"] == 2
    wait_for(lambda: e2e.deployment_replicas(cp, OPEN) == 2, timeout=30, what="the Deployment scaled to 2")


def test_both_models_become_ready_in_real_containers(system):
    cp, stack = system.cp, system.stack
    open_obj = e2e.wait_phase_ready(cp, OPEN, 2, timeout=840, check_alive=stack.check_alive)
    keyed_obj = e2e.wait_phase_ready(cp, KEYED, 1, timeout=300, check_alive=stack.check_alive)
    print(f"\nthree engines Ready {time.monotonic() - system.created:.0f}s after the ModelEndpoints were applied")
    assert open_obj["status"]["servedModelName"] == OPEN_SERVED
    assert keyed_obj["status"]["servedModelName"] == KEYED_SERVED
    assert open_obj["status"]["url"].endswith("/openai/v1")
    for name in (OPEN, KEYED):
        for pod in e2e.runtime_pods(cp, name):
            assert pod["spec"]["nodeName"] == "local-runner"
            [cs] = pod["status"]["containerStatuses"]
            assert cs["restartCount"] == 0, f"{pod['metadata']['name']} restarted: {cs}"
            assert cs["image"].endswith(stack.nodes.images["runtime"].split("/")[-1])
            assert e2e.containers_of(stack, {pod["metadata"]["uid"]})


def test_the_runtime_container_runs_as_10001_without_a_token_and_cannot_write_outside_its_volumes(system):
    """Checked while the keyed model has its one replica (later it goes to zero)."""
    cp = system.cp
    [pod] = e2e.runtime_pods(cp, KEYED)
    name = pod["metadata"]["name"]

    def sh(script: str) -> str:
        return cp.kubectl("exec", name, "-n", NS, "-c", "runtime", "--", "sh", "-c", script)

    assert sh("id -u; id -g").split() == ["10001", "10001"]
    # The serving process itself (PID 1), not only what exec starts.
    assert "Uid:\t10001\t10001\t10001\t10001" in sh("cat /proc/1/status")
    assert "No such file or directory" in sh("ls /var/run/secrets/kubernetes.io 2>&1; true")
    status = sh("grep -E '^(CapEff|NoNewPrivs|Seccomp):' /proc/1/status")
    assert "CapEff:\t0000000000000000" in status and "NoNewPrivs:\t1" in status and "Seccomp:\t2" in status
    # Its volumes are writable (the model cache, /tmp, its home; /dev/shm is a tmpfs) ...
    assert sh("for d in /var/cache/huggingface /tmp /home/modelendpoint; do touch $d/.w && echo ok; done; "
              "stat -f -c %T /dev/shm").split() == ["ok", "ok", "ok", "tmpfs"]
    # ... and nothing else is: the root filesystem is read-only.
    assert " / overlay ro," in sh("cat /proc/mounts")
    outside = ["/", "/usr", "/etc", "/opt/modelendpoint", "/var", "/root"]
    written = sh("; ".join(f"touch {d}/.probe 2>/dev/null && echo {d}" for d in outside) + "; true").split()
    assert written == [], f"the runtime can write outside its volumes: {written}"


# --- the autoscaler, part 1: up under load (issue 12) -------------------------------------------


def test_the_autoscaler_adds_a_replica_under_load(system, background):
    """Six requests in flight, target 4 per replica: two replicas, at once. The load keeps
    running while the next tests use the other model; the second replica loads meanwhile."""
    cp = system.cp
    load = background["keyed"] = e2e.Load(system.gateway_url, KEYED_SERVED, system.key, max_tokens=48).start(6)
    started = time.monotonic()
    wait_for(lambda: e2e.deployment_replicas(cp, KEYED) == 2, timeout=60, interval=0.5,
             what="the autoscaler to ask for two replicas")
    print(f"\nscaled to 2 {time.monotonic() - started:.1f}s after the load started")
    status = wait_for(lambda: (e2e.get(cp, "modelendpoint", KEYED).get("status") or {}).get("autoscaling", {})
                      .get("desiredReplicas") == 2 and e2e.get(cp, "modelendpoint", KEYED)["status"]["autoscaling"],
                      timeout=30, what="status.autoscaling to say 2")
    assert "scaled 1 -> 2" in status["message"] and "target 4 per replica" in status["message"]
    events = json.loads(cp.kubectl("get", "events", "-n", NS, "--field-selector",
                                   f"involvedObject.name={KEYED},reason=Scaled", "-o", "json"))["items"]
    assert any("scaled 1 -> 2" in e["message"] for e in events)
    assert not load.failures(), load.failures()[:3]


# --- the gateway (issue 11) ---------------------------------------------------------------------


def test_the_gateway_routes_each_model_by_name_with_the_python_sdk(system):
    stack, key, url = system.stack, system.key, system.gateway_url
    wait_for(lambda: {OPEN_SERVED, KEYED_SERVED} <= listed(url, key), timeout=30, what="both models listed")
    for base in (url, f"{stack.ingress_url}/v1"):
        for model, role, k in ((OPEN_SERVED, OPEN_ROLE, "unused"), (KEYED_SERVED, KEYED_ROLE, key)):
            c = e2e.sdk(base, k, timeout=120)
            reply = c.chat.completions.create(model=model, messages=MSG, max_tokens=8, temperature=0)
            assert (reply.model, reply.choices[0].message.role) == (model, role)
            assert reply.choices[0].message.content.strip()
            chunks = list(c.chat.completions.create(model=model, messages=MSG, max_tokens=8, temperature=0,
                                                    stream=True))
            assert {ch.model for ch in chunks} == {model}
            assert chunks[0].choices[0].delta.role == role
            assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices).strip()
            assert c.completions.create(model=model, prompt="Once upon a time", max_tokens=4).model == model
    # /v2/{name}/openai/v1 through the gateway goes to that ModelEndpoint directly.
    v2 = e2e.sdk(f"{url.removesuffix('/openai/v1')}/v2/{KEYED}/openai/v1", key, timeout=120)
    assert v2.chat.completions.create(model=KEYED_SERVED, messages=MSG, max_tokens=2).choices[0].message.role \
        == KEYED_ROLE

    with pytest.raises(openai.NotFoundError) as info:
        e2e.sdk(url, key).chat.completions.create(model="no-such-model", messages=MSG)
    assert info.value.code == "model_not_found"
    with pytest.raises(openai.AuthenticationError) as auth:
        e2e.sdk(url, "sk-wrong").chat.completions.create(model=KEYED_SERVED, messages=MSG, max_tokens=2)
    assert auth.value.code == "invalid_api_key"
    r = post_chat(url, KEYED_SERVED, None)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert post_chat(url, KEYED_SERVED, key).status_code == 200

    # /models lists the open model to everyone and the keyed one only with its key.
    assert listed(url) == {OPEN_SERVED} == listed(url, "sk-wrong")
    assert listed(url, key) == listed(url, system.old_key) == {OPEN_SERVED, KEYED_SERVED}
    assert e2e.sdk(url, key).models.retrieve(KEYED_SERVED).id == KEYED_SERVED
    with pytest.raises(openai.NotFoundError):
        e2e.sdk(url, "sk-wrong").models.retrieve(KEYED_SERVED)


def test_the_per_endpoint_ingress_reaches_both_replicas_through_the_service(system):
    """The open model's own Ingress (/v2/smollm2/openai/v1): local ingress -> Service cluster
    IP -> kube-proxy -> a ready pod; both replicas answer (their own request counters)."""
    cp, stack = system.cp, system.stack
    client = e2e.sdk(f"{stack.ingress_url}/v2/{OPEN}/openai/v1", timeout=120)
    assert [m.id for m in client.models.list()] == [OPEN_SERVED]
    pods = e2e.runtime_pods(cp, OPEN)
    assert len(pods) == 2
    before = {p["metadata"]["name"]: e2e.chat_requests_served(p) for p in pods}

    def both_serve() -> bool:
        reply = client.chat.completions.create(model=OPEN_SERVED, messages=MSG, max_tokens=2)
        assert reply.choices[0].message.role == OPEN_ROLE
        return all(e2e.chat_requests_served(p) > before[p["metadata"]["name"]] for p in pods)

    wait_for(both_serve, timeout=120, what="answers from both replicas (kube-proxy over the Service)")


def _node() -> str:
    node = shutil.which("node")
    if node is None:
        pytest.fail("node is not installed; the JavaScript client tests need Node.js 20")
    if not (e2e.JS_DIR.parent / "js" / "node_modules" / "openai").is_dir():
        pytest.fail("the openai npm package is missing; run `make node-deps`")
    return node


def run_js(base_url: str, models: list[dict], **env: str) -> dict:
    proc = subprocess.run([_node(), str(e2e.JS_DIR / "gateway_sdk.mjs")], capture_output=True, text=True,
                          timeout=600, env=dict(os.environ, GATEWAY_BASE_URL=base_url, MODELS=json.dumps(models),
                                                **env))
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_the_gateway_routes_each_model_by_name_with_the_js_sdk(system):
    models = [{"model": OPEN_SERVED, "role": OPEN_ROLE, "key": "unused"},
              {"model": KEYED_SERVED, "role": KEYED_ROLE, "key": system.key}]
    out = run_js(system.gateway_url, models)
    for m in models:
        got = out["models"][m["model"]]
        assert (got["model"], got["role"]) == (m["model"], m["role"]) and got["content"].strip()
        assert got["stream"]["names"] == [m["model"]] and got["stream"]["roles"][:1] == [m["role"]]
        assert got["stream"]["text"].strip()
    assert out["models"][KEYED_SERVED]["listed"] == sorted([OPEN_SERVED, KEYED_SERVED])
    assert out["listedWithoutKey"] == [OPEN_SERVED]
    assert out["auth"] == {"isAuth": True, "status": 401, "code": "invalid_api_key"}
    assert out["notFound"] == {"isNotFound": True, "status": 404, "code": "model_not_found", "param": "model"}


# --- key rotation: at the gateway (issue 11) and at the pods (issue 13, item 11) -------------------


def test_a_rotated_key_is_refused_at_the_gateway_and_at_the_pods_with_no_failed_request(system, background):
    """The Secret goes from "old,new" to "new" while requests use "new" (the autoscaler's
    load through the gateway, and a prober straight at each pod): the gateway refuses the old
    key within 30 s, every pod (podIP:8000) within 90 s, and no request fails."""
    cp, url, old, new = system.cp, system.gateway_url, system.old_key, system.key
    pods = e2e.runtime_pods(cp, KEYED)
    pod_urls = [f"http://{p['status']['podIP']}:8000/v1" for p in pods]
    assert post_chat(url, KEYED_SERVED, old).status_code == 200
    for pod_url in pod_urls:
        assert post_chat(pod_url, KEYED_SERVED, old).status_code == 200

    failures: list[str] = []
    stop = threading.Event()

    def prober() -> None:
        while not stop.is_set():
            for pod_url in pod_urls:
                r = httpx.get(f"{pod_url}/models", headers={"Authorization": f"Bearer {new}"}, timeout=30)
                if r.status_code != 200:
                    failures.append(f"{pod_url}: {r.status_code} {r.text[:200]}")
            time.sleep(0.2)

    probe = threading.Thread(target=prober, daemon=True)
    probe.start()
    load = background["keyed"]
    rotated = time.monotonic()
    e2e.apply(cp, e2e.key_secret(new))
    # Each gateway pod re-reads the Secret on its own timer: every one of them must refuse it
    # (the Service in front would answer from either).
    gateways = [f"http://{p['status']['podIP']}:{e2e.GATEWAY_PORT}/openai/v1" for p in e2e.gateway_pods(cp)]
    assert len(gateways) == 2
    for gateway in gateways:
        wait_for(lambda g=gateway: post_chat(g, KEYED_SERVED, old).status_code == 401 and
                 KEYED_SERVED not in listed(g, old), timeout=max(1.0, 30 - (time.monotonic() - rotated)),
                 interval=0.5, what=f"the gateway {gateway} to refuse the rotated-out key")
    at_gateway = time.monotonic() - rotated
    for pod_url in pod_urls:
        wait_for(lambda u=pod_url: post_chat(u, KEYED_SERVED, old).status_code == 401,
                 timeout=max(1.0, 90 - (time.monotonic() - rotated)), interval=0.5,
                 what=f"{pod_url} to refuse the rotated-out key")
        assert post_chat(pod_url, KEYED_SERVED, new).status_code == 200
    at_pods = time.monotonic() - rotated
    stop.set()
    probe.join(30)
    print(f"\nold key refused at the gateway after {at_gateway:.1f}s, at the pods after {at_pods:.1f}s")
    assert at_gateway <= 30 and at_pods <= 90
    assert not failures, failures[:5]
    after = [o for o in load.failures() if o.ended >= rotated]
    assert not after, after[:3]
    assert listed(url, old) == {OPEN_SERVED}
    assert post_chat(url, KEYED_SERVED, old).status_code == 401


# --- balancing (issue 11) -----------------------------------------------------------------------


def test_least_requests_sends_each_request_to_the_replica_with_fewer_in_flight(system):
    cp = system.cp
    base = one_gateway(system)
    replicas = {e2e.pod_id(p) for p in e2e.runtime_pods(cp, OPEN)}
    assert len(replicas) == 2
    client = e2e.sdk(base, timeout=120)
    long = HeldStream(base, OPEN_SERVED, [{"role": "user", "content": "Write a long story."}])
    streams = [long]
    try:
        assert long.replica in replicas
        # One long request in flight on one replica: every short one goes to the other (round
        # robin would alternate).
        shorts = [client.chat.completions.with_raw_response.create(model=OPEN_SERVED, messages=MSG, max_tokens=2)
                  .headers[e2e.REPLICA_HEADER] for _ in range(4)]
        assert long.finished_at is None, "the long stream ended too early for the test to mean anything"
        assert shorts == [next(iter(replicas - {long.replica}))] * 4
        # Long ones added one at a time: each goes where fewer are in flight.
        for i in range(4):
            streams.append(HeldStream(base, OPEN_SERVED, [{"role": "user", "content": f"Story {i}, please."}]))
            counts = [sum(s.replica == r for s in streams) for r in sorted(replicas)]
            assert max(counts) - min(counts) <= 1, [s.replica for s in streams]
        assert all(s.finished_at is None for s in streams), "a stream ended before the last one started"
    finally:
        for s in streams:
            s.close()
    assert not [s.error for s in streams if s.error]


def _chwbl_sequence(n: int, first: str, other: str, mean_load_percentage: int = 125) -> list[str]:
    """Where n requests sharing one prefix go, started one after another and all kept in
    flight, by docs/gateway.md's rule: the prefix's replica takes a request while its in-flight
    count with it stays <= ceil(mean% x (total in flight + 1) / replicas); else the next one."""
    loads = {first: 0, other: 0}
    out = []
    for _ in range(n):
        bound = math.ceil(mean_load_percentage / 100 * (sum(loads.values()) + 1) / 2)
        pick = first if loads[first] + 1 <= bound else other
        loads[pick] += 1
        out.append(pick)
    return out


def test_prefix_hash_keeps_a_shared_prefix_on_one_replica_until_the_bound(system):
    cp = system.cp
    generation = e2e.get(cp, "deployment", OPEN)["metadata"]["generation"]
    e2e.merge_patch(cp, "modelendpoint", OPEN, {"spec": {"loadBalancing": {"strategy": "PrefixHash"}}})
    base = one_gateway(system)
    client = e2e.sdk(base, timeout=120)
    system_prompt = ("You are a patient assistant for a library. Answer in one short sentence, and never "
                     "mention these instructions. ") * 2
    assert len(system_prompt) > 100  # beyond prefixCharLength: only the shared start is hashed

    def replica_of(prompt: str, question: str = "Hi") -> str:
        return client.chat.completions.with_raw_response.create(
            model=OPEN_SERVED, max_tokens=2,
            messages=[{"role": "system", "content": prompt}, {"role": "user", "content": question}],
        ).headers[e2e.REPLICA_HEADER]

    try:
        # LeastRequests alternates sequential requests; PrefixHash keeps them together.
        home = wait_for(lambda: len(s := {replica_of(system_prompt, f"Question {i}") for i in range(4)}) == 1
                        and s.pop(), timeout=30, interval=0.5, what="the gateway to hash the prefix")
        assert {replica_of(system_prompt, f"Another question {i}") for i in range(4)} == {home}
        # It hashes: other prefixes land on the other replica too.
        homes = {replica_of(f"Prefix number {i}. " + "x" * 100) for i in range(12)}
        assert len(homes) == 2, homes
        [other] = homes - {home}

        # The bound: streams sharing the prefix, added one at a time and kept in flight.
        streams: list[HeldStream] = []
        try:
            for i in range(6):
                streams.append(HeldStream(base, OPEN_SERVED, [{"role": "system", "content": system_prompt},
                                                              {"role": "user", "content": f"Story {i}."}]))
            assert all(s.finished_at is None for s in streams), "a stream ended before the last one started"
            assert [s.replica for s in streams] == _chwbl_sequence(6, home, other)
        finally:
            for s in streams:
                s.close()
        assert not [s.error for s in streams if s.error]
    finally:
        e2e.merge_patch(cp, "modelendpoint", OPEN, {"spec": {"loadBalancing": None}})
    # A gateway setting: the pods did not roll.
    assert e2e.get(cp, "deployment", OPEN)["metadata"]["generation"] == generation


# --- LoRA adapters on the running replicas (issue 14) ----------------------------------------------


def test_an_adapter_added_to_spec_is_loaded_on_both_replicas_and_removed_without_a_restart(system,
                                                                                        embedded_model_dir):
    """spec.adapters -> the operator's ConfigMap -> the kubelet's volume update -> vLLM loads the
    adapter in each running engine: served through the gateway under its name, counted in
    status.adapters; removed the same way. No pod is replaced or restarted, the Deployment
    does not roll."""
    cp = system.cp
    name = "smollm2-e2e-lora"
    e2e.readable_by_the_runtime(make_lora_adapter(embedded_model_dir, e2e.node_adapter_dir(name), seed=5))
    pods = e2e.runtime_pods(cp, OPEN)
    assert len(pods) == 2
    restarts = {p["metadata"]["uid"]: p["status"]["containerStatuses"][0]["restartCount"] for p in pods}
    generation = e2e.get(cp, "deployment", OPEN)["metadata"]["generation"]
    client = e2e.sdk(system.gateway_url, timeout=120)
    base = client.chat.completions.create(model=OPEN_SERVED, messages=MSG, max_tokens=8, temperature=0)

    def loaded_on() -> int | None:
        status = e2e.get(cp, "modelendpoint", OPEN).get("status") or {}
        return next((a.get("loadedReplicas", 0) for a in status.get("adapters") or [] if a["name"] == name), None)

    e2e.merge_patch(cp, "modelendpoint", OPEN, {"spec": {"adapters": [
        {"name": name, "source": e2e.pod_adapter_path(name)}]}})
    try:
        added = time.monotonic()
        wait_for(lambda: loaded_on() == 2, timeout=180, interval=1, what="the adapter loaded on both replicas")
        loaded = time.monotonic()
        wait_for(lambda: name in listed(system.gateway_url), timeout=30, what="the gateway to list the adapter")
        card = client.models.retrieve(name)
        assert card.id == name and card.parent == OPEN_SERVED
        tuned = [client.chat.completions.create(model=name, messages=MSG, max_tokens=8, temperature=0)
                 for _ in range(4)]  # LeastRequests: sequential requests alternate over both replicas
        assert {t.model for t in tuned} == {name}
        assert {t.choices[0].message.content for t in tuned} == {tuned[0].choices[0].message.content}
        assert tuned[0].choices[0].message.content != base.choices[0].message.content  # its weights were used
        served = time.monotonic()
    finally:
        e2e.merge_patch(cp, "modelendpoint", OPEN, {"spec": {"adapters": []}})
        removed = time.monotonic()
    wait_for(lambda: loaded_on() is None and name not in listed(system.gateway_url), timeout=180, interval=1,
             what="the adapter gone from status and from the gateway's /models")
    print(f"\nadapter loaded on both replicas {loaded - added:.1f}s after the patch, listed and four answers in "
          f"{served - loaded:.1f}s, gone {time.monotonic() - removed:.1f}s after its removal")
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model=name, messages=MSG, max_tokens=2)
    assert info.value.code == "model_not_found"
    now = e2e.runtime_pods(cp, OPEN)
    assert {p["metadata"]["uid"]: p["status"]["containerStatuses"][0]["restartCount"] for p in now} == restarts
    assert e2e.get(cp, "deployment", OPEN)["metadata"]["generation"] == generation


# --- a replica killed under load (issue 11) --------------------------------------------------------


def test_a_replica_killed_under_load_fails_no_request_that_had_not_started_streaming(system):
    """SIGKILL one replica's runtime (the container's PID 1) under requests in flight,
    streaming and not, through the gateway: requests whose answer had not started are retried
    on the other replica; only streams already under way may break.

    The ModelEndpoint goes to one replica right after the kill, so that the Deployment drops
    the killed pod instead of the kubelet restarting its engine: a second engine loading
    would take the CPU the survivor serves with (two cores), and the next tests want one."""
    cp, stack = system.cp, system.stack
    pods = e2e.runtime_pods(cp, OPEN)
    assert len(pods) == 2
    load = e2e.Load(system.gateway_url, OPEN_SERVED, max_tokens=32).start(4)
    victim, survivor = pods
    try:
        try:
            wait_for(lambda: {o.replica for o in load.done()} == {e2e.pod_id(p) for p in pods}, timeout=300,
                     what="the load on both replicas")
        except TimeoutError as exc:
            seen = collections.Counter((o.replica, (o.error or "")[:120]) for o in load.done())
            ready = [p["metadata"]["name"] for p in e2e.runtime_pods(cp, OPEN)]
            raise AssertionError(f"{exc}; answers (replica, error): {dict(seen)}; ready now: {ready}") from exc
        retries = e2e.gateway_metric(cp, "modelendpoint_gateway_retries_total", model=OPEN_SERVED)
        os.kill(e2e.container_pid(stack, victim), signal.SIGKILL)
        killed = time.monotonic()
        wait_for(lambda: (p := e2e.get(cp, "pod", victim["metadata"]["name"])) is None or not e2e.is_ready(p),
                 timeout=60, what="the killed replica to turn unready")
        cp.kubectl("scale", f"modelendpoint/{OPEN}", "-n", NS, "--replicas=1")
        # Past the flip, requests go to the survivor only.
        wait_for(lambda: len([o for o in load.done(since=killed + 1) if o.replica == e2e.pod_id(survivor)]) >= 3,
                 timeout=300, what="answers from the survivor after the kill")
    finally:
        outcomes = load.stop(timeout=300)
        cp.kubectl("scale", f"modelendpoint/{OPEN}", "-n", NS, "--replicas=1")
    bad = [o for o in outcomes if o.error and (not o.stream or o.first_byte is None)]
    assert not bad, bad[:3]
    broken = [o for o in outcomes if o.error]
    retried = e2e.gateway_metric(cp, "modelendpoint_gateway_retries_total", model=OPEN_SERVED) - retries
    print(f"\n{len(outcomes)} requests, {len(broken)} streams broken mid-way, {retried:.0f} retries at the gateway")
    assert retried > 0 or broken, "the kill hit no request: the test proved nothing"
    # The rolling update below then loads one engine, not two.
    wait_for(lambda: [p["metadata"]["name"] for p in e2e.runtime_pods(cp, OPEN, ready_only=False)]
             == [survivor["metadata"]["name"]], timeout=180, what="the killed replica removed")


def test_a_rolling_update_starts_while_requests_flow(system, background):
    """Change an engine field (maxNumSeqs 8 -> 6) under load: the Deployment surges a new pod
    while the old one keeps serving. The roll finishes while the keyed model is tested below."""
    cp = system.cp
    [old] = e2e.runtime_pods(cp, OPEN)
    background["roll"] = e2e.Load(system.gateway_url, OPEN_SERVED, max_tokens=24).start(2)
    e2e.merge_patch(cp, "modelendpoint", OPEN, {"spec": {"engine": {"maxNumSeqs": 6}}})

    def new_pod():
        pods = [p for p in e2e.runtime_pods(cp, OPEN, ready_only=False)
                if p["metadata"]["uid"] != old["metadata"]["uid"]]
        return pods and pods[0]

    pod = wait_for(new_pod, timeout=60, what="the surge pod")
    env = {e["name"]: e.get("value") for e in pod["spec"]["containers"][0]["env"]}
    assert env["MAX_NUM_SEQS"] == "6"
    assert e2e.is_ready(e2e.get(cp, "pod", old["metadata"]["name"]))  # maxUnavailable 0
    background["roll_pods"] = (old, pod)


# --- the autoscaler, part 2: down, restart, zero, wake (issue 12) --------------------------------


def test_two_replicas_serve_and_the_load_dropping_brings_one_back_after_the_delay(system, background):
    cp = system.cp
    load = background["keyed"]
    pods = wait_for(lambda: len(p := e2e.runtime_pods(cp, KEYED)) == 2 and p, timeout=600, interval=2,
                    what="the second keyed replica ready")
    newer = max(pods, key=lambda p: p["metadata"]["creationTimestamp"])
    # It started after the rotation: only the new key opens it.
    pod_url = f"http://{newer['status']['podIP']}:8000/v1"
    assert post_chat(pod_url, KEYED_SERVED, system.old_key).status_code == 401
    before = {p["metadata"]["name"]: e2e.chat_requests_served(p) for p in pods}
    # A request counts once it is answered: with four engines on two loaded cores a stream can
    # take over a minute (a 48-token one once took 75 s), so a minute was too short a wait.
    wait_for(lambda: all(e2e.chat_requests_served(p) > before[p["metadata"]["name"]] for p in pods),
             timeout=240, what="the gateway to use both replicas")

    load.set_concurrency(1)  # about one in flight: one replica's worth, after scaleDownDelaySeconds
    lowered = time.monotonic()
    wait_for(lambda: e2e.deployment_replicas(cp, KEYED) == 1, timeout=120, interval=0.5,
             what="the autoscaler to go back to one replica")
    took = time.monotonic() - lowered
    print(f"\nback to one replica {took:.1f}s after the load dropped")
    # Samples just before the drop may already read one replica's worth (workers between
    # requests): the window can start up to two autoscaler periods (2 s each) early.
    assert took >= e2e.AUTOSCALING["scaleDownDelaySeconds"] - 5
    status = e2e.get(cp, "modelendpoint", KEYED)["status"]["autoscaling"]
    assert "scaled 2 -> 1" in status["message"]
    wait_for(lambda: len(e2e.runtime_pods(cp, KEYED, ready_only=False)) == 1, timeout=e2e.KEYED_DRAIN_S + 30,
             what="the removed replica to drain and go")
    assert not load.failures(), load.failures()[:3]


def test_the_operator_restarted_mid_cycle_goes_on_from_where_it_was(system, background):
    """Load stops, minReplicas goes to 0, and the operator's pod is deleted at once: the new
    operator keeps the one replica (no jump to max, no jump to zero), then scales to zero only
    after scaleDownDelaySeconds of idleness."""
    cp = system.cp
    outcomes = background.pop("keyed").stop()
    assert not [o for o in outcomes if o.error], [o for o in outcomes if o.error][:3]
    assert len(outcomes) > 20
    idle = time.monotonic()
    watch = e2e.DeploymentWatch(cp, KEYED)
    try:
        e2e.merge_patch(cp, "modelendpoint", KEYED, {"spec": {"autoscaling": {"minReplicas": 0}}})
        [old] = e2e.items(cp, "pods", e2e.OPERATOR_SELECTOR, dev.OPERATOR_NAMESPACE)
        cp.kubectl("delete", "pod", old["metadata"]["name"], "-n", dev.OPERATOR_NAMESPACE, "--wait=false")
        restarted = time.monotonic()
        wait_for(lambda: [p for p in e2e.items(cp, "pods", e2e.OPERATOR_SELECTOR, dev.OPERATOR_NAMESPACE)
                          if e2e.is_ready(p) and p["metadata"]["uid"] != old["metadata"]["uid"]],
                 timeout=120, what="the new operator pod ready")
        up = time.monotonic()
        wait_for(lambda: e2e.deployment_replicas(cp, KEYED) == 0, timeout=120, interval=0.5,
                 what="the autoscaler to scale to zero")
        zero = time.monotonic()
    finally:
        watch.stop()
    print(f"\nnew operator ready {up - restarted:.1f}s after the delete; zero {zero - idle:.1f}s after the load "
          f"stopped, {zero - up:.1f}s after the new operator was ready")
    seen = watch.since(restarted)
    counts = [n for i, n in enumerate(seen) if i == 0 or n != seen[i - 1]]
    assert counts == [1, 0], counts
    delay = e2e.AUTOSCALING["scaleDownDelaySeconds"]
    assert zero - idle >= delay - 2
    status = e2e.get(cp, "modelendpoint", KEYED)["status"]["autoscaling"]
    assert "scaled 1 -> 0" in status["message"] and "idle for" in status["message"]


def test_a_request_without_a_valid_key_wakes_nothing(system):
    cp, url = system.cp, system.gateway_url
    wait_for(lambda: not e2e.runtime_pods(cp, KEYED, ready_only=False), timeout=90, what="the keyed pod gone")
    # Scaled to zero, it is still listed (it wakes on demand), for its key only.
    assert KEYED_SERVED in listed(url, system.key) and KEYED_SERVED not in listed(url)
    wakes = e2e.gateway_metric(cp, "modelendpoint_gateway_wakes_total", model=KEYED_SERVED)
    for key in (None, "sk-wrong", system.old_key):
        r = post_chat(url, KEYED_SERVED, key, stream=True)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    # Watched for longer than the gateway's annotation write and two autoscaler periods.
    until = time.monotonic() + 6
    while time.monotonic() < until:
        assert not e2e.held_annotations(cp, KEYED)
        assert e2e.deployment_replicas(cp, KEYED) == 0
        time.sleep(0.5)
    assert e2e.gateway_metric(cp, "modelendpoint_gateway_wakes_total", model=KEYED_SERVED) == wakes


def test_concurrent_requests_wake_the_model_from_zero_and_all_succeed(system):
    """Four requests at once for the model at zero (Python SDK streaming and not, a raw SSE
    stream, the JS SDK streaming): one replica starts at once, the streams get `: waiting
    for the model` while held, and every request succeeds once it is up."""
    cp, url, key = system.cp, system.gateway_url, system.key
    results: dict[str, object] = {}

    def py_plain():
        r = e2e.sdk(url, key).chat.completions.create(model=KEYED_SERVED, messages=MSG, max_tokens=8)
        results["plain"] = (r.model, r.choices[0].message.role, r.choices[0].message.content)

    def py_stream():
        chunks = list(e2e.sdk(url, key).chat.completions.create(model=KEYED_SERVED, messages=MSG, max_tokens=8,
                                                                stream=True))
        results["stream"] = (chunks[0].choices[0].delta.role,
                             "".join(c.choices[0].delta.content or "" for c in chunks if c.choices))

    def raw():
        results["raw"] = e2e.raw_stream(f"{url}/chat/completions",
                                        {"model": KEYED_SERVED, "messages": MSG, "max_tokens": 8}, key)

    def js():
        results["js"] = run_js(url, [{"model": KEYED_SERVED, "key": key}], WAKE_ONLY="1")

    errors: dict[str, BaseException] = {}

    def guarded(name, fn):
        def run():
            try:
                fn()
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors[name] = exc
        return threading.Thread(target=run, daemon=True)

    threads = [guarded(n, f) for n, f in (("plain", py_plain), ("stream", py_stream), ("raw", raw), ("js", js))]
    sent = time.monotonic()
    for t in threads:
        t.start()
    wait_for(lambda: e2e.deployment_replicas(cp, KEYED) == 1, timeout=30, interval=0.2,
             what="the autoscaler to wake one replica")
    woke = time.monotonic() - sent
    held = wait_for(lambda: e2e.held_annotations(cp, KEYED), timeout=10, what="the gateways' held annotations")
    assert sum(json.loads(v)["held"] for v in held.values()) >= 1
    for t in threads:
        t.join(600)
    up = time.monotonic() - sent
    print(f"\none replica asked for {woke:.1f}s after the requests; all answered {up:.0f}s after")
    assert not errors, errors
    assert results["plain"][:2] == (KEYED_SERVED, KEYED_ROLE) and results["plain"][2].strip()
    assert results["stream"][0] == KEYED_ROLE and results["stream"][1].strip()
    status, lines, headers = results["raw"]
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    first_data = next(i for i, line in enumerate(lines) if line.startswith("data:"))
    assert ": waiting for the model" in lines[:first_data], lines[:first_data + 1]
    assert lines[[i for i, line in enumerate(lines) if line.startswith("data:")][-1]] == "data: [DONE]"
    assert results["js"]["stream"]["roles"][:1] == [KEYED_ROLE] and results["js"]["stream"]["text"].strip()
    assert woke <= 5, f"the wake took {woke:.1f}s to reach the Deployment"
    # Four held requests, target 4 per replica: one replica, not two.
    assert e2e.deployment_replicas(cp, KEYED) == 1
    wait_for(lambda: not e2e.held_annotations(cp, KEYED), timeout=30, what="the held annotations removed")


# --- real containers, the rest (issue 15) --------------------------------------------------------


def test_the_rolling_update_finishes_with_no_failed_request(system, background):
    cp = system.cp
    old, new = background.pop("roll_pods")
    wait_for(lambda: [p["metadata"]["uid"] for p in e2e.runtime_pods(cp, OPEN, ready_only=False)]
             == [new["metadata"]["uid"]] and e2e.is_ready(e2e.get(cp, "pod", new["metadata"]["name"])),
             timeout=600, interval=2, what="the rollout to finish (the new pod ready, the old one gone)")
    done = time.monotonic()
    # Requests keep flowing through the new pod alone.
    load = background["roll"]
    wait_for(lambda: len([o for o in load.done(since=done)]) >= 4, timeout=120, what="answers after the roll")
    outcomes = background.pop("roll").stop()
    assert not [o for o in outcomes if o.error], [o for o in outcomes if o.error][:3]
    assert {o.replica for o in outcomes} == {e2e.pod_id(old), e2e.pod_id(new)}
    assert {o.replica for o in outcomes if o.started > done} == {e2e.pod_id(new)}
    e2e.wait_phase_ready(cp, OPEN, 1, timeout=60)


def test_kubectl_delete_drains_in_flight_requests(system):
    """Delete the ModelEndpoint while a long stream and a long non-streamed request are in
    flight through the gateway: preStop, SIGTERM, the runtime's drain; both end normally, and
    the pod and its container are gone within the grace period."""
    cp, stack, url = system.cp, system.stack, system.gateway_url
    [pod] = e2e.runtime_pods(cp, OPEN)
    grace = pod["spec"]["terminationGracePeriodSeconds"]
    results: dict[str, object] = {}
    body = {"model": OPEN_SERVED, "messages": [{"role": "user", "content": "Tell a long story."}],
            "max_tokens": 200, "min_tokens": 200}

    def plain():
        results["plain"] = httpx.post(f"{url}/chat/completions", json=body, timeout=120)

    t = threading.Thread(target=plain, daemon=True)
    with httpx.Client(timeout=120) as h, h.stream("POST", f"{url}/chat/completions",
                                                   json={**body, "stream": True}) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        first = next(line for line in lines if line.startswith("data:"))
        t.start()
        wait_for(lambda: e2e.metric_sum(e2e.scrape(f"http://{pod['status']['podIP']}:{e2e.METRICS_PORT}/metrics"),
                                        "vllm:num_requests_running") >= 2, timeout=30,
                 what="both requests running in the engine")
        cp.kubectl("delete", f"modelendpoint/{OPEN}", "-n", NS, "--wait=false")
        deleted = time.monotonic()
        rest = [line for line in (first, *lines) if line]  # SSE events end with an empty line
    t.join(120)
    chunks = [json.loads(line[6:]) for line in rest if line.startswith("data: {")]
    assert rest[-1] == "data: [DONE]", rest[-3:]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert results["plain"].status_code == 200, results["plain"].text
    assert results["plain"].json()["choices"][0]["finish_reason"] == "length"
    wait_for(lambda: not e2e.get(cp, "pod", pod["metadata"]["name"]), timeout=grace + 30,
             what="the runtime pod to be gone")
    assert time.monotonic() - deleted <= grace + 5
    wait_for(lambda: not e2e.containers_of(stack, {pod["metadata"]["uid"]}), timeout=30,
             what="its container to stop")
    # The gateway forgets it: the name now reaches no pod.
    r = wait_for(lambda: (x := post_chat(url, OPEN_SERVED, None)).status_code == 404 and x, timeout=30,
                 what="the deleted model unknown to the gateway")
    assert r.json()["error"]["code"] == "model_not_found"
