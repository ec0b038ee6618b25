"""The real node: containerd, runc, CNI, kubelet and kube-proxy as node ``local-runner``.

A control plane bound to the node address, the node beside it, and a pod from a
locally built image (busybox from scratch, hack/images) with the security
settings the operator writes: it reaches Running and Ready through its probes,
gets a pod IP from the bridge's range, is listed in its Service's EndpointSlice
and answers on the Service's cluster IP from this machine; it reaches the API
server through the ``kubernetes`` Service; a Secret update reaches its volume
within seconds; and its deletion runs the preStop hook within the grace period.
"""

from __future__ import annotations

import ipaddress
import json
import os
import time
import urllib.request
from pathlib import Path

import pytest

import localcluster
from images import build as images
from node import config, run
from waiting import wait_for

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def node_cluster(testbed_bin: Path, tmp_path_factory: pytest.TempPathFactory):
    state = tmp_path_factory.mktemp("realnode")
    run.host_setup()
    cp = localcluster.start(state / "cluster", testbed_bin, node_ip=config.NODE_IP)
    node = None
    try:
        node = run.start(cp, state / "node", setup=False)
        image = images.ensure_test_image(node)
        yield cp, node, image, state
    finally:
        if node:
            node.stop()
        cp.stop()


def _apply(cp, obj: dict) -> None:
    cp.kubectl("apply", "-f", "-", input=json.dumps(obj))


def _pods(cp, selector: str) -> list[dict]:
    return json.loads(cp.kubectl("get", "pods", "-l", selector, "-o", "json"))["items"]


def test_node_joins_with_this_machines_cpus_and_memory(node_cluster):
    cp, _, _, _ = node_cluster
    n = json.loads(cp.kubectl("get", "node", config.NODE_NAME, "-o", "json"))
    assert n["metadata"]["labels"][config.NODE_LABEL[0]] == config.NODE_LABEL[1]
    assert n["status"]["capacity"]["cpu"] == str(os.cpu_count())
    meminfo = Path("/proc/meminfo").read_text().splitlines()
    mem_kib = next(int(line.split()[1]) for line in meminfo if line.startswith("MemTotal:"))
    assert n["status"]["capacity"]["memory"] == f"{mem_kib}Ki"
    assert n["status"]["nodeInfo"]["containerRuntimeVersion"].startswith("containerd://2.")
    assert n["status"]["nodeInfo"]["kubeletVersion"] == "v1.37.2"
    assert {"type": "InternalIP", "address": config.NODE_IP} in n["status"]["addresses"]
    assert not n["spec"].get("taints")


def _web(image: str, out_dir: Path) -> list[dict]:
    labels = {"app": "web"}
    pod_spec = {
        "nodeSelector": {config.NODE_LABEL[0]: config.NODE_LABEL[1]},
        "terminationGracePeriodSeconds": 20,
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "securityContext": {"runAsNonRoot": True, "runAsUser": 10001, "runAsGroup": 10001, "fsGroup": 10001,
                            "seccompProfile": {"type": "RuntimeDefault"}},
        "containers": [{
            "name": "web",
            "image": image,
            "imagePullPolicy": "IfNotPresent",
            # The preStop hook runs first (seen on the host), then SIGTERM: the shell is
            # PID 1, which the kernel shields from signals it has no handler for, so it
            # traps TERM (without, the kubelet would wait out the grace period).
            "command": ["/bin/sh", "-c",
                        "mkdir -p /tmp/www && echo hello-from-pod > /tmp/www/index.html"
                        " && httpd -f -p 8080 -h /tmp/www & trap 'kill $!; echo term > /out/sigterm; exit 0' TERM;"
                        " wait"],
            "ports": [{"name": "http", "containerPort": 8080}],
            "startupProbe": {"httpGet": {"path": "/", "port": "http"}, "periodSeconds": 1, "failureThreshold": 30},
            "readinessProbe": {"httpGet": {"path": "/", "port": "http"}, "periodSeconds": 1},
            "livenessProbe": {"httpGet": {"path": "/", "port": "http"}, "periodSeconds": 5},
            "lifecycle": {"preStop": {"exec": {"command": [
                "/bin/sh", "-c", "sleep 2; echo done > /out/prestop"]}}},
            "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]},
                                "readOnlyRootFilesystem": True},
            "volumeMounts": [{"name": "out", "mountPath": "/out"}, {"name": "tmp", "mountPath": "/tmp"},
                             {"name": "conf", "mountPath": "/etc/web"}],
        }],
        "volumes": [{"name": "out", "hostPath": {"path": str(out_dir), "type": "Directory"}},
                    {"name": "tmp", "emptyDir": {}},
                    {"name": "conf", "secret": {"secretName": "web-conf"}}],
    }
    return [
        {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "web-conf", "namespace": "default"},
         "stringData": {"key": "first"}},
        {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web", "namespace": "default"},
         "spec": {"replicas": 1, "selector": {"matchLabels": labels},
                  "template": {"metadata": {"labels": labels}, "spec": pod_spec}}},
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web", "namespace": "default"},
         "spec": {"selector": labels, "ports": [{"name": "http", "port": 80, "targetPort": "http"}]}},
    ]


