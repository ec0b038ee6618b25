"""Parts of the end-to-end tests: the ModelEndpoints they share, reads through kubectl,
the runtime's and the gateway's own metrics, and a load generator built on the official
OpenAI SDK.

Every runtime pod is a real vLLM engine (about two minutes to load, 2.5 GB of RAM), so
the tier creates two ModelEndpoints once, at the start, and every test reuses them:

- ``OPEN`` (the local sample, ``smollm2``, with LoRA on): no key, two replicas
  (``kubectl scale``): routing, balancing, prefix affinity, a LoRA adapter added and
  removed live, a replica killed under load, a rolling update and the drain on delete;
- ``KEYED`` (``keyed``): an ``apiKeySecretRef`` and ``spec.autoscaling`` (1..2 replicas):
  keys at the gateway and at the pods, their rotation, scaling up and down, the operator
  restarted mid-cycle, scale to zero and the wake.

Each has its own served name and ``responseRole``, so an answer says which one served it.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import yaml
from openai import OpenAI

import dev
from modelendpoint_operator import constants
from node import models as node_models
from node import stack as node_stack

NS = dev.SAMPLE_NAMESPACE  # the namespace of the embedded model's cache volume (local-model-cache)
METRICS_PORT = 9400  # the runtime's metrics port (no key); the Service does not expose it
GATEWAY_PORT = 8080  # the gateway container's API port
GATEWAY_METRICS_PORT = 9090
GATEWAY_SELECTOR = "app.kubernetes.io/name=modelendpoint-gateway"
OPERATOR_SELECTOR = "app.kubernetes.io/name=modelendpoint-operator,app.kubernetes.io/component=operator"
HELD_PREFIX = "held.gateway.serving.modelendpoint.dev/"
REPLICA_HEADER = "x-modelendpoint-replica"

OPEN = "smollm2"
OPEN_ROLE = "model"
KEYED = "keyed"
KEYED_SERVED = "smollm2-keyed"
KEYED_ROLE = "keyed-model"
KEYED_SECRET = "keyed-keys"
# Small requests: two engines per core must fit (the sample asks for 500m and 2Gi).
SMALL = {"requests": {"cpu": "100m", "memory": "1Gi"}, "limits": {"memory": "6Gi"}}
# The KV cache these tests need (eight sequences of a 2,048-token context of SmolLM2-135M take
# about 380 MB), instead of the sample's 1 GiB: four engines at once must fit beside the rest.
KV_CACHE = ["--kv-cache-memory-bytes", str(256 * 2**20)]
# The keyed model's drain: a replica the autoscaler removes finishes its streams first. On two
# cores shared by four engines (one of them loading) a 48-token stream has taken 75 s, more than
# the default 30 s drain; the drain ends as soon as nothing is in flight.
KEYED_DRAIN_S = 300
# targetRequests 4: a wake by four held requests asks for one replica, six in flight for two.
AUTOSCALING = {"minReplicas": 1, "maxReplicas": 2, "targetRequests": 4, "scaleDownDelaySeconds": 20}


def _small(spec: dict) -> dict:
    """The sample's engine and env with a smaller KV cache, and small resource requests."""
    spec["env"] = [e for e in spec["env"] if e["name"] != "VLLM_CPU_KVCACHE_SPACE"]  # it would win over KV_CACHE
    spec["engine"] = {**spec["engine"], "extraArgs": KV_CACHE}
    spec["resources"] = SMALL
    return spec


def open_endpoint() -> dict:
    """The local sample as `make dev` applies it, with its own role and a small footprint."""
    obj = yaml.safe_load(dev.SAMPLE.read_text())
    assert obj["metadata"]["name"] == OPEN
    obj["metadata"]["namespace"] = NS
    obj["spec"]["responseRole"] = OPEN_ROLE
    # LoRA on from the start (an empty list), so that adding an adapter later loads it
    # into the running engines; the field's first appearance would roll the pods.
    obj["spec"]["adapters"] = []
    _small(obj["spec"])
    return obj


