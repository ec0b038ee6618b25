"""A real Kubernetes control plane on loopback, for tests and `make cluster`.

kwokctl (its binary runtime) runs the binaries that hack/build-testbed.sh builds
from Go modules: etcd, kube-apiserver (TLS, RBAC, a service-account signer),
kube-controller-manager, kube-scheduler, and kwok, which simulates GPU nodes that
advertise ``nvidia.com/gpu``. Every port is a free loopback port and every cluster
has its own kwokctl work folder (KWOK_WORKDIR) in its state folder, so several
clusters can run side by side (a developer's `make cluster` and CI's tests, say).

Used two ways:
- ``start()`` / ``ControlPlane.stop()``: the pytest session fixture.
- ``python hack/localcluster.py up|down``: `make cluster` / `make cluster-down`.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import ctypes
import datetime
import ipaddress
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.utils import CryptographyDeprecationWarning
from cryptography.x509.oid import NameOID

from node import config as nodeconfig

HACK_DIR = Path(__file__).resolve().parent
REPO_DIR = HACK_DIR.parent

# The simulated GPU node pool: names and nvidia.com/gpu capacity. Tainted as real
# GPU node pools are (GKE, AKS and the NVIDIA GPU operator's docs use this taint),
# so a CPU pod never lands on a node that only pretends to run it; a pod asking
# for nvidia.com/gpu gets the matching toleration from the API server's
# ExtendedResourceToleration admission plugin, as on those clusters.
GPU_NODES: tuple[tuple[str, int], ...] = (("kwok-gpu-0", 4), ("kwok-gpu-1", 8))
GPU_TAINT = {"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}
KWOK_NODE_ANNOTATION = ("kwok.x-k8s.io/node", "fake")
SERVICE_CIDR = nodeconfig.SERVICE_CIDR
CLUSTER = "testbed"  # the kwokctl cluster's name, in a work folder of its own


def default_cache_dir() -> Path:
    return Path(os.environ.get("MEP_CACHE", Path.home() / ".cache" / "modelendpoint"))


def testbed_bin_dir() -> Path:
    """The folder of built binaries; builds them first when something is missing."""
    out = subprocess.run(
        ["bash", str(HACK_DIR / "build-testbed.sh")], check=True, stdout=subprocess.PIPE, text=True
    ).stdout
    return Path(out.strip().splitlines()[-1])


def free_ports(count: int) -> list[int]:
    """``count`` distinct free loopback ports.

    The sockets stay bound until all ports are picked, so the kernel cannot
    hand out the same port twice (two back-to-back ``bind(0)`` calls can).
    """
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) for _ in range(count)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]


def free_port() -> int:
    return free_ports(1)[0]


def issue_client_cert(pki: Path, cn: str, org: str | None = None) -> tuple[bytes, bytes]:
    """A client certificate from the cluster's CA (kwokctl's, in ``pki``): (cert PEM, key PEM).

    The API server maps CN to the user name and O to a group: a kubelet is
    ``system:node:<node name>`` in ``system:nodes`` (the Node authorizer's rule).
    """
    with warnings.catch_warnings():  # kwokctl's CA has serial number 0, which cryptography frowns on
        warnings.simplefilter("ignore", CryptographyDeprecationWarning)
        ca = x509.load_pem_x509_certificate((pki / "ca.crt").read_bytes())
    ca_key = serialization.load_pem_private_key((pki / "ca.key").read_bytes(), password=None)
    assert isinstance(ca_key, rsa.RSAPrivateKey)
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = [x509.NameAttribute(NameOID.COMMON_NAME, cn)]
    if org:
        name.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, org))
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(x509.Name(name)).issuer_name(ca.subject)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                                serialization.NoEncryption())
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def kubeconfig_json(server: str, pki: Path) -> str:
    """The admin's kubeconfig, self-contained (JSON is valid YAML, and needs no YAML library here)."""
    def b64(name: str) -> str:
        return base64.b64encode((pki / name).read_bytes()).decode()

    return json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "testbed",
        "clusters": [{"name": "testbed", "cluster": {"server": server, "certificate-authority-data": b64("ca.crt")}}],
        "users": [{"name": "testbed-admin", "user": {"client-certificate-data": b64("admin.crt"),
                                                     "client-key-data": b64("admin.key")}}],
        "contexts": [{"name": "testbed", "context": {"cluster": "testbed", "user": "testbed-admin"}}],
    }, indent=2)