def test_pod_runs_serves_through_its_service_and_stops_with_its_prestop_hook(node_cluster):
    cp, _, image, state = node_cluster
    out = state / "out"
    out.mkdir()
    out.chmod(0o777)  # the pod runs as uid 10001
    for obj in _web(image, out):
        _apply(cp, obj)
    cp.kubectl("wait", "deployment/web", "--for=condition=Available", "--timeout=120s")
    [pod] = _pods(cp, "app=web")
    name = pod["metadata"]["name"]
    assert pod["spec"]["nodeName"] == config.NODE_NAME
    status = pod["status"]
    assert status["phase"] == "Running"
    assert all(cs["ready"] and cs["started"] for cs in status["containerStatuses"])
    pod_ip = status["podIP"]
    assert ipaddress.ip_address(pod_ip) in ipaddress.ip_network(config.POD_SUBNET)

    # The endpoint-slice controller lists the pod (the node's IPs are not loopback).
    def slice_lists_pod():
        slices = json.loads(cp.kubectl("get", "endpointslices", "-l", "kubernetes.io/service-name=web",
                                       "-o", "json"))["items"]
        addrs = {a for s in slices for e in s.get("endpoints") or [] for a in e["addresses"]
                 if (e.get("conditions") or {}).get("ready")}
        return pod_ip in addrs

    wait_for(slice_lists_pod, timeout=30, what="the EndpointSlice to list the ready pod")

    # From this machine through the cluster IP: kube-proxy's iptables rules.
    cluster_ip = json.loads(cp.kubectl("get", "service", "web", "-o", "json"))["spec"]["clusterIP"]
    assert ipaddress.ip_address(cluster_ip) in ipaddress.ip_network(config.SERVICE_CIDR)

    def via_cluster_ip():
        with urllib.request.urlopen(f"http://{cluster_ip}/", timeout=3) as r:
            return r.read().decode().strip() == "hello-from-pod"

    wait_for(via_cluster_ip, timeout=30, what=f"an answer on the Service's cluster IP {cluster_ip}")

    # The security context holds in the container.
    assert cp.kubectl("exec", name, "--", "id").split() == ["uid=10001", "gid=10001", "groups=10001"]
    touched = cp.kubectl("exec", name, "--", "sh", "-c", "touch /x 2>&1; ls /var/run/secrets 2>&1; true")
    assert "Read-only file system" in touched and "No such file or directory" in touched
    proc_status = cp.kubectl("exec", name, "--", "cat", "/proc/1/status")
    fields = dict(line.split(":\t", 1) for line in proc_status.splitlines() if ":\t" in line)
    assert fields["CapEff"].strip() == "0000000000000000"
    assert fields["NoNewPrivs"].strip() == "1"
    assert fields["Seccomp"].strip() == "2"  # a filter: the runtime's default profile

    # In-cluster: the `kubernetes` Service leads to the API server (which answers
    # plain HTTP on its TLS port with a message of its own).
    answer = cp.kubectl("exec", name, "--", "sh", "-c",
                        r"printf 'GET / HTTP/1.0\r\n\r\n' | nc -w 5 10.96.0.1 443")
    assert "Client sent an HTTP request to an HTTPS server" in answer

    # A Secret update reaches the mounted volume within seconds (the kubelet's syncFrequency).
    assert cp.kubectl("exec", name, "--", "cat", "/etc/web/key") == "first"
    _apply(cp, {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "web-conf", "namespace": "default"},
                "stringData": {"key": "second"}})
    updated = time.monotonic()
    wait_for(lambda: cp.kubectl("exec", name, "--", "cat", "/etc/web/key") == "second", timeout=60,
             what="the updated Secret in the pod's volume")
    assert time.monotonic() - updated < 30

    # Deletion: preStop first, then SIGTERM; the pod goes well within its 20 s grace.
    cp.kubectl("delete", "deployment", "web", "--wait=false")
    deleted = time.monotonic()
    wait_for(lambda: not _pods(cp, "app=web"), timeout=60, what="the pod to be gone")
    assert (out / "prestop").read_text().strip() == "done"
    assert (out / "sigterm").read_text().strip() == "term"
    # SIGTERM came after the hook, not at once: the hook's `done` was written first.
    assert (out / "prestop").stat().st_mtime <= (out / "sigterm").stat().st_mtime
    assert time.monotonic() - deleted < 20  # the grace period was not waited out
    # containerd runs nothing of it any more (the kubelet removes the stopped sandbox later, at GC).
    _, node, _, _ = node_cluster
    sandboxes = json.loads(node.crictl("pods", "--name", name, "-o", "json"))["items"]
    assert all(s["state"] == "SANDBOX_NOTREADY" for s in sandboxes)
    assert node.crictl("ps", "-q", "--name", "web").strip() == ""


