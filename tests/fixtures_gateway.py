"""Gateway test parts: a fake cluster view, fake replicas, the gateway in a thread or as a process.

Fakes only at seams the gateway owns:

- :class:`FakeCluster` plays the API server behind ``discovery.Source`` (list,
  watch, 410), the Secret reader and the annotation writer, so process-level
  tests need no control plane;
- :class:`FakeReplica` is an HTTP server (aiohttp, not the gateway's own
  HTTP code) that answers like a runtime pod: JSON and SSE, with switches
  for 503s, dropped connections, broken streams and slow answers;
- :class:`GatewayThread` runs the real ``main.Service`` (the same object
  the console script runs) on its own event loop, so tests can use the sync
  official SDK against it;
- :class:`GatewayProcess` runs the console script as a subprocess with a
  kubeconfig, as the chart and the full-system tests do;
- :class:`StaticGatewayProcess` runs this file as a script: the real
  supervisor and workers (MEP_GATEWAY_WORKERS), or the one process with the
  compiled data plane, over a FakeCluster loaded from a JSON file before the
  workers fork (no API server, no threads).

Object builders ``mep_obj`` and ``pod_obj`` make ModelEndpoints and pods as
the API server returns them.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime
import itertools
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from localcluster import free_ports
from waiting import wait_for

GATEWAY_BIN = Path(sys.executable).parent / "modelendpoint-gateway"
API_VERSION = "serving.modelendpoint.dev/v1alpha1"
MANAGED = {"app.kubernetes.io/managed-by": "modelendpoint-operator"}

_rv = itertools.count(1)


def _ts(offset_s: float = 0.0) -> str:
    t = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC) + datetime.timedelta(seconds=offset_s)
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


def mep_obj(name: str, namespace: str = "default", served: str | None = None, *, created: float = 0.0,
            phase: str = "Ready", status: dict | None = None, **spec: Any) -> dict:
    """A ModelEndpoint as the API server returns it (served=None: no status yet)."""
    obj: dict[str, Any] = {
        "apiVersion": API_VERSION, "kind": "ModelEndpoint",
        "metadata": {"name": name, "namespace": namespace, "uid": f"uid-{namespace}-{name}",
                     "creationTimestamp": _ts(created), "resourceVersion": str(next(_rv)), "generation": 1},
        "spec": {"model": "some/model", **spec},
    }
    if served is not None:
        obj["status"] = {"servedModelName": served, "phase": phase, **(status or {})}
    return obj


def pod_obj(name: str, namespace: str, endpoint: str, ip: str | None = "127.0.0.1", port: int | None = 8000,
            ready: bool = True, deleting: bool = False) -> dict:
    """A runtime pod of ModelEndpoint ``endpoint`` (the operator's labels, port ``http``)."""
    meta: dict[str, Any] = {"name": name, "namespace": namespace, "uid": f"uid-{namespace}-{name}",
                            "resourceVersion": str(next(_rv)),
                            "labels": {**MANAGED, "serving.modelendpoint.dev/endpoint": endpoint,
                                       "app.kubernetes.io/instance": endpoint,
                                       "app.kubernetes.io/name": "modelendpoint-runtime",
                                       "app.kubernetes.io/component": "model-server"}}
    if deleting:
        meta["deletionTimestamp"] = _ts(10)
    ports = [{"name": "http", "containerPort": port}, {"name": "metrics", "containerPort": 9400}] if port else []
    status: dict[str, Any] = {"phase": "Running",
                              "conditions": [{"type": "Ready", "status": "True" if ready else "False"}]}
    if ip:
        status["podIP"] = ip
    return {"apiVersion": "v1", "kind": "Pod", "metadata": meta,
            "spec": {"containers": [{"name": "runtime", "ports": ports}]}, "status": status}


class FakeCluster:
    """The API server as the gateway sees it: list/watch, Secrets by name, annotation patches.

    Methods are called from the test's thread; the gateway reads through
    ``list``/``watch`` on its own loop. Every change is logged with a
    resourceVersion, so a watch started from a list's version misses nothing
    (as with the real API server).
    """

    def __init__(self) -> None:
        self.objects: dict[str, dict[tuple[str, str], dict]] = {"modelendpoints": {}, "pods": {}}
        self.secrets: dict[tuple[str, str], dict[str, str]] = {}
        self.annotations: list[tuple[str, str, str, str | None]] = []
        self.secret_reads = 0
        self.fail_secrets = False
        self.fail_annotations = False
        self.lists = 0
        self.rv = 1000
        self.log: list[tuple[int, str, str, dict | None]] = []
        self._wakeups: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []
        self._lock = threading.Lock()

    # --- what tests call -------------------------------------------------------------------

    def put(self, obj: dict) -> None:
        resource = "pods" if obj["kind"] == "Pod" else "modelendpoints"
        obj = json.loads(json.dumps(obj))
        key = (obj["metadata"]["namespace"], obj["metadata"]["name"])
        with self._lock:
            self.rv += 1
            obj["metadata"]["resourceVersion"] = str(self.rv)
            kind = "MODIFIED" if key in self.objects[resource] else "ADDED"
            self.objects[resource][key] = obj
            self.log.append((self.rv, resource, kind, obj))
        self._wake()

    def delete(self, kind: str, namespace: str, name: str) -> None:
        resource = "pods" if kind == "Pod" else "modelendpoints"
        with self._lock:
            obj = self.objects[resource].pop((namespace, name), None)
            if obj is None:
                return
            self.rv += 1
            self.log.append((self.rv, resource, "DELETED", obj))
        self._wake()

    def set_secret(self, namespace: str, name: str, data: dict[str, str] | None) -> None:
        with self._lock:
            if data is None:
                self.secrets.pop((namespace, name), None)
            else:
                self.secrets[(namespace, name)] = dict(data)

    def expire_watches(self) -> None:
        """End every open watch with 410 Gone (the gateway must list again)."""
        with self._lock:
            self.rv += 1
            self.log.append((self.rv, "*", "EXPIRE", None))
        self._wake()

    def held_annotations(self, namespace: str, name: str) -> list[tuple[str, str | None]]:
        return [(k, v) for ns, n, k, v in list(self.annotations) if (ns, n) == (namespace, name)]

    # --- the gateway's side (discovery.Source, secret reader, annotate) ---------------------

    async def list(self, resource: str, namespace: str | None) -> tuple[list[dict], str]:
        with self._lock:
            self.lists += 1
            items = [json.loads(json.dumps(o)) for (ns, _), o in self.objects[resource].items()
                     if namespace is None or ns == namespace]
            return items, str(self.rv)

    async def watch(self, resource: str, namespace: str | None, resource_version: str) -> AsyncIterator[
            tuple[str, dict]]:
        from modelendpoint_gateway.discovery import Expired

        pos = int(resource_version)
        wake = asyncio.Event()
        me = (asyncio.get_running_loop(), wake)
        with self._lock:
            self._wakeups.append(me)
        try:
            while True:
                wake.clear()
                with self._lock:
                    entries = [e for e in self.log if e[0] > pos and e[1] in (resource, "*")]
                for rv, _, kind, obj in entries:
                    pos = rv
                    if kind == "EXPIRE":
                        raise Expired("too old resource version")
                    assert obj is not None
                    if namespace is None or obj["metadata"]["namespace"] == namespace:
                        yield kind, json.loads(json.dumps(obj))
                if not entries:
                    await wake.wait()
        finally:
            with self._lock:
                self._wakeups.remove(me)

    async def secret_data(self, namespace: str, name: str) -> dict[str, str] | None:
        self.secret_reads += 1
        if self.fail_secrets:
            raise ConnectionError("the API server is unreachable")
        with self._lock:
            data = self.secrets.get((namespace, name))
        return dict(data) if data is not None else None

    async def annotate(self, namespace: str, name: str, key: str, value: str | None) -> bool:
        if self.fail_annotations:
            raise ConnectionError("the API server is unreachable")
        self.annotations.append((namespace, name, key, value))
        return (namespace, name) in self.objects["modelendpoints"]

    def _wake(self) -> None:
        with self._lock:
            wakeups = list(self._wakeups)
        for loop, event in wakeups:
            with contextlib.suppress(RuntimeError):  # a loop that has just closed
                loop.call_soon_threadsafe(event.set)


class FakeReplica:
    """A runtime pod's HTTP side on loopback (aiohttp), answering like the runtime.

    POST under /v1, /openai/v1 or /v2/*/openai/v1: JSON ``{"served_by": name, "path", "model",
    "authorization"}``, or with ``"stream": true`` SSE chunks (``chunks`` of them,
    ``delay`` apart) each carrying ``served_by`` in ``id``. GET .../models: one model.
    Switches: ``fail_503`` answers that many 503s first; ``close_before`` drops that
    many connections before answering; ``break_after`` cuts streams after N chunks;
    ``hang`` never answers; a POST whose model is in ``unknown_models`` gets the
    runtime's 404 ``model_not_found`` (an adapter this replica has not loaded).
    """

    def __init__(self, name: str, model: str = "m") -> None:
        self.name = name
        self.model = model
        self.port = 0
        self.requests: list[dict[str, Any]] = []
        self.fail_503 = 0
        self.close_before = 0
        self.break_after: int | None = None
        self.hang = False
        self.unknown_models: set[str] = set()
        self.chunks = 3
        self.chunk_padding = 0  # bytes added to each streamed chunk's content
        self.chunks_written = 0
        self.delay = 0.0
        self.in_flight = 0
        self.max_in_flight = 0
        self.gate: threading.Event | None = None  # while set to an unset Event, answers wait for it
        self.loop: asyncio.AbstractEventLoop | None = None
        self._runner = None

    async def _handle(self, request):  # noqa: C901 - one fake, many switches
        from aiohttp import web

        body = await request.read()
        try:
            obj = json.loads(body) if body else {}
        except ValueError:
            obj = {}
        self.requests.append({"method": request.method, "path": request.path_qs, "headers": dict(request.headers),
                              "body": body})
        if self.close_before > 0:
            self.close_before -= 1
            request.transport.abort()
            raise asyncio.CancelledError()
        if isinstance(obj, dict) and isinstance(obj.get("model"), str) and obj["model"] in self.unknown_models:
            return web.json_response({"error": {"message": f"The model `{obj['model']}` does not exist.",
                                                "type": "invalid_request_error", "param": "model",
                                                "code": "model_not_found"}}, status=404)
        if self.fail_503 > 0:
            self.fail_503 -= 1
            return web.json_response({"error": {"message": "The server is at capacity", "type": "server_error",
                                                "param": None, "code": "overloaded"}}, status=503,
                                     headers={"Retry-After": "2"})
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if self.hang:
                await asyncio.sleep(3600)
            if self.gate is not None:
                while not self.gate.is_set():
                    await asyncio.sleep(0.01)
            if request.method == "GET" and request.path.endswith("/models"):
                return web.json_response({"object": "list", "data": [{"id": self.model, "object": "model"}]})
            if isinstance(obj, dict) and obj.get("stream") is True:
                resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
                await resp.prepare(request)
                for i in range(self.chunks):
                    if self.break_after is not None and i >= self.break_after:
                        request.transport.abort()
                        return resp
                    chunk = {"id": f"{self.name}-{i}", "object": "chat.completion.chunk", "created": 1,
                             "model": obj.get("model"),
                             "choices": [{"index": 0, "delta": {"content": f"t{i} " + "p" * self.chunk_padding},
                                          "finish_reason": None}]}
                    await resp.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
                    self.chunks_written += 1
                    if self.delay:
                        await asyncio.sleep(self.delay)
                await resp.write(b"data: [DONE]\n\n")
                await resp.write_eof()
                return resp
            if self.delay:
                await asyncio.sleep(self.delay)
            return web.json_response({
                "id": f"{self.name}-x", "object": "chat.completion", "created": 1,
                "model": obj.get("model") if isinstance(obj, dict) else None, "served_by": self.name,
                "path": request.path_qs, "authorization": request.headers.get("Authorization"),
                "choices": [{"index": 0, "message": {"role": "assistant", "content": f"from {self.name}"},
                             "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}})
        finally:
            self.in_flight -= 1

    def start(self) -> FakeReplica:
        ready = threading.Event()

        def run() -> None:
            from aiohttp import web

            async def main() -> None:
                self.loop = asyncio.get_running_loop()
                app = web.Application(client_max_size=64 * 1024 * 1024)
                app.router.add_route("*", "/{tail:.*}", self._handle)
                self._runner = web.AppRunner(app, access_log=None)
                await self._runner.setup()
                site = web.TCPSite(self._runner, "127.0.0.1", 0)
                await site.start()
                self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
                ready.set()
                self._stopped = asyncio.Event()
                await self._stopped.wait()
                await self._runner.cleanup()

            asyncio.run(main())

        self._thread = threading.Thread(target=run, daemon=True, name=f"fake-replica-{self.name}")
        self._thread.start()
        assert ready.wait(10), "the fake replica did not start"
        return self

    def stop(self) -> None:
        if self.loop is not None:
            self.loop.call_soon_threadsafe(self._stopped.set)
            self._thread.join(10)


# The gateway's data planes (MEP_GATEWAY_DATA_PLANE): the tests of the request path run on each.
DATA_PLANES = ("python", "compiled")


def gateway_env(**overrides: Any) -> dict[str, str]:
    """MEP_GATEWAY_* settings for tests: free ports, short timeouts."""
    port, mport = free_ports(2)
    env = {
        "MEP_GATEWAY_BIND_ADDRESS": "127.0.0.1",
        "MEP_GATEWAY_PORT": str(port),
        "MEP_GATEWAY_METRICS_PORT": str(mport),
        "MEP_GATEWAY_POD_NAME": "gw-test-0",
        "MEP_GATEWAY_LOG_FORMAT": "json",
        "MEP_GATEWAY_REPLICA_HEADER": "true",
    }
    env.update({f"MEP_GATEWAY_{k.upper()}": str(v) for k, v in overrides.items()})
    return env


class GatewayThread:
    """The gateway's Service on its own event loop in a thread, over a FakeCluster."""

    def __init__(self, cluster: FakeCluster, **settings: Any) -> None:
        from modelendpoint_gateway.settings import load_settings

        self.cluster = cluster
        self.env = gateway_env(**settings)
        self.settings = load_settings(self.env)
        self.service: Any = None
        self.loop: asyncio.AbstractEventLoop | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.settings.port}"

    @property
    def base_url(self) -> str:
        return f"{self.url}/openai/v1"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.settings.metrics_port}/metrics"

    def start(self, wait_ready: bool = True) -> GatewayThread:
        from modelendpoint_gateway.main import Service

        started = threading.Event()
        self.error: BaseException | None = None

        def run() -> None:
            import uvloop

            async def main() -> None:
                self.loop = asyncio.get_running_loop()
                self.service = Service(self.settings, self.cluster, self.cluster.secret_data, self.cluster.annotate)
                try:
                    await self.service.start()
                finally:
                    started.set()
                await self.service.stop.wait()
                await self.service.drain()
                await self.service.close()

            try:
                uvloop.run(main())
            except BaseException as exc:  # noqa: BLE001 - reported to the test
                self.error = exc
                started.set()

        self.thread = threading.Thread(target=run, daemon=True, name="gateway")
        self.thread.start()
        assert started.wait(10), "the gateway did not start"
        if self.error:
            raise self.error
        if wait_ready:
            wait_for(lambda: self.get("/readyz")[0] == 200, timeout=10, what="the gateway's /readyz")
        return self

    def call(self, fn, *args):
        """Run ``fn(*args)`` on the gateway's loop and return its result."""
        assert self.loop is not None
        done = threading.Event()
        box: list[Any] = []

        def go() -> None:
            try:
                box.append(fn(*args))
            finally:
                done.set()

        self.loop.call_soon_threadsafe(go)
        assert done.wait(5)
        return box[0] if box else None

    def get(self, path: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
        req = urllib.request.Request(self.url + path, headers=headers or {})
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def metrics(self) -> str:
        with urllib.request.urlopen(self.metrics_url, timeout=10) as r:
            return r.read().decode()

    def stop(self, timeout: float = 30.0) -> None:
        if self.loop is not None and self.service is not None and self.thread.is_alive():
            self.loop.call_soon_threadsafe(self.service.signal)
            self.thread.join(timeout)


def metric_value(text: str, name: str, **labels: str) -> float:
    """A sample of Prometheus text (0 when absent)."""
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    total = 0.0
    for line in text.splitlines():
        if line.startswith("#") or " " not in line:
            continue
        key, value = line.rsplit(" ", 1)
        series, _, rest = key.partition("{")
        if series != name:
            continue
        got = ",".join(sorted(p for p in rest.rstrip("}").split(",") if p)) if rest else ""
        if all(f'{k}="{v}"' in got.split(",") for k, v in labels.items()) or (not labels and not want):
            total += float(value)
    return total


class GatewayProcess:
    """The ``modelendpoint-gateway`` console script as a subprocess, with a kubeconfig."""

    def __init__(self, kube_env: dict[str, str], log_path: Path, **settings: Any) -> None:
        self.env = {k: v for k, v in kube_env.items() if not k.startswith("MEP_GATEWAY_")}
        self.env.update(gateway_env(**settings))
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None

    @property
    def port(self) -> int:
        return int(self.env["MEP_GATEWAY_PORT"])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        return f"{self.url}/openai/v1"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.env['MEP_GATEWAY_METRICS_PORT']}/metrics"

    def start(self, wait_ready: bool = True) -> GatewayProcess:
        assert GATEWAY_BIN.exists(), f"{GATEWAY_BIN} is missing; run `make setup` (installs the gateway package)"
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child keeps it
        self.proc = subprocess.Popen([str(GATEWAY_BIN)], env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()
        if wait_ready:
            wait_for(self.ready, timeout=30, what=f"the gateway's /readyz ({self.log_path})")
        return self

    def ready(self) -> bool:
        if self.proc is None or self.proc.poll() is not None:
            raise RuntimeError(f"the gateway exited; log:\n{self.log_tail()}")
        try:
            with urllib.request.urlopen(self.url + "/readyz", timeout=2) as r:
                return r.status == 200
        except urllib.error.HTTPError:
            return False

    def metrics(self) -> str:
        with urllib.request.urlopen(self.metrics_url, timeout=10) as r:
            return r.read().decode()

    def log_lines(self) -> list[dict]:
        out = []
        for raw in self.log_path.read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                out.append(json.loads(raw))
        return out

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except FileNotFoundError:
            return ""

    def stop(self, timeout: float = 30.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        return self.proc.returncode


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


@pytest.fixture
def fake_cluster() -> FakeCluster:
    return FakeCluster()


@pytest.fixture
def replicas() -> Iterator[list[FakeReplica]]:
    """Start fake replicas with ``replicas.append(FakeReplica(...).start())``; all stop afterwards."""
    started: list[FakeReplica] = []
    yield started
    for r in started:
        r.stop()


@pytest.fixture
def gateway(fake_cluster: FakeCluster) -> Iterator[GatewayThread]:
    gw = GatewayThread(fake_cluster).start()
    try:
        yield gw
    finally:
        gw.stop()


def now_s() -> float:
    return time.monotonic()


# --- on the real control plane ----------------------------------------------------------------------

GATEWAY_NODE = "gateway-test-node"
GATEWAY_NODE_TAINT = {"key": "serving.modelendpoint.dev/gateway-test", "value": "true", "effect": "NoSchedule"}
# The gateway's least-privilege rules (docs/gateway.md; the chart renders the same).
GATEWAY_RULES = [
    {"apiGroups": ["serving.modelendpoint.dev"], "resources": ["modelendpoints"], "verbs": ["list", "watch", "patch"]},
    {"apiGroups": [""], "resources": ["pods"], "verbs": ["list", "watch"]},
    {"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"]},
]


def _utc_now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@pytest.fixture(scope="session")
def gateway_node(control_plane, kubectl) -> Iterator[str]:
    """A Node that nothing runs on, kept alive by a heartbeat (its Lease and Ready condition).

    Runtime pods the tests create are bound to it (``spec.nodeName``) and
    their status is set by the tests, standing in for a kubelet: phase
    Running, pod IP 127.0.0.1, the Ready condition. The node exists so the pod
    garbage collector keeps those pods, and beats so the node controller never
    marks them unready; its taint keeps the scheduler's pods off it.
    """
    kubectl.apply({"apiVersion": "v1", "kind": "Node",
                   "metadata": {"name": GATEWAY_NODE, "labels": {"kubernetes.io/hostname": GATEWAY_NODE}},
                   "spec": {"taints": [GATEWAY_NODE_TAINT]}})
    stop = threading.Event()

    def beat() -> None:
        now = _utc_now()
        kubectl("patch", "node", GATEWAY_NODE, "--subresource=status", "--type=merge", "-p", json.dumps({
            "status": {"conditions": [{"type": "Ready", "status": "True", "reason": "GatewayTestNode",
                                       "message": "heartbeat of the gateway tests", "lastHeartbeatTime": now,
                                       "lastTransitionTime": now}],
                       "capacity": {"cpu": "0", "memory": "0", "pods": "110"},
                       "allocatable": {"cpu": "0", "memory": "0", "pods": "110"}}}))
        kubectl.apply({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                       "metadata": {"name": GATEWAY_NODE, "namespace": "kube-node-lease"},
                       "spec": {"holderIdentity": GATEWAY_NODE, "leaseDurationSeconds": 40, "renewTime": now}})

    beat()

    def loop() -> None:
        while not stop.wait(10):
            with contextlib.suppress(Exception):
                beat()

    t = threading.Thread(target=loop, daemon=True, name="gateway-node-heartbeat")
    t.start()
    try:
        yield GATEWAY_NODE
    finally:
        stop.set()
        t.join(15)
        kubectl("delete", "node", GATEWAY_NODE, "--wait=false", check=False)


def runtime_pod(kubectl, namespace: str, name: str, endpoint: str, port: int, ready: bool = True) -> None:
    """A runtime pod of ModelEndpoint ``endpoint`` on the test node, answering on 127.0.0.1:``port``."""
    labels = {**MANAGED, "serving.modelendpoint.dev/endpoint": endpoint, "app.kubernetes.io/instance": endpoint,
              "app.kubernetes.io/name": "modelendpoint-runtime", "app.kubernetes.io/component": "model-server"}
    kubectl.apply({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": namespace,
                                                                   "labels": labels},
                   "spec": {"nodeName": GATEWAY_NODE, "tolerations": [{**GATEWAY_NODE_TAINT, "operator": "Equal"}],
                            "containers": [{"name": "runtime", "image": "registry.test/modelendpoint-runtime:test",
                                            "ports": [{"name": "http", "containerPort": port},
                                                      {"name": "metrics", "containerPort": 9400}]}]}})
    set_pod_ready(kubectl, namespace, name, ready)


def set_pod_ready(kubectl, namespace: str, name: str, ready: bool) -> None:
    now = _utc_now()[:19] + "Z"
    status = "True" if ready else "False"
    kubectl("patch", "pod", name, "-n", namespace, "--subresource=status", "--type=merge", "-p", json.dumps({
        "status": {"phase": "Running", "podIP": "127.0.0.1", "podIPs": [{"ip": "127.0.0.1"}], "hostIP": "127.0.0.1",
                   "conditions": [{"type": "Ready", "status": status, "lastTransitionTime": now},
                                  {"type": "ContainersReady", "status": status, "lastTransitionTime": now}]}}))


def sa_kubeconfig(control_plane, namespace: str, sa_name: str, path: Path) -> Path:
    """A kubeconfig holding only the ServiceAccount's token (TokenRequest API)."""
    token = control_plane.kubectl("create", "token", sa_name, "-n", namespace, "--duration=7200s").strip()
    admin = json.loads(control_plane.kubeconfig.read_text())
    path.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config",
        "clusters": [{"name": "testbed", "cluster": admin["clusters"][0]["cluster"]}],
        "users": [{"name": sa_name, "user": {"token": token}}],
        "contexts": [{"name": "sa", "context": {"cluster": "testbed", "user": sa_name}}],
        "current-context": "sa"}))
    path.chmod(0o600)
    return path