# --- processes ----------------------------------------------------------------


def _workdir(state_dir: Path) -> Path:
    return state_dir / "kwok" / "clusters" / CLUSTER


def _kwokctl(state_dir: Path, bin_dir: Path, *args: str, run: Callable[..., Any] = subprocess.run,
             prefix: tuple[str, ...] = (), **kwargs) -> Any:
    """Runs kwokctl on this state folder's cluster; never touches ~/.kwok or ~/.kube/config
    (`delete` edits a kubeconfig: kwokctl's own, in the work folder it then removes)."""
    kubeconfig = _workdir(state_dir) / "kubeconfig.yaml" if "delete" in args else ""
    return run([*prefix, str(bin_dir / "kwokctl"), *args, f"--name={CLUSTER}", f"--kubeconfig={kubeconfig}"],
               env={**os.environ, "KWOK_WORKDIR": str(state_dir / "kwok")}, stdin=subprocess.DEVNULL, **kwargs)


@dataclass
class ControlPlane:
    """A running control plane. ``stop()`` ends every process ``start()`` began."""

    state_dir: Path
    bin_dir: Path
    server: str
    kubeconfig: Path
    outlive_starter: bool = False
    node_ip: str | None = None
    _reaper: subprocess.Popen | None = field(default=None, repr=False)

    @property
    def log_dir(self) -> Path:
        return self.state_dir / "logs"

    @property
    def pids(self) -> dict[str, int]:
        """The components' process ids (kwokctl's pid files), by component name."""
        return {p.stem: int(p.read_text()) for p in (_workdir(self.state_dir) / "pids").glob("*.pid")}

    def env(self) -> dict[str, str]:
        """An environment whose kubectl and helm talk to this cluster."""
        env = dict(os.environ)
        env["KUBECONFIG"] = str(self.kubeconfig)
        env["PATH"] = f"{self.bin_dir}{os.pathsep}{env.get('PATH', '')}"
        return env

    def kubectl(self, *args: str, input: str | None = None, check: bool = True) -> str:
        proc = subprocess.run(
            [str(self.bin_dir / "kubectl"), f"--kubeconfig={self.kubeconfig}", *args],
            input=input,
            capture_output=True,
            text=True,
        )
        if check and proc.returncode != 0:
            raise RuntimeError(f"kubectl {' '.join(args)} failed: {proc.stderr.strip()}")
        return proc.stdout

    def stop(self) -> None:
        pids = list(self.pids.values())
        with open(self.log_dir / "kwokctl.log", "ab") as log:
            _kwokctl(self.state_dir, self.bin_dir, "delete", "cluster", stdout=log, stderr=subprocess.STDOUT)
        stop_pids(pids)  # kwokctl kills them (SIGKILL) but does not wait until they are gone
        if self._reaper:
            self._reaper.kill()
            self._reaper.wait()
            self._reaper = None


def stop_pids(pids: list[int], timeout: float = 15.0) -> None:
    """SIGTERM each process group, then SIGKILL whatever is left after ``timeout``."""
    # Reverse start order: the scheduler and kwok go before the API server, etcd last.
    for pid in reversed(pids):
        try:
            os.killpg(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout
    for pid in reversed(pids):
        while time.monotonic() < deadline and _alive(pid):
            time.sleep(0.1)
        if _alive(pid):
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _alive(pid: int) -> bool:
    try:
        # Reap it if it is our child, so it doesn't linger as a zombie.
        if os.waitpid(pid, os.WNOHANG) != (0, 0):
            return False
    except ChildProcessError:
        pass
    try:
        # A zombie (exited, not reaped: kwokctl's components are orphans) counts as gone.
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return False


def die_with_starter() -> None:
    """A ``preexec_fn``: the child gets SIGTERM when the process that started it
    dies, even by SIGKILL, so a killed test run or `make dev` leaves no daemons
    (or model servers) behind. Call ``Popen`` from the main thread: Linux ties
    this to the starting thread."""
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


# kwokctl starts its components in sessions of their own and exits, so they cannot
# get die_with_starter; this process does, and deletes the cluster on that SIGTERM.
_REAPER = """import signal, subprocess, sys
signal.signal(signal.SIGTERM, lambda *_: sys.exit(subprocess.run(sys.argv[1:]).returncode))
signal.pause()"""


def _wait(what: str, check, cp: ControlPlane, timeout: float = 120.0, logs: str = "") -> None:
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        for name, pid in cp.pids.items():
            if not _alive(pid):
                tail = _tail(cp.log_dir / f"{name}.log")
                raise RuntimeError(f"{name} exited while waiting for {what}:\n{tail}")
        try:
            if check():
                return
        except Exception as exc:  # noqa: BLE001 - any failure means "not yet"
            last = str(exc)
        time.sleep(0.25)
    tail = _tail(cp.log_dir / f"{logs}.log") if logs else ""
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what} ({last})\n{tail}")


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return ""