def keyed_endpoint() -> dict:
    """A keyed, autoscaled ModelEndpoint of the same embedded model under another served name."""
    sample = yaml.safe_load(dev.SAMPLE.read_text())["spec"]
    spec = _small({k: sample[k] for k in ("model", "gpus", "engine", "modelCache", "env", "shmSize")})
    spec.update(servedModelName=KEYED_SERVED, responseRole=KEYED_ROLE,
                apiKeySecretRef={"name": KEYED_SECRET, "key": "keys"}, autoscaling=dict(AUTOSCALING),
                drainTimeoutSeconds=KEYED_DRAIN_S)
    return {"apiVersion": "serving.modelendpoint.dev/v1alpha1", "kind": "ModelEndpoint",
            "metadata": {"name": KEYED, "namespace": NS}, "spec": spec}


def new_key(label: str) -> str:
    return f"sk-{label}-{secrets.token_hex(12)}"


def key_secret(keys: str) -> dict:
    return {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": KEYED_SECRET, "namespace": NS},
            "type": "Opaque", "data": {"keys": base64.b64encode(keys.encode()).decode()}}


def node_adapter_dir(name: str) -> Path:
    """Where a test writes a LoRA adapter on the node: the model-cache volume's adapters/ folder."""
    return node_stack.model_cache_dir() / "adapters" / name


def pod_adapter_path(name: str) -> str:
    """That adapter's folder as the runtime pods see it (the volume is mounted at HF_HOME)."""
    return f"{constants.HF_HOME}/adapters/{name}"


def readable_by_the_runtime(path: Path) -> Path:
    """Files under ``path`` made readable by the runtime's uid, as models.prepare does for the model."""
    for p in [path, *path.rglob("*")]:
        os.chown(p, node_models.RUNTIME_UID, node_models.RUNTIME_UID)
        p.chmod(0o755 if p.is_dir() else 0o644)
    return path


# --- reads -------------------------------------------------------------------------------


def get(cp, kind: str, name: str, ns: str = NS) -> dict | None:
    out = cp.kubectl("get", kind, name, "-n", ns, "-o", "json", "--ignore-not-found")
    return json.loads(out) if out.strip() else None


def items(cp, kind: str, selector: str, ns: str = NS) -> list[dict]:
    return json.loads(cp.kubectl("get", kind, "-n", ns, "-l", selector, "-o", "json"))["items"]


def apply(cp, obj: dict) -> None:
    cp.kubectl("apply", "--server-side", "--force-conflicts", "-f", "-", input=json.dumps(obj))


def merge_patch(cp, kind: str, name: str, patch: dict, ns: str = NS) -> None:
    cp.kubectl("patch", kind, name, "-n", ns, "--type=merge", "-p", json.dumps(patch))


def is_ready(pod: dict) -> bool:
    return (not pod["metadata"].get("deletionTimestamp") and bool(pod["status"].get("podIP"))
            and any(c["type"] == "Ready" and c["status"] == "True" for c in pod["status"].get("conditions", [])))


def runtime_pods(cp, endpoint: str, ready_only: bool = True) -> list[dict]:
    pods = items(cp, "pods", f"serving.modelendpoint.dev/endpoint={endpoint}")
    return [p for p in pods if is_ready(p)] if ready_only else pods


def deployment_replicas(cp, endpoint: str) -> int | None:
    dep = get(cp, "deployment", endpoint)
    return None if dep is None else dep["spec"].get("replicas")


def wait_phase_ready(cp, name: str, replicas: int, timeout: float, check_alive=lambda: None) -> dict:
    """The ModelEndpoint once Ready with ``replicas`` ready replicas; a progress line (phase,
    pods) every 15 s, and a dead node ends the wait at once."""
    from waiting import wait_for

    deadline = time.monotonic() + timeout
    dev.wait_ready(cp, name, NS, timeout=timeout, check_alive=check_alive)

    def probe():
        check_alive()
        obj = get(cp, "modelendpoint", name) or {}
        status = obj.get("status", {})
        return status.get("phase") == "Ready" and status.get("readyReplicas") == replicas and obj

    return wait_for(probe, timeout=max(1.0, deadline - time.monotonic()), interval=2,
                    what=f"{NS}/{name} Ready with {replicas} replica(s)")


