"""A real Kubernetes control plane on loopback, for tests and `make cluster`.

It runs the binaries that hack/build-testbed.sh builds from Go modules: etcd,
kube-apiserver (TLS, RBAC, a service-account signer), kube-controller-manager,
kube-scheduler, and kwok, which simulates GPU nodes that advertise
``nvidia.com/gpu``. Every port is a free loopback port, so several clusters can
run side by side (a developer's `make cluster` and CI's tests, say).

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
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
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


# --- certificates -----------------------------------------------------------


def _key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _pem_key(key: rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )


def _cert(
    subject: x509.Name,
    key: rsa.RSAPrivateKey,
    issuer: x509.Name,
    issuer_key: rsa.RSAPrivateKey,
    *,
    ca: bool = False,
    sans: list[x509.GeneralName] | None = None,
    client: bool = False,
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(True, False, False, False, False, True, True, False, False), critical=True
        )
    else:
        usage = x509.oid.ExtendedKeyUsageOID
        builder = builder.add_extension(
            x509.ExtendedKeyUsage([usage.CLIENT_AUTH] if client else [usage.SERVER_AUTH]),
            critical=False,
        )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _name(cn: str, org: str | None = None) -> x509.Name:
    attrs = [x509.NameAttribute(NameOID.COMMON_NAME, cn)]
    if org:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, org))
    return x509.Name(attrs)


def write_pki(pki: Path, extra_ips: tuple[str, ...] = ()) -> None:
    """CA, API server serving cert, admin client cert and the service-account key pair.

    ``extra_ips``: more addresses the API server's certificate is valid for (the
    node address it binds when a real node runs beside it)."""
    pki.mkdir(parents=True, exist_ok=True)
    ca_key = _key()
    ca_name = _name("modelendpoint-testbed-ca")
    ca = _cert(ca_name, ca_key, ca_name, ca_key, ca=True)
    srv_key = _key()
    sans: list[x509.GeneralName] = [
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        x509.IPAddress(ipaddress.ip_address("10.96.0.1")),
        x509.DNSName("localhost"),
        x509.DNSName("kubernetes"),
        x509.DNSName("kubernetes.default"),
        x509.DNSName("kubernetes.default.svc"),
        x509.DNSName("kubernetes.default.svc.cluster.local"),
        *(x509.IPAddress(ipaddress.ip_address(ip)) for ip in extra_ips),
    ]
    srv = _cert(_name("kube-apiserver"), srv_key, ca_name, ca_key, sans=sans)
    admin_key = _key()
    admin = _cert(_name("testbed-admin", "system:masters"), admin_key, ca_name, ca_key, client=True)
    sa_key = _key()
    files = {
        "ca.crt": ca.public_bytes(serialization.Encoding.PEM),
        "ca.key": _pem_key(ca_key),
        "apiserver.crt": srv.public_bytes(serialization.Encoding.PEM),
        "apiserver.key": _pem_key(srv_key),
        "admin.crt": admin.public_bytes(serialization.Encoding.PEM),
        "admin.key": _pem_key(admin_key),
        "sa.key": _pem_key(sa_key),
        "sa.pub": sa_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ),
    }
    for name, data in files.items():
        (pki / name).write_bytes(data)
        (pki / name).chmod(0o600)


def issue_client_cert(pki: Path, cn: str, org: str | None = None) -> tuple[bytes, bytes]:
    """A client certificate from the test bed's CA (in ``pki``): (cert PEM, key PEM).

    The API server maps CN to the user name and O to a group: a kubelet is
    ``system:node:<node name>`` in ``system:nodes`` (the Node authorizer's rule).
    """
    ca = x509.load_pem_x509_certificate((pki / "ca.crt").read_bytes())
    ca_key = serialization.load_pem_private_key((pki / "ca.key").read_bytes(), password=None)
    assert isinstance(ca_key, rsa.RSAPrivateKey)
    key = _key()
    cert = _cert(_name(cn, org), key, ca.subject, ca_key, client=True)
    return cert.public_bytes(serialization.Encoding.PEM), _pem_key(key)


def kubeconfig_yaml(server: str, pki: Path) -> str:
    def b64(name: str) -> str:
        return base64.b64encode((pki / name).read_bytes()).decode()

    # JSON is valid YAML, and needs no YAML library here.
    return json.dumps(
        {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "testbed",
                    "cluster": {"server": server, "certificate-authority-data": b64("ca.crt")},
                }
            ],
            "users": [
                {
                    "name": "testbed-admin",
                    "user": {
                        "client-certificate-data": b64("admin.crt"),
                        "client-key-data": b64("admin.key"),
                    },
                }
            ],
            "contexts": [
                {"name": "testbed", "context": {"cluster": "testbed", "user": "testbed-admin"}}
            ],
            "current-context": "testbed",
        },
        indent=2,
    )


# --- processes ----------------------------------------------------------------


@dataclass
class ControlPlane:
    """A running control plane. ``stop()`` ends every process ``start()`` began."""

    state_dir: Path
    bin_dir: Path
    server: str
    kubeconfig: Path
    pids: dict[str, int] = field(default_factory=dict)
    outlive_starter: bool = False
    node_ip: str | None = None
    _procs: list[subprocess.Popen] = field(default_factory=list, repr=False)

    @property
    def log_dir(self) -> Path:
        return self.state_dir / "logs"

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
        stop_pids(list(self.pids.values()))
        for p in self._procs:
            try:
                p.wait(timeout=1)
            except subprocess.TimeoutExpired:
                pass
        self.pids.clear()
        self._procs.clear()


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
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def die_with_starter() -> None:
    """A ``preexec_fn``: the child gets SIGTERM when the process that started it
    dies, even by SIGKILL, so a killed test run or `make dev` leaves no daemons
    (or model servers) behind. Call ``Popen`` from the main thread: Linux ties
    this to the starting thread."""
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _spawn(cp: ControlPlane, name: str, argv: list[str]) -> None:
    cp.log_dir.mkdir(parents=True, exist_ok=True)
    log = open(cp.log_dir / f"{name}.log", "ab")
    proc = subprocess.Popen(
        argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
        preexec_fn=None if cp.outlive_starter else die_with_starter,
    )
    log.close()
    cp.pids[name] = proc.pid
    cp._procs.append(proc)
    (cp.state_dir / "pids.json").write_text(json.dumps(cp.pids))


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


def _https_ok(url: str, pki: Path) -> bool:
    ctx = ssl.create_default_context(cafile=str(pki / "ca.crt"))
    ctx.load_cert_chain(str(pki / "admin.crt"), str(pki / "admin.key"))
    with urllib.request.urlopen(url, context=ctx, timeout=5) as resp:
        return resp.status == 200


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


def start(state_dir: Path, bin_dir: Path | None = None, *, outlive_starter: bool = False,
          node_ip: str | None = None) -> ControlPlane:
    """Start etcd, the API server, controller-manager, scheduler and kwok; wait until usable.

    They stop when the calling process ends, unless ``outlive_starter`` (`make cluster`).

    ``node_ip``: for a cluster with a real node (hack/node), the node's address on
    this machine (``node.config.NODE_IP``, set up by hack/node/host-setup.sh). The
    API server then binds it instead of loopback and advertises it, so pods reach
    it through the ``kubernetes`` Service, and it authenticates to the kubelet."""
    bin_dir = bin_dir or testbed_bin_dir()
    state_dir.mkdir(parents=True, exist_ok=True)
    pki = state_dir / "pki"
    write_pki(pki, (node_ip,) if node_ip else ())
    names = ("etcd", "etcd_peer", "apiserver", "kcm", "sched", "kwok")
    ports = dict(zip(names, free_ports(len(names)), strict=True))
    server = f"https://{node_ip or '127.0.0.1'}:{ports['apiserver']}"
    kubeconfig = state_dir / "kubeconfig"
    kubeconfig.write_text(kubeconfig_yaml(server, pki))
    kubeconfig.chmod(0o600)
    cp = ControlPlane(state_dir=state_dir, bin_dir=bin_dir, server=server, kubeconfig=kubeconfig,
                      outlive_starter=outlive_starter, node_ip=node_ip)
    try:
        _start_processes(cp, pki, ports)
    except BaseException:
        cp.stop()
        raise
    return cp


def apiserver_args(*, etcd_url: str, port: int, state_dir: Path, pki: Path,
                   node_ip: str | None = None) -> list[str]:
    """kube-apiserver's flags (without the binary)."""
    args = [
        f"--etcd-servers={etcd_url}",
        f"--secure-port={port}",
        f"--cert-dir={state_dir / 'apiserver-certs'}",
        f"--tls-cert-file={pki / 'apiserver.crt'}",
        f"--tls-private-key-file={pki / 'apiserver.key'}",
        f"--client-ca-file={pki / 'ca.crt'}",
        "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
        f"--service-account-key-file={pki / 'sa.pub'}",
        f"--service-account-signing-key-file={pki / 'sa.key'}",
        f"--service-cluster-ip-range={SERVICE_CIDR}",
        # Node: a kubelet (system:node:<name>) reads only what its own pods use.
        "--authorization-mode=Node,RBAC",
        # ExtendedResourceToleration: pods asking for an extended resource
        # (nvidia.com/gpu) tolerate the taint of that name, so GPU pods land on the
        # tainted GPU nodes without a toleration of their own, as on GKE and AKS.
        # NodeRestriction: a kubelet may change only its own Node and its pods.
        "--enable-admission-plugins=ExtendedResourceToleration,NodeRestriction",
        "--allow-privileged=true",
        "--profiling=false",
        "--v=1",
    ]
    if node_ip:
        args += [
            f"--bind-address={node_ip}",
            f"--advertise-address={node_ip}",
            # The lease reconciler keeps the `kubernetes` Service's endpoint at
            # node_ip, which kube-proxy sends pods' in-cluster API calls to.
            "--endpoint-reconciler-type=lease",
            # `kubectl logs`/`exec` go through the kubelet, which authenticates callers.
            f"--kubelet-client-certificate={pki / 'admin.crt'}",
            f"--kubelet-client-key={pki / 'admin.key'}",
            "--kubelet-preferred-address-types=InternalIP",
        ]
    else:
        args += [
            "--bind-address=127.0.0.1",
            "--advertise-address=127.0.0.1",
            # The endpoint reconciler refuses a loopback address; nothing here needs
            # the in-cluster `kubernetes` Service's endpoints.
            "--endpoint-reconciler-type=none",
        ]
    return args


def _start_processes(cp: ControlPlane, pki: Path, ports: dict[str, int]) -> None:
    b = cp.bin_dir
    etcd_url = f"http://127.0.0.1:{ports['etcd']}"
    peer_url = f"http://127.0.0.1:{ports['etcd_peer']}"
    _spawn(cp, "etcd", [
        str(b / "etcd"),
        f"--data-dir={cp.state_dir / 'etcd'}",
        f"--listen-client-urls={etcd_url}",
        f"--advertise-client-urls={etcd_url}",
        f"--listen-peer-urls={peer_url}",
        f"--initial-advertise-peer-urls={peer_url}",
        f"--initial-cluster=default={peer_url}",
        "--unsafe-no-fsync",  # a throwaway cluster: durability buys nothing, fsync costs seconds
        "--quota-backend-bytes=4294967296",
        "--log-level=warn",
    ])
    _wait("etcd /health", lambda: _http_ok(f"{etcd_url}/health"), cp, 60, "etcd")

    _spawn(cp, "kube-apiserver", [
        str(b / "kube-apiserver"),
        *apiserver_args(etcd_url=etcd_url, port=ports["apiserver"], state_dir=cp.state_dir, pki=pki,
                        node_ip=cp.node_ip),
    ])
    _wait("kube-apiserver /readyz", lambda: _https_ok(f"{cp.server}/readyz", pki), cp, 180,
          "kube-apiserver")

    _spawn(cp, "kube-controller-manager", [
        str(b / "kube-controller-manager"),
        f"--kubeconfig={cp.kubeconfig}",
        f"--authentication-kubeconfig={cp.kubeconfig}",
        f"--authorization-kubeconfig={cp.kubeconfig}",
        "--bind-address=127.0.0.1",
        f"--secure-port={ports['kcm']}",
        "--leader-elect=false",
        f"--service-account-private-key-file={pki / 'sa.key'}",
        f"--root-ca-file={pki / 'ca.crt'}",
        f"--cluster-signing-cert-file={pki / 'ca.crt'}",
        f"--cluster-signing-key-file={pki / 'ca.key'}",
        f"--service-cluster-ip-range={SERVICE_CIDR}",
        "--use-service-account-credentials=true",
        "--v=1",
    ])
    _spawn(cp, "kube-scheduler", [
        str(b / "kube-scheduler"),
        f"--kubeconfig={cp.kubeconfig}",
        f"--authentication-kubeconfig={cp.kubeconfig}",
        f"--authorization-kubeconfig={cp.kubeconfig}",
        "--bind-address=127.0.0.1",
        f"--secure-port={ports['sched']}",
        "--leader-elect=false",
        "--v=1",
    ])
    key, value = KWOK_NODE_ANNOTATION
    _spawn(cp, "kwok", [
        str(b / "kwok"),
        f"--kubeconfig={cp.kubeconfig}",
        f"--manage-nodes-with-annotation-selector={key}={value}",
        f"--config={b.parent / 'kwok-stages.yaml'}",
        # Node leases keep the simulated nodes Ready: without them the node
        # controller marks them NotReady every ~50 s and their pods unready.
        "--node-lease-duration-seconds=40",
        f"--server-address=127.0.0.1:{ports['kwok']}",
        f"--cidr={nodeconfig.KWOK_POD_CIDR}",
        "--node-ip=127.0.0.1",
    ])
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

    _wait("the kwok GPU nodes to be Ready", nodes_ready, cp, 120, "kwok")
    # Pods are admitted only once the namespace's default ServiceAccount exists.
    _wait("the default ServiceAccount",
          lambda: bool(cp.kubectl("get", "serviceaccount", "default", "-o", "name", check=False)),
          cp, 120, "kube-controller-manager")


# --- command line (make cluster / make cluster-down) ----------------------------


def _cli_state_dir() -> Path:
    return Path(os.environ.get("MEP_CLUSTER_DIR", default_cache_dir() / "cluster"))


def cmd_up(_: argparse.Namespace) -> int:
    state = _cli_state_dir()
    if (state / "pids.json").exists() and any(
        _alive(p) for p in json.loads((state / "pids.json").read_text()).values()
    ):
        print(f"a cluster is already running from {state}; `make cluster-down` stops it",
              file=sys.stderr)
    else:
        if state.exists():
            subprocess.run(["rm", "-rf", str(state)], check=True)
        print("==> starting etcd, kube-apiserver, kube-controller-manager, kube-scheduler, kwok",
              file=sys.stderr)
        cp = start(state, outlive_starter=True)
        print(f"==> control plane at {cp.server}; logs in {cp.log_dir}", file=sys.stderr)
    bin_dir = testbed_bin_dir()
    print(f"export KUBECONFIG={state / 'kubeconfig'}")
    print(f"export PATH={bin_dir}:$PATH")
    return 0


def cmd_down(_: argparse.Namespace) -> int:
    state = _cli_state_dir()
    pids_file = state / "pids.json"
    if not pids_file.exists():
        print("no local cluster is running", file=sys.stderr)
        return 0
    stop_pids(list(json.loads(pids_file.read_text()).values()))
    pids_file.unlink()
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
