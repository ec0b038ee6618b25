"""The local node (hack/localnode.py) at its API seam, with no cluster.

A fake CoreV1Api stands in for the API server: it holds Secrets, ConfigMaps
and pods, answers TokenRequests and records every write, so the tests see
exactly what the runner would read and send.
"""

from __future__ import annotations

import base64
import json
import os
import stat
import subprocess
import time
from types import SimpleNamespace

import pytest
from kubernetes import client
from kubernetes.client.rest import ApiException

import localnode
from localnode import LocalNode, LocalPod
from waiting import wait_for


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


class FakeCore:
    """The parts of CoreV1Api the local node calls."""

    def __init__(self, secrets=None, configmaps=None, pods=None):
        self.secrets = secrets or {}
        self.configmaps = configmaps or {}
        self.pods = pods or []
        self.token_requests: list[tuple[str, str, dict]] = []
        self.status_patches: list[tuple[str, str, dict]] = []
        self.deleted: list[tuple[str, str]] = []

    @staticmethod
    def _read(store, name, ns):
        if (ns, name) not in store:
            raise ApiException(status=404, reason="Not Found")
        return SimpleNamespace(data=store[(ns, name)])

    def read_namespaced_secret(self, name, ns):
        return self._read(self.secrets, name, ns)

    def read_namespaced_config_map(self, name, ns):
        return self._read(self.configmaps, name, ns)

    def create_namespaced_service_account_token(self, sa, ns, body):
        self.token_requests.append((sa, ns, body))
        return SimpleNamespace(status=SimpleNamespace(token=f"token-of-{ns}-{sa}"))

    def list_pod_for_all_namespaces(self, field_selector):
        assert field_selector == f"spec.nodeName={localnode.NODE_NAME}"
        return SimpleNamespace(items=list(self.pods))

    def patch_namespaced_pod_status(self, name, ns, body):
        self.status_patches.append((name, ns, body))
        for pod in self.pods:
            if pod["metadata"]["name"] == name and pod["metadata"]["namespace"] == ns:
                pod["status"] = json.loads(json.dumps(body["status"]))

    def delete_namespaced_pod(self, name, ns, grace_period_seconds):
        assert grace_period_seconds == 0
        self.deleted.append((ns, name))
        self.pods = [p for p in self.pods if p["metadata"]["name"] != name]


def _node(tmp_path, core, clock=time.monotonic) -> LocalNode:
    return LocalNode({}, tmp_path, tmp_path / "hf", {}, core=core, coordination=object(), clock=clock)


def _pod(name="p1", uid="u1", ns="default", **spec) -> dict:
    return {"metadata": {"name": name, "namespace": ns, "uid": uid},
            "spec": {"containers": [{"name": "runtime", "image": "ghcr.io/x/runtime:1"}], **spec},
            "status": {}}


def _local(pod: dict, ip="127.0.1.9", process=None) -> LocalPod:
    m = pod["metadata"]
    return LocalPod(m["uid"], m["namespace"], m["name"], ip, process=process)


# --- environment ---------------------------------------------------------------


def test_pod_env_resolves_values_refs_and_fields(tmp_path):
    core = FakeCore(
        secrets={("default", "keys"): {"api-key": _b64("sk-é1,sk-2")}},
        configmaps={("default", "settings"): {"level": "debug"}},
    )
    pod = _pod(serviceAccountName="runner")
    container = {"env": [
        {"name": "PORT", "value": "8000"},
        {"name": "URL", "value": "http://$(POD_IP):$(PORT)/$(UNKNOWN)"},
        {"name": "API_KEY", "valueFrom": {"secretKeyRef": {"name": "keys", "key": "api-key"}}},
        {"name": "LOG_LEVEL", "valueFrom": {"configMapKeyRef": {"name": "settings", "key": "level"}}},
        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "SA", "valueFrom": {"fieldRef": {"fieldPath": "spec.serviceAccountName"}}},
        {"name": "NODE", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
    ]}
    env = _node(tmp_path, core).pod_env(pod, container, _local(pod))
    assert env == {
        "PORT": "8000",
        "URL": "http://$(POD_IP):8000/$(UNKNOWN)",  # only variables defined before expand
        "API_KEY": "sk-é1,sk-2",  # base64-decoded, UTF-8
        "LOG_LEVEL": "debug",
        "POD_NAME": "p1",
        "SA": "runner",
        "NODE": localnode.NODE_NAME,
    }


def test_optional_refs_leave_the_variable_unset(tmp_path):
    core = FakeCore(secrets={("default", "keys"): {"other": _b64("x")}},
                    configmaps={("default", "settings"): {}})
    container = {"env": [
        {"name": "NO_SECRET", "valueFrom": {"secretKeyRef": {"name": "absent", "key": "k", "optional": True}}},
        {"name": "NO_KEY", "valueFrom": {"secretKeyRef": {"name": "keys", "key": "k", "optional": True}}},
        {"name": "NO_CM", "valueFrom": {"configMapKeyRef": {"name": "absent", "key": "k", "optional": True}}},
        {"name": "NO_CM_KEY", "valueFrom": {"configMapKeyRef": {"name": "settings", "key": "k",
                                                                "optional": True}}},
    ]}
    pod = _pod()
    assert _node(tmp_path, core).pod_env(pod, container, _local(pod)) == {}