def _http_ok(url: str) -> bool:
    with urllib.request.urlopen(url, timeout=5) as resp:
        return resp.status == 200


def gpu_node_manifest(name: str, gpus: int) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "annotations": {KWOK_NODE_ANNOTATION[0]: KWOK_NODE_ANNOTATION[1]},
            "labels": {
                "type": "kwok",
                "kubernetes.io/hostname": name,
                "kubernetes.io/os": "linux",
                "kubernetes.io/arch": "amd64",
                "nvidia.com/gpu.present": "true",
            },
        },
        "spec": {"taints": [dict(GPU_TAINT)]},
        "status": {
            "allocatable": {"cpu": "32", "memory": "256Gi", "pods": "110", "nvidia.com/gpu": str(gpus)},
            "capacity": {"cpu": "32", "memory": "256Gi", "pods": "110", "nvidia.com/gpu": str(gpus)},
        },
    }


def kwokctl_config(bin_dir: Path, workdir: Path, ports: list[int], node_ip: str | None = None) -> dict:
    """kwokctl's configuration: our binaries and ports, and the flags we add to what it sets.

    kwokctl already gives kube-apiserver TLS with its CA, Node,RBAC authorization,
    the default admission plugins, --allow-privileged and service-account keys, and
    kube-controller-manager the root CA file and the service-account key."""
    pki = workdir / "pki"
    api, etcd, etcd_peer, kwok, kcm, sched = ports

    def patch(component: str, args: dict[str, str], override: tuple[str, ...] = ()) -> dict:
        return {"name": component,
                "extraArgs": [{"key": k, "value": v, "override": k in override} for k, v in args.items()]}

    apiserver = {
        # ExtendedResourceToleration: pods asking for an extended resource
        # (nvidia.com/gpu) tolerate the taint of that name, so GPU pods land on the
        # tainted GPU nodes without a toleration of their own, as on GKE and AKS.
        # NodeRestriction: a kubelet may change only its own Node and its pods.
        "enable-admission-plugins": "ExtendedResourceToleration,NodeRestriction",
        "service-cluster-ip-range": SERVICE_CIDR,
        "advertise-address": node_ip or "127.0.0.1",
        # The endpoint reconciler refuses a loopback address; without a real node
        # nothing needs the in-cluster `kubernetes` Service's endpoints.
        "endpoint-reconciler-type": "none",
    }
    if node_ip:
        apiserver |= {
            # Reachable on node_ip (for pods, through the `kubernetes` Service) and on
            # loopback, where kwokctl points the other components.
            "bind-address": "0.0.0.0",
            # The lease reconciler keeps the `kubernetes` Service's endpoint at
            # node_ip, which kube-proxy sends pods' in-cluster API calls to.
            "endpoint-reconciler-type": "lease",
            # `kubectl logs`/`exec` go through the kubelet, which authenticates callers.
            "kubelet-client-certificate": str(pki / "admin.crt"),
            "kubelet-client-key": str(pki / "admin.key"),
            "kubelet-preferred-address-types": "InternalIP",
        }
    key, value = KWOK_NODE_ANNOTATION
    return {
        "apiVersion": "config.kwok.x-k8s.io/v1alpha1",
        "kind": "KwokctlConfiguration",
        "options": {
            "runtime": "binary",
            "bindAddress": "127.0.0.1",
            "kubeApiserverPort": api, "etcdPort": etcd, "etcdPeerPort": etcd_peer,
            "kwokControllerPort": kwok, "kubeControllerManagerPort": kcm, "kubeSchedulerPort": sched,
            # Every binary kwokctl runs, so it never downloads one.
            "etcdBinary": str(bin_dir / "etcd"),
            "kubeApiserverBinary": str(bin_dir / "kube-apiserver"),
            "kubeControllerManagerBinary": str(bin_dir / "kube-controller-manager"),
            "kubeSchedulerBinary": str(bin_dir / "kube-scheduler"),
            "kubectlBinary": str(bin_dir / "kubectl"),
            "kwokControllerBinary": str(bin_dir / "kwok"),
            # Pods reach the API server at the `kubernetes` Service's address.
            "kubeApiserverCertSANs": [str(next(ipaddress.ip_network(SERVICE_CIDR).hosts())),
                                      *([node_ip] if node_ip else [])],
            # Node leases keep the simulated nodes Ready: without them the node
            # controller marks them NotReady every ~40 s and their pods unready.
            # Factor 1: kwokctl's default 5 stretches the leases and that grace period.
            "nodeLeaseDurationSeconds": 40, "heartbeatFactor": 1,
        },
        "componentsPatches": [
            patch("kube-apiserver", apiserver, override=("bind-address",)),
            patch("kube-controller-manager", {
                "cluster-signing-cert-file": str(pki / "ca.crt"),
                "cluster-signing-key-file": str(pki / "ca.key"),
                "service-cluster-ip-range": SERVICE_CIDR,
                "use-service-account-credentials": "true",
                "leader-elect": "false",
            }),
            patch("kube-scheduler", {"leader-elect": "false"}),
            # A throwaway cluster: durability buys nothing, fsync costs seconds.
            patch("etcd", {"unsafe-no-fsync": "true"}),
            # Only the nodes with the annotation: not a real kubelet's node.
            patch("kwok-controller", {
                "manage-all-nodes": "false",
                "manage-nodes-with-annotation-selector": f"{key}={value}",
                "node-ip": "127.0.0.1",
                "cidr": nodeconfig.KWOK_POD_CIDR,
            }, override=("manage-all-nodes", "node-ip")),
        ],
    }


