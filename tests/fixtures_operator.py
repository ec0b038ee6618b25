"""Operator fixtures: the CRDs installed on the test control plane, the operator
running as in production (a subprocess of the ``modelendpoint-operator`` console
script with KUBECONFIG), per-test namespaces, and helpers that wait for a
ModelEndpoint's phase (with tests/waiting.py's ``wait_for``).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from localcluster import free_ports
from waiting import wait_for

REPO_DIR = Path(__file__).resolve().parent.parent
CRD_FILE = REPO_DIR / "crds" / "modelendpoints.yaml"
OPERATOR_BIN = Path(sys.executable).parent / "modelendpoint-operator"
API_VERSION = "serving.modelendpoint.dev/v1alpha1"


class Kubectl:
    """kubectl against the test cluster, with JSON helpers."""

    def __init__(self, control_plane) -> None:
        self.cp = control_plane

    def __call__(self, *args: str, input: str | None = None, check: bool = True) -> str:
        return self.cp.kubectl(*args, input=input, check=check)

    def run(self, *args: str, input: str | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(self.cp.bin_dir / "kubectl"), f"--kubeconfig={self.cp.kubeconfig}", *args],
            input=input, capture_output=True, text=True,
        )

    def get(self, kind: str, name: str, namespace: str | None = None) -> dict | None:
        args = ["get", kind, name, "-o", "json", "--ignore-not-found"]
        if namespace:
            args += ["-n", namespace]
        out = self(*args)
        return json.loads(out) if out.strip() else None

    def list(self, kind: str, namespace: str, selector: str | None = None) -> list[dict]:
        args = ["get", kind, "-n", namespace, "-o", "json"]
        if selector:
            args += ["-l", selector]
        return json.loads(self(*args))["items"]

    def apply(self, obj: dict | list[dict], *extra: str) -> str:
        items = obj if isinstance(obj, list) else [obj]
        doc = {"apiVersion": "v1", "kind": "List", "items": items}
        return self("apply", "--server-side", "--field-manager=test", "-f", "-", *extra,
                    input=json.dumps(doc))


class OperatorProcess:
    """The operator's console script as a subprocess, configured like the chart does."""

    def __init__(self, control_plane, log_dir: Path, name: str, priority: int,
                 extra_env: dict[str, str] | None = None) -> None:
        self.cp = control_plane
        self.log_path = log_dir / f"{name}.log"
        self.name = name
        self.priority = priority
        self.extra_env = dict(extra_env or {})
        self.proc: subprocess.Popen | None = None
        self.metrics_port = 0
        self.liveness_port = 0

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in self.cp.env().items() if not k.startswith("MEP_OPERATOR_")}
        env.update({
            "MEP_OPERATOR_DEFAULT_RUNTIME_IMAGE": "registry.test/modelendpoint-runtime:test",
            "MEP_OPERATOR_METRICS_PORT": str(self.metrics_port),
            "MEP_OPERATOR_LIVENESS_PORT": str(self.liveness_port),
            "MEP_OPERATOR_BIND_ADDRESS": "127.0.0.1",
            "MEP_OPERATOR_PEERING_PRIORITY": str(self.priority),
            "MEP_OPERATOR_LOG_LEVEL": "info",
            "MEP_OPERATOR_LOG_FORMAT": "json",
            **self.extra_env,
        })
        return env

    def start(self, *, wait_ready: bool = True) -> OperatorProcess:
        assert OPERATOR_BIN.exists(), (
            f"{OPERATOR_BIN} is missing; run `make setup` (installs the operator package)")
        self.metrics_port, self.liveness_port = free_ports(2)
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([str(OPERATOR_BIN)], env=self.env(), stdout=log,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     start_new_session=True)
        log.close()
        if wait_ready:
            wait_for(self.live, timeout=60,
                     what=f"operator {self.name}'s /healthz to answer 200 ({self.log_path})")
        return self

    def live(self) -> bool:
        if self.proc is None or self.proc.poll() is not None:
            raise RuntimeError(f"operator {self.name} exited; log:\n{self.log_tail()}")
        with urllib.request.urlopen(f"http://127.0.0.1:{self.liveness_port}/healthz", timeout=2) as r:
            return r.status == 200

    def metrics(self) -> dict[str, float]:
        """Samples of the operator's own metrics: 'name{labels}' -> value."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as r:
            text = r.read().decode()
        out = {}
        for line in text.splitlines():
            if line.startswith("modelendpoint_operator_") and " " in line:
                key, value = line.rsplit(" ", 1)
                out[key] = float(value)
        return out

    def stop(self, timeout: float = 30.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)

    def kill(self) -> None:
        """SIGKILL: no cleanup at all, as when a node dies."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)

    def restart(self) -> None:
        # A new process gets a new peering identity; with the old one's entry still
        # "alive" (lifetime 60 s), an equal priority would pause both (kopf's rule),
        # so the replacement takes a higher one, as a random priority does half the time.
        self.priority += 1
        self.start()

    def log_lines(self) -> list[dict]:
        lines = []
        for raw in self.log_path.read_text(errors="replace").splitlines():
            try:
                lines.append(json.loads(raw))
            except ValueError:
                lines.append({"message": raw})
        return lines

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except FileNotFoundError:
            return ""