def gateway_pods(cp) -> list[dict]:
    return [p for p in items(cp, "pods", GATEWAY_SELECTOR, dev.OPERATOR_NAMESPACE) if is_ready(p)]


def pod_id(pod: dict) -> str:
    """A pod as the gateway's replica header names it."""
    return f"{pod['metadata']['namespace']}/{pod['metadata']['name']}"


def metric_sum(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` (with these label values) in Prometheus text."""
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name) or line.startswith("#"):
            continue
        series, _, value = line.rpartition(" ")
        if series != name and not series.startswith(name + "{"):
            continue
        if all(f'{k}="{v}"' in series for k, v in labels.items()):
            total += float(value)
    return total


def scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as r:
        return r.read().decode()


def chat_requests_served(pod: dict) -> float:
    """Chat completions a runtime pod answered with 200, from its own metrics port (no key)."""
    text = scrape(f"http://{pod['status']['podIP']}:{METRICS_PORT}/metrics")
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("modelendpoint_requests_total{") and "chat/completions" in line
               and 'status="200"' in line)


def gateway_metric(cp, name: str, **labels: str) -> float:
    """A gateway metric summed over every gateway pod (their metrics port)."""
    return sum(metric_sum(scrape(f"http://{p['status']['podIP']}:{GATEWAY_METRICS_PORT}/metrics"), name, **labels)
               for p in gateway_pods(cp))


def held_annotations(cp, name: str) -> dict[str, str]:
    ann = ((get(cp, "modelendpoint", name) or {}).get("metadata") or {}).get("annotations") or {}
    return {k: v for k, v in ann.items() if k.startswith(HELD_PREFIX)}


def containers_of(stack, pod_uids: set[str]) -> list[dict]:
    """The node's running containers (crictl) that belong to one of these pods."""
    out = json.loads(stack.nodes.node.crictl("ps", "-o", "json"))
    return [c for c in out.get("containers", []) if c.get("labels", {}).get("io.kubernetes.pod.uid") in pod_uids]


def container_pid(stack, pod: dict) -> int:
    """The host PID of a runtime pod's main process (the container's PID 1)."""
    [c] = [c for c in containers_of(stack, {pod["metadata"]["uid"]})
           if c["metadata"]["name"] == "runtime"]
    info = json.loads(stack.nodes.node.crictl("inspect", c["id"]))
    return int(info["info"]["pid"])


class DeploymentWatch:
    """Every change of a Deployment's replica counts, from `kubectl get -w` (no polling)."""

    def __init__(self, cp, name: str) -> None:
        import subprocess

        self.changes: list[tuple[float, int, int]] = []  # (monotonic time, spec.replicas, readyReplicas)
        self._proc = subprocess.Popen(
            [str(cp.bin_dir / "kubectl"), f"--kubeconfig={cp.kubeconfig}", "get", "deployment", name, "-n", NS,
             "-w", "-o", "jsonpath={.spec.replicas} {.status.readyReplicas}{\"\\n\"}"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self._proc.stdout is not None
        for line in self._proc.stdout:
            want, _, ready = line.strip().partition(" ")
            if want:
                self.changes.append((time.monotonic(), int(want), int(ready or 0)))

    def since(self, t: float) -> list[int]:
        """The replica counts asked for after ``t`` (the one in force at ``t`` first)."""
        before = [w for at, w, _ in self.changes if at <= t]
        return before[-1:] + [w for at, w, _ in self.changes if at > t]

    def stop(self) -> None:
        self._proc.terminate()
        self._proc.wait(10)


# --- clients -----------------------------------------------------------------------------


def sdk(base_url: str, key: str = "unused", timeout: float = 600) -> OpenAI:
    """The official SDK without its own retries: a failure must show, not be retried away."""
    return OpenAI(base_url=base_url, api_key=key, max_retries=0, timeout=timeout)


@dataclass
class Outcome:
    stream: bool
    started: float
    ended: float = 0.0
    first_byte: float | None = None  # streams: when the answer's head arrived
    replica: str | None = None
    text: str = ""
    finish: str | None = None
    error: str | None = None


@dataclass
class Load:
    """Requests kept in flight through the official SDK, each one's outcome recorded.

    ``concurrency`` workers each send one request after another (streaming and not, in
    turn); ``set_concurrency`` parks or wakes workers, ``stop`` waits for the last answers.
    """

    base_url: str
    model: str
    key: str = "unused"
    max_tokens: int = 64
    min_tokens: int = 0
    prompt: Callable[[int], list[dict]] = lambda i: [{"role": "user", "content": f"Tell me a story, number {i}."}]
    outcomes: list[Outcome] = field(default_factory=list)
    _threads: list[threading.Thread] = field(default_factory=list)
    _active: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _seq: int = 0

    def start(self, concurrency: int) -> Load:
        self.set_concurrency(concurrency)
        return self

    def set_concurrency(self, n: int) -> None:
        self._active = n
        while len(self._threads) < n:
            t = threading.Thread(target=self._worker, args=(len(self._threads),), daemon=True)
            self._threads.append(t)
            t.start()

    def stop(self, timeout: float = 600) -> list[Outcome]:
        self._stop.set()
        for t in self._threads:
            t.join(timeout)
        assert not any(t.is_alive() for t in self._threads), "a request of the load never ended"
        return self.outcomes

    def failures(self) -> list[Outcome]:
        return [o for o in list(self.outcomes) if o.error is not None]

    def done(self, since: float = 0.0) -> list[Outcome]:
        return [o for o in list(self.outcomes) if o.ended and o.started >= since]

    def _worker(self, index: int) -> None:
        client = sdk(self.base_url, self.key)
        turn = index
        while not self._stop.is_set():
            if index >= self._active:
                time.sleep(0.2)
                continue
            with self._lock:
                self._seq += 1
                seq = self._seq
            turn += 1
            self.outcomes.append(self.one(client, seq, stream=turn % 2 == 0))

    def one(self, client: OpenAI, seq: int, stream: bool) -> Outcome:
        out = Outcome(stream=stream, started=time.monotonic())
        extra = {"min_tokens": self.min_tokens} if self.min_tokens else None
        try:
            if stream:
                with client.chat.completions.with_streaming_response.create(
                        model=self.model, messages=self.prompt(seq), max_tokens=self.max_tokens, stream=True,
                        extra_body=extra) as r:
                    out.first_byte = time.monotonic()
                    out.replica = r.headers.get(REPLICA_HEADER)
                    for chunk in r.parse():
                        if chunk.choices:
                            out.text += chunk.choices[0].delta.content or ""
                            out.finish = chunk.choices[0].finish_reason or out.finish
            else:
                raw = client.chat.completions.with_raw_response.create(
                    model=self.model, messages=self.prompt(seq), max_tokens=self.max_tokens, extra_body=extra)
                out.replica = raw.headers.get(REPLICA_HEADER)
                reply = raw.parse()
                out.text, out.finish = reply.choices[0].message.content or "", reply.choices[0].finish_reason
            if out.finish not in ("length", "stop"):
                out.error = f"ended without a finish reason ({out.finish!r})"
        except Exception as exc:  # noqa: BLE001 - every failure is recorded and asserted on
            out.error = f"{type(exc).__name__}: {exc}"
        out.ended = time.monotonic()
        return out


def raw_stream(url: str, body: dict, key: str | None, timeout: float = 600) -> tuple[int, list[str], dict]:
    """A streamed request read line by line with httpx (the SDKs hide SSE comment lines)."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    with httpx.Client(timeout=timeout) as h, h.stream("POST", url, json={**body, "stream": True},
                                                       headers=headers) as r:
        return r.status_code, list(r.iter_lines()), dict(r.headers)


JS_DIR = Path(__file__).resolve().parent