def start(state_dir: Path, bin_dir: Path | None = None, *, outlive_starter: bool = False,
          node_ip: str | None = None) -> ControlPlane:
    """Start etcd, the API server, controller-manager, scheduler and kwok; wait until usable.

    They stop when the calling process ends, unless ``outlive_starter`` (`make cluster`).

    ``node_ip``: for a cluster with a real node (hack/node), the node's address on
    this machine (``node.config.NODE_IP``, set up by hack/node/host-setup.sh). The
    API server is then reachable there too and advertises it, so pods reach it
    through the ``kubernetes`` Service, and it authenticates to the kubelet."""
    bin_dir = bin_dir or testbed_bin_dir()
    state_dir.mkdir(parents=True, exist_ok=True)
    work = _workdir(state_dir)
    if work.exists():  # a cluster that a killed run left here
        _kwokctl(state_dir, bin_dir, "delete", "cluster", capture_output=True)
        shutil.rmtree(work, ignore_errors=True)
    # `kwokctl delete` removes its work folder; the logs stay in the state folder,
    # and pki (the CA hack/node signs the node's client certificates with) is there too.
    (state_dir / "logs").mkdir(exist_ok=True)
    work.mkdir(parents=True)
    (work / "logs").symlink_to(state_dir / "logs")
    pki = state_dir / "pki"
    if pki.is_dir() and not pki.is_symlink():
        shutil.rmtree(pki)
    pki.unlink(missing_ok=True)
    pki.symlink_to(work / "pki")
    ports = free_ports(6)
    config = state_dir / "kwokctl.yaml"  # JSON is valid YAML, and needs no YAML library here
    config.write_text(json.dumps(kwokctl_config(bin_dir, work, ports, node_ip), indent=2))
    cp = ControlPlane(state_dir=state_dir, bin_dir=bin_dir, server=f"https://{node_ip or '127.0.0.1'}:{ports[0]}",
                      kubeconfig=state_dir / "kubeconfig", outlive_starter=outlive_starter, node_ip=node_ip)
    if not outlive_starter:
        cp._reaper = _kwokctl(state_dir, bin_dir, "delete", "cluster", run=subprocess.Popen,
                              prefix=(sys.executable, "-c", _REAPER), start_new_session=True,
                              preexec_fn=die_with_starter)
    try:
        with open(cp.log_dir / "kwokctl.log", "ab") as log:
            stages = bin_dir.parent / "kwok-stages.yaml"  # what kwok does to its nodes and pods
            created = _kwokctl(state_dir, bin_dir, f"--config={config}", f"--config={stages}",
                               "create", "cluster", stdout=log, stderr=subprocess.STDOUT,
                               preexec_fn=None if outlive_starter else die_with_starter)
        if created.returncode != 0:
            raise RuntimeError(f"kwokctl create cluster failed:\n{_tail(cp.log_dir / 'kwokctl.log')}")
        cp.kubeconfig.write_text(kubeconfig_json(cp.server, pki))
        cp.kubeconfig.chmod(0o600)
        _wait_usable(cp)
    except BaseException:
        cp.stop()
        raise
    return cp