@pytest.fixture(scope="session")
def kubectl(control_plane) -> Kubectl:
    return Kubectl(control_plane)


@pytest.fixture(scope="session")
def mep_crds(control_plane, kubectl: Kubectl) -> None:
    """The ModelEndpoint CRD and kopf's peering CRDs (crds/), established."""
    kubectl("apply", "--server-side", "-f", str(CRD_FILE.parent))
    for crd in ("modelendpoints.serving.modelendpoint.dev", "clusterkopfpeerings.kopf.dev",
                "kopfpeerings.kopf.dev"):
        kubectl("wait", "--for=condition=Established", "--timeout=60s", f"crd/{crd}")


@pytest.fixture(scope="session")
def operator_logs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("operator-logs")


@pytest.fixture(scope="session")
def operator(control_plane, mep_crds, operator_logs: Path) -> Iterator[OperatorProcess]:
    """The operator, running cluster-wide for the whole session."""
    op = OperatorProcess(control_plane, operator_logs, "operator", priority=100).start()
    try:
        yield op
    finally:
        op.stop()
        # The log stays in the session's temporary folder; print where for failures.
        print(f"\noperator log: {op.log_path}", file=sys.stderr)


@pytest.fixture
def namespace(kubectl: Kubectl, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh namespace per test, deleted (without waiting) afterwards."""
    name = f"t-{uuid.uuid4().hex[:8]}"
    kubectl("create", "namespace", name)
    wait_for(lambda: kubectl.get("serviceaccount", "default", name), timeout=30,
             what=f"the default ServiceAccount of namespace {name} to exist")
    yield name
    kubectl("delete", "namespace", name, "--wait=false", check=False)


def mep(name: str, namespace: str, **spec: Any) -> dict:
    """A ModelEndpoint manifest."""
    return {"apiVersion": API_VERSION, "kind": "ModelEndpoint",
            "metadata": {"name": name, "namespace": namespace}, "spec": spec}


def wait_phase(kubectl: Kubectl, namespace: str, name: str, phase: str,
               timeout: float = 60.0, generation: int | None = None) -> dict:
    """Wait until the ModelEndpoint's status has ``phase`` (for ``generation`` if given).

    On timeout the error names the last status seen (phase, generation, message).
    """

    def check() -> dict:
        obj = kubectl.get("mep", name, namespace)
        if obj is None:
            raise LookupError(f"ModelEndpoint {namespace}/{name} does not exist")
        status = obj.get("status") or {}
        gen = generation if generation is not None else obj["metadata"]["generation"]
        if status.get("phase") == phase and status.get("observedGeneration") == gen:
            return obj
        # Not yet: what is there instead is what wait_for reports on timeout.
        raise AssertionError(f"status.phase {status.get('phase')!r} for generation "
                             f"{status.get('observedGeneration')} (want {gen}): "
                             f"{status.get('message')!r}")

    return wait_for(check, timeout=timeout,
                    what=f"ModelEndpoint {namespace}/{name} to reach phase {phase}")


def children_versions(kubectl: Kubectl, namespace: str, name: str) -> dict[str, str]:
    """kind/name -> resourceVersion of every child labelled for ModelEndpoint ``name``."""
    out = {}
    for kind in ("deployment", "service", "ingress", "pvc"):
        for obj in kubectl.list(kind, namespace, f"serving.modelendpoint.dev/endpoint={name}"):
            out[f"{obj['kind']}/{obj['metadata']['name']}"] = obj["metadata"]["resourceVersion"]
    return out


def operator_writes(kubectl: Kubectl, namespace: str, name: str) -> dict[str, tuple]:
    """What the operator's writes left on each child of ModelEndpoint ``name``.

    Services and Ingresses: their resourceVersion (nothing else writes them). The
    Deployment's and PVC's resourceVersion also move with their status (the
    controllers', kwok's), so for them: the spec generation and the time of the
    operator's own managedFields entry, which a server-side apply changes only when
    it changes something.
    """
    out = {}
    for kind in ("deployment", "service", "ingress", "pvc"):
        for obj in kubectl.list(kind, namespace, f"serving.modelendpoint.dev/endpoint={name}"):
            meta = obj["metadata"]
            key = f"{obj['kind']}/{meta['name']}"
            if obj["kind"] in ("Service", "Ingress"):
                out[key] = (meta["resourceVersion"],)
            else:
                ours = [f.get("time") for f in meta.get("managedFields", [])
                        if f.get("manager") == "modelendpoint-operator"]
                out[key] = (meta.get("generation"), tuple(ours))
    return out