@pytest.mark.parametrize("ref, error", [
    ({"secretKeyRef": {"name": "absent", "key": "k"}}, ApiException),
    ({"secretKeyRef": {"name": "keys", "key": "missing"}}, LookupError),
    ({"configMapKeyRef": {"name": "absent", "key": "k"}}, ApiException),
    ({"configMapKeyRef": {"name": "settings", "key": "missing"}}, LookupError),
])
def test_required_refs_that_dont_resolve_stop_the_start(tmp_path, ref, error):
    core = FakeCore(secrets={("default", "keys"): {"k": _b64("v")}},
                    configmaps={("default", "settings"): {"k": "v"}})
    pod = _pod()
    with pytest.raises(error):
        _node(tmp_path, core).pod_env(pod, {"env": [{"name": "X", "valueFrom": ref}]}, _local(pod))


def test_env_from_secrets_and_configmaps_with_prefixes_and_env_overriding(tmp_path):
    core = FakeCore(
        secrets={("ns1", "tokens"): {"HF_TOKEN": _b64("hf_abc"), "API_KEY": _b64("sk-1")}},
        configmaps={("ns1", "tuning"): {"MAX_NUM_SEQS": "8", "LOG_LEVEL": "info"}},
    )
    container = {
        "envFrom": [
            {"secretRef": {"name": "tokens"}},
            {"configMapRef": {"name": "tuning"}, "prefix": "CM_"},
            {"secretRef": {"name": "absent", "optional": True}},
            {"configMapRef": {"name": "absent", "optional": True}},
        ],
        "env": [{"name": "API_KEY", "value": "from-env"}],  # env wins over envFrom
    }
    pod = _pod(ns="ns1")
    env = _node(tmp_path, core).pod_env(pod, container, _local(pod))
    assert env == {"HF_TOKEN": "hf_abc", "API_KEY": "from-env",
                   "CM_MAX_NUM_SEQS": "8", "CM_LOG_LEVEL": "info"}


@pytest.mark.parametrize("source", [{"secretRef": {"name": "absent"}}, {"configMapRef": {"name": "absent"}}])
def test_env_from_a_missing_required_source_stops_the_start(tmp_path, source):
    pod = _pod()
    with pytest.raises(ApiException):
        _node(tmp_path, FakeCore()).pod_env(pod, {"envFrom": [source]}, _local(pod))


def test_service_account_kubeconfig_holds_a_token_bound_to_the_pod(tmp_path, monkeypatch):
    cfg = client.Configuration()
    cfg.host = "https://127.0.0.1:6443"
    cfg.ssl_ca_cert = "/pki/ca.crt"
    monkeypatch.setattr(client.Configuration, "get_default_copy", classmethod(lambda cls: cfg))
    core = FakeCore()
    node = _node(tmp_path, core)
    pod = _pod(ns="modelendpoint-system", serviceAccountName="modelendpoint-operator")
    path = node.service_account_kubeconfig(pod, _local(pod))

    sa, ns, body = core.token_requests[0]
    assert (sa, ns) == ("modelendpoint-operator", "modelendpoint-system")
    assert body["spec"]["boundObjectRef"] == {"apiVersion": "v1", "kind": "Pod", "name": "p1", "uid": "u1"}
    kubeconfig = json.loads(open(path).read())
    assert kubeconfig["clusters"][0]["cluster"] == {"server": "https://127.0.0.1:6443",
                                                     "certificate-authority": "/pki/ca.crt"}
    assert kubeconfig["users"][0]["user"] == {"token": "token-of-modelendpoint-system-modelendpoint-operator"}
    assert kubeconfig["contexts"][0]["context"]["namespace"] == "modelendpoint-system"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600  # a credential: owner only

    node.service_account_kubeconfig(_pod(uid="u2"), _local(_pod(uid="u2")))
    assert core.token_requests[1][:2] == ("default", "default")  # no serviceAccountName


# --- status reports -----------------------------------------------------------------


class _Running:
    pid = 0

    def poll(self):
        return None


def _ready_local(pod):
    local = _local(pod, process=_Running())
    local.ready = True
    return local


def _ready(pod) -> str:
    return next(c["status"] for c in pod["status"]["conditions"] if c["type"] == "Ready")


def test_report_writes_only_when_the_api_servers_status_differs(tmp_path):
    pod = _pod()
    core = FakeCore(pods=[pod])
    node, local = _node(tmp_path, core), _ready_local(pod)
    node.report(pod, local)
    assert len(core.status_patches) == 1 and _ready(pod) == "True"
    node.report(pod, local)
    assert len(core.status_patches) == 1  # the API server already says so