def _wait_usable(cp: ControlPlane) -> None:
    _wait("kube-apiserver /readyz", lambda: cp.kubectl("get", "--raw", "/readyz") == "ok", cp, 180, "kube-apiserver")
    nodes = {"apiVersion": "v1", "kind": "List",
             "items": [gpu_node_manifest(n, g) for n, g in GPU_NODES]}
    cp.kubectl("apply", "-f", "-", input=json.dumps(nodes))

    def nodes_ready() -> bool:
        out = json.loads(cp.kubectl("get", "nodes", "-o", "json"))
        ready = {
            n["metadata"]["name"]
            for n in out["items"]
            for c in n.get("status", {}).get("conditions", [])
            if c["type"] == "Ready" and c["status"] == "True"
        }
        return all(name in ready for name, _ in GPU_NODES)

    _wait("the kwok GPU nodes to be Ready", nodes_ready, cp, 120, "kwok-controller")
    # Pods are admitted only once the namespace's default ServiceAccount exists.
    _wait("the default ServiceAccount",
          lambda: bool(cp.kubectl("get", "serviceaccount", "default", "-o", "name", check=False)),
          cp, 120, "kube-controller-manager")


# --- command line (make cluster / make cluster-down) ----------------------------


def _cli_state_dir() -> Path:
    return Path(os.environ.get("MEP_CLUSTER_DIR", default_cache_dir() / "cluster"))


def cmd_up(_: argparse.Namespace) -> int:
    state = _cli_state_dir()
    bin_dir = testbed_bin_dir()
    apiserver_pid = _workdir(state) / "pids" / "kube-apiserver.pid"
    if apiserver_pid.exists() and _alive(int(apiserver_pid.read_text())):
        print(f"a cluster is already running from {state}; `make cluster-down` stops it",
              file=sys.stderr)
    else:
        if state.exists():
            _kwokctl(state, bin_dir, "delete", "cluster", capture_output=True)
            subprocess.run(["rm", "-rf", str(state)], check=True)
        print("==> kwokctl: starting etcd, kube-apiserver, kube-controller-manager, kube-scheduler, kwok",
              file=sys.stderr)
        cp = start(state, bin_dir, outlive_starter=True)
        print(f"==> control plane at {cp.server}; logs in {cp.log_dir}", file=sys.stderr)
    print(f"export KUBECONFIG={state / 'kubeconfig'}")
    print(f"export PATH={bin_dir}:$PATH")
    return 0


def cmd_down(_: argparse.Namespace) -> int:
    state = _cli_state_dir()
    if not _workdir(state).exists():
        print("no local cluster is running", file=sys.stderr)
        return 0
    ControlPlane(state, testbed_bin_dir(), "", state / "kubeconfig", outlive_starter=True).stop()
    print(f"stopped the local cluster in {state}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(required=True)
    sub.add_parser("up", help="start the control plane; print KUBECONFIG and PATH exports").set_defaults(fn=cmd_up)
    sub.add_parser("down", help="stop the control plane started by `up`").set_defaults(fn=cmd_down)
    args = parser.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