def test_cpu_pods_land_on_the_real_node_and_gpu_pods_on_the_tainted_kwok_nodes(node_cluster):
    """Issue 13 item 12: a pod without a nodeSelector never lands on a kwok node that
    only pretends to run it; a GPU pod tolerates the GPU taint without saying so."""
    cp, _, _, _ = node_cluster

    def deployment(name: str, limits: dict) -> dict:
        labels = {"app": name}
        return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name, "namespace": "default"},
                "spec": {"replicas": 1, "selector": {"matchLabels": labels}, "template": {
                    "metadata": {"labels": labels},
                    "spec": {"containers": [{"name": "main", "image": config.SANDBOX_IMAGE,
                                             "imagePullPolicy": "IfNotPresent",
                                             "resources": {"limits": limits} if limits else {}}]}}}}

    _apply(cp, deployment("cpu-only", {}))
    _apply(cp, deployment("gpu-two", {"nvidia.com/gpu": "2"}))
    for name in ("cpu-only", "gpu-two"):
        cp.kubectl("wait", f"deployment/{name}", "--for=condition=Available", "--timeout=120s")
    [cpu] = _pods(cp, "app=cpu-only")
    [gpu] = _pods(cp, "app=gpu-two")
    assert cpu["spec"]["nodeName"] == config.NODE_NAME
    assert gpu["spec"]["nodeName"] in {n for n, _ in localcluster.GPU_NODES}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in gpu["spec"]["tolerations"]
    assert not any(t.get("key") == "nvidia.com/gpu" for t in cpu["spec"].get("tolerations") or [])
    for name in ("cpu-only", "gpu-two"):
        cp.kubectl("delete", "deployment", name, "--wait=false")