def gateway_identity(control_plane, kubectl, tmp: Path, name: str, namespaces: list[str] | None = None) -> Path:
    """A ServiceAccount bound to exactly GATEWAY_RULES (cluster-wide, or in ``namespaces``); its kubeconfig."""
    home = "gateway-system"
    kubectl("create", "namespace", home, check=False)
    kubectl.apply({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": name, "namespace": home}})
    subject = [{"kind": "ServiceAccount", "name": name, "namespace": home}]
    if not namespaces:
        kubectl.apply([
            {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole", "metadata": {"name": name},
             "rules": GATEWAY_RULES},
            {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding", "metadata": {"name": name},
             "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": name},
             "subjects": subject}])
    else:
        for ns in namespaces:
            kubectl.apply([
                {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
                 "metadata": {"name": name, "namespace": ns}, "rules": GATEWAY_RULES},
                {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
                 "metadata": {"name": name, "namespace": ns},
                 "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
                 "subjects": subject}])
    return sa_kubeconfig(control_plane, home, name, tmp / f"{name}.kubeconfig")


@pytest.fixture(scope="session")
def gateway_logs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("gateway-logs")


@pytest.fixture(scope="module")
def cluster_gateway(control_plane, kubectl, mep_crds, operator, gateway_node, gateway_logs) -> Iterator[
        GatewayProcess]:
    """The gateway console script, cluster-wide, with only its own ServiceAccount's token, on the
    compiled data plane as the chart runs it (the namespaced-mode and workers tests run the Python one)."""
    kubeconfig = gateway_identity(control_plane, kubectl, gateway_logs, "gateway-clusterwide")
    env = {**control_plane.env(), "KUBECONFIG": str(kubeconfig)}
    gw = GatewayProcess(env, gateway_logs / "gateway-clusterwide.log", pod_name="gw-it-0",
                        data_plane="compiled").start()
    try:
        yield gw
    finally:
        gw.stop()
        print(f"\ngateway log: {gw.log_path}", file=sys.stderr)


# --- several workers over a fixed cluster view (this file run as a script) ---------------------------


class StaticGatewayProcess:
    """The supervisor and its workers in a subprocess, over a fixed FakeCluster (objects and Secrets)."""

    def __init__(self, tmp: Path, objects: list[dict], secrets: dict[str, dict[str, str]] | None = None,
                 **settings: Any) -> None:
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("MEP_GATEWAY_")}
        self.env.update(gateway_env(**settings))
        here = Path(__file__).resolve().parent
        self.env["PYTHONPATH"] = os.pathsep.join([str(here), str(here.parent / "hack")])
        self.view = tmp / "cluster.json"
        self.view.write_text(json.dumps({"objects": objects, "secrets": secrets or {}}))
        self.log_path = tmp / "static-gateway.log"
        self.proc: subprocess.Popen | None = None

    url = GatewayProcess.url
    port = GatewayProcess.port
    log_lines = GatewayProcess.log_lines
    log_tail = GatewayProcess.log_tail
    stop = GatewayProcess.stop

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.env['MEP_GATEWAY_METRICS_PORT']}"

    def start(self) -> StaticGatewayProcess:
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child keeps it
        self.proc = subprocess.Popen([sys.executable, __file__, str(self.view)], env=self.env, stdout=log,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()
        return self


async def _static_serve(settings: Any, role: Any, view: dict) -> int:
    from modelendpoint_gateway.main import Service

    cluster = FakeCluster()
    for obj in view["objects"]:
        cluster.put(obj)
    for ref, data in view["secrets"].items():
        namespace, name = ref.split("/", 1)
        cluster.set_secret(namespace, name, data)
    service = Service(settings, cluster, cluster.secret_data, cluster.annotate, role)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, service.signal)
    await service.start()
    await service.stop.wait()
    await service.drain()
    await service.close()
    return service.exit_status


def _static_main(view_path: str) -> int:
    from modelendpoint_gateway import main, workers
    from modelendpoint_gateway.logs import setup_logging
    from modelendpoint_gateway.settings import load_settings

    settings = load_settings(os.environ)
    setup_logging(settings.log_level, settings.log_format)
    view = json.loads(Path(view_path).read_text())
    if settings.data_plane == "compiled":   # one process (and the data plane), as main._run does
        return main.run_loop(settings, _static_serve(settings, None, view))
    count = workers.worker_count(settings.workers)
    return main.run_workers(settings, count, lambda role: main.run_loop(settings, _static_serve(settings, role,
                                                                                                 view)))


if __name__ == "__main__":
    sys.exit(_static_main(sys.argv[1]))