def test_report_puts_right_a_status_someone_else_changed(tmp_path):
    pod = _pod()
    core = FakeCore(pods=[pod])
    node, local = _node(tmp_path, core), _ready_local(pod)
    node.report(pod, local)
    # The node controller marks the pod not ready (say, after a missed heartbeat).
    for c in pod["status"]["conditions"]:
        if c["type"] in ("Ready", "ContainersReady"):
            c.update(status="False", reason="NodeNotReady")
    node.report(pod, local)
    assert len(core.status_patches) == 2 and _ready(pod) == "True"


def test_report_ignores_conditions_it_doesnt_own_and_keeps_transition_times(tmp_path):
    pod = _pod()
    core = FakeCore(pods=[pod])
    node, local = _node(tmp_path, core), _ready_local(pod)
    node.report(pod, local)
    pod["status"]["conditions"].append({"type": "DisruptionTarget", "status": "True"})
    scheduled = next(c for c in pod["status"]["conditions"] if c["type"] == "PodScheduled")
    scheduled["lastTransitionTime"] = "2026-01-01T00:00:00Z"
    node.report(pod, local)
    assert len(core.status_patches) == 1

    local.ready = False  # the readiness probe now fails
    node.report(pod, local)
    assert len(core.status_patches) == 2 and _ready(pod) == "False"
    conditions = {c["type"]: c for c in pod["status"]["conditions"]}
    assert conditions["PodScheduled"]["lastTransitionTime"] == "2026-01-01T00:00:00Z"


def test_status_differs_compares_what_the_runner_decides():
    base = {"phase": "Running", "podIP": "127.0.1.2", "hostIP": "127.0.0.1",
            "conditions": [{"type": "Ready", "status": "True"}],
            "containerStatuses": [{"name": "c", "ready": True, "started": True, "restartCount": 0,
                                   "state": {"running": {"startedAt": "t1"}}}]}
    same_but_timestamps = json.loads(json.dumps(base))
    same_but_timestamps["containerStatuses"][0]["state"]["running"]["startedAt"] = "t0"
    same_but_timestamps["qosClass"] = "Burstable"
    assert not localnode.status_differs(base, same_but_timestamps)
    restarted = json.loads(json.dumps(base))
    restarted["containerStatuses"][0]["restartCount"] = 1
    assert localnode.status_differs(base, restarted)
    assert localnode.status_differs(base, {})


# --- stopping pods -------------------------------------------------------------------


def _process(ignore_sigterm: bool) -> subprocess.Popen:
    script = ('trap "" TERM; ' if ignore_sigterm else "") + "sleep 60"
    # A process group of its own, as the local node starts containers.
    return subprocess.Popen(["sh", "-c", script], start_new_session=True)


def _deleting_pod(name, uid, grace):
    pod = _pod(name=name, uid=uid, terminationGracePeriodSeconds=grace)
    pod["metadata"]["deletionTimestamp"] = "2026-11-26T12:00:00Z"
    return pod


@pytest.fixture
def processes():
    started: list[subprocess.Popen] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
            proc.wait()


def test_deleting_pods_does_not_block_the_sync_loop(tmp_path, processes):
    """Two pods that ignore SIGTERM, 2 s grace each: a sync returns at once (heartbeats go
    on), both are SIGKILLed once their grace is over, and only then are the pods removed."""
    now = [1000.0]
    pods = [_deleting_pod("a", "ua", 2), _deleting_pod("b", "ub", 2)]
    core = FakeCore(pods=pods)
    node = _node(tmp_path, core, clock=lambda: now[0])
    for pod in pods:
        processes.append(_process(ignore_sigterm=True))
        node.pods[pod["metadata"]["uid"]] = _local(pod, process=processes[-1])
    time.sleep(0.2)  # let sh install its trap

    # The sync returns with both still running: it did not wait out their grace.
    node.sync_once()
    assert all(p.poll() is None for p in processes) and core.deleted == []

    now[0] += 2.5
    node.sync_once()
    assert all(p.poll() is not None for p in processes)
    assert sorted(core.deleted) == [("default", "a"), ("default", "b")]
    assert node.pods == {}


def test_a_pod_whose_process_exits_on_sigterm_is_removed_without_waiting_its_grace(tmp_path, processes):
    pod = _deleting_pod("a", "ua", 600)
    core = FakeCore(pods=[pod])
    node = _node(tmp_path, core)
    processes.append(_process(ignore_sigterm=False))
    node.pods["ua"] = _local(pod, process=processes[0])
    node.sync_once()
    wait_for(lambda: processes[0].poll() is not None, timeout=5, what="sh to exit on SIGTERM", interval=0.05)
    node.sync_once()
    assert core.deleted == [("default", "a")]


def test_stop_all_stops_every_pod_at_once(tmp_path, processes):
    node = _node(tmp_path, FakeCore())
    for uid in ("u1", "u2", "u3"):
        processes.append(_process(ignore_sigterm=True))
        node.pods[uid] = _local(_pod(uid=uid), process=processes[-1])
    time.sleep(0.2)
    started = time.monotonic()
    node.stop_all(grace=2)
    # One grace period (2 s), not one per pod one after another (6 s); the
    # margin is wide because this machine is shared.
    assert time.monotonic() - started < 5
    assert all(p.poll() is not None for p in processes)
