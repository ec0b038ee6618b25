"""Start and stop the real node beside a control plane from ``localcluster``.

``start(cp, state_dir)`` prepares the host (hack/node/host-setup.sh), then runs
containerd (with runc and the CNI plugins), the kubelet and kube-proxy as this
machine's node ``local-runner``, and returns once the Node is Ready.
``Node.stop()`` stops them and removes every pod sandbox, mount, network
namespace and iptables rule they made. A start first removes whatever an earlier,
killed node left behind; only one node runs per machine (a lock says which).

The kubelet authenticates with a client certificate from the control plane's CA
(``system:node:local-runner`` in ``system:nodes``), kube-proxy as
``system:kube-proxy``: the API server's Node authorizer and bootstrap RBAC give
them what a kubeadm node has.

``python hack/node/run.py cleanup`` removes a dead node's leftovers by hand.
"""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

HACK = Path(__file__).resolve().parent.parent
if str(HACK) not in sys.path:  # run as a script
    sys.path.insert(0, str(HACK))

import localcluster  # noqa: E402
from localcluster import ControlPlane  # noqa: E402
from node import config  # noqa: E402

CNI_BIN_DIRS = ["/usr/lib/cni"]  # Debian's containernetworking-plugins


def versions() -> dict[str, str]:
    return config.parse_versions((HACK / "versions.env").read_text())


def node_bin_dir() -> Path:
    return config.node_bin_dir(localcluster.default_cache_dir(), versions())


def host_setup() -> None:
    """hack/node/host-setup.sh: packages, kernel settings, the pod bridge (root; idempotent)."""
    if os.geteuid() != 0:
        raise PermissionError("the real node needs root (namespaces, mounts, iptables); run as root")
    subprocess.run(["bash", str(HACK / "node" / "host-setup.sh")], check=True)


@dataclass
class Node:
    """A running node. ``stop()`` ends what ``start()`` began and cleans up after it."""

    paths: config.Paths
    bin_dir: Path  # containerd, runc, ctr, crictl
    k8s_bin_dir: Path  # kubelet, kube-proxy
    kubeconfig: Path  # the admin kubeconfig of the control plane
    pids: dict[str, int] = field(default_factory=dict)
    outlive_starter: bool = False
    _lock_fd: int | None = field(default=None, repr=False)
    _procs: list[subprocess.Popen] = field(default_factory=list, repr=False)

    @property
    def log_dir(self) -> Path:
        return self.paths.state / "logs"

    def crictl(self, *args: str, check: bool = True, timeout: float = 120) -> str:
        proc = subprocess.run(
            [str(self.bin_dir / "crictl"), f"--runtime-endpoint=unix://{self.paths.containerd_socket}",
             f"--image-endpoint=unix://{self.paths.containerd_socket}", "--timeout=60s", *args],
            capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode:
            raise RuntimeError(f"crictl {' '.join(args)} failed: {proc.stderr.strip()}")
        return proc.stdout

    def ctr(self, *args: str, input_file: Path | None = None, check: bool = True) -> str:
        argv = [str(self.bin_dir / "ctr"), f"--address={self.paths.containerd_socket}",
                f"--namespace={config.CRI_NAMESPACE}", *args]
        with open(input_file or os.devnull, "rb") as stdin:
            proc = subprocess.run(argv, stdin=stdin, capture_output=True, text=True)
        if check and proc.returncode:
            raise RuntimeError(f"ctr {' '.join(args)} failed: {proc.stderr.strip()}")
        return proc.stdout

    def check_alive(self) -> None:
        """Raise, with the end of its log, if containerd, the kubelet or kube-proxy exited."""
        for name, pid in self.pids.items():
            if not localcluster._alive(pid):
                raise RuntimeError(f"{name} exited; the end of its log:\n"
                                   f"{localcluster._tail(self.log_dir / f'{name}.log')}")

    def stop(self) -> None:
        # The kubelet first, so that it restarts nothing while the pods go.
        for name in ("kubelet", "kube-proxy"):
            if name in self.pids:
                localcluster.stop_pids([self.pids.pop(name)], timeout=15)
        if "containerd" in self.pids:
            remove_all_pods(self)
            localcluster.stop_pids([self.pids.pop("containerd")], timeout=15)
        for p in self._procs:
            try:
                p.wait(timeout=1)
            except subprocess.TimeoutExpired:
                pass
        self._procs.clear()
        clean_host(self)
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None


def _spawn(node: Node, name: str, argv: list[str], env: dict[str, str] | None = None) -> None:
    node.log_dir.mkdir(parents=True, exist_ok=True)
    with open(node.log_dir / f"{name}.log", "ab") as log:
        proc = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
            env=env, preexec_fn=None if node.outlive_starter else localcluster.die_with_starter)
    node.pids[name] = proc.pid
    node._procs.append(proc)
    (node.paths.state / "pids.json").write_text(json.dumps(node.pids))


def _wait(node: Node, what: str, check, timeout: float, log: str) -> None:
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        node.check_alive()
        try:
            if check():
                return
        except Exception as exc:  # noqa: BLE001 - any failure means "not yet"
            last = str(exc)
        time.sleep(0.25)
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what} ({last})\n"
                       f"{localcluster._tail(node.log_dir / f'{log}.log')}")


def _lock(paths: config.Paths) -> int:
    paths.lock.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(paths.lock, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 64).decode(errors="replace").strip()
        os.close(fd)
        raise RuntimeError(
            f"a real node already runs on this machine (pid {holder or '?'}, lock {paths.lock}): "
            "one per machine (a `make dev` and the e2e tests cannot run at once)") from None
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    return fd


def _iptables(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["iptables", "-w", *args], capture_output=True, text=True, check=check)


def remove_node_rules() -> None:
    """Remove every iptables chain the node's parts made (KUBE-* by the kubelet and
    kube-proxy, the node's egress chain) and the rules that jump to them."""
    for tool in ("iptables", "ip6tables"):
        for table in ("filter", "nat", "mangle"):
            listing = subprocess.run([tool, "-w", "-t", table, "-S"], capture_output=True, text=True).stdout
            removals = config.rules_to_remove(listing)
            # Jumps first, then the chains (a chain still jumped to cannot be deleted).
            for rule, _ in removals:
                if rule:
                    subprocess.run([tool, "-w", "-t", table, *rule], capture_output=True)
            for _, chain in removals:
                if chain:
                    subprocess.run([tool, "-w", "-t", table, "-F", chain], capture_output=True)
            for _, chain in removals:
                if chain:
                    subprocess.run([tool, "-w", "-t", table, "-X", chain], capture_output=True)


def remove_all_pods(node: Node) -> None:
    """Stop and remove every pod sandbox through the CRI (their containers, network
    namespaces and CNI addresses with them), as `crictl rmp -fa` does."""
    try:
        node.crictl("rmp", "--all", "--force", timeout=180)
    except (RuntimeError, subprocess.TimeoutExpired) as exc:
        print(f"node: removing pods failed: {exc}", file=sys.stderr)


def _mounts_under(roots: list[Path]) -> list[str]:
    out = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        mount_point = line.split()[4].replace("\\040", " ")
        if any(mount_point == str(r) or mount_point.startswith(str(r) + "/") for r in roots):
            out.append(mount_point)
    return sorted(out, key=len, reverse=True)  # deepest first


def clean_host(node: Node) -> None:
    """Unmount what the kubelet and containerd left mounted, drop their runtime
    folders (not the images), kube-proxy's and the node's iptables rules."""
    roots = [config.RUN_DIR, config.VAR_DIR]
    for mount_point in _mounts_under(roots):
        subprocess.run(["umount", "-l", mount_point], capture_output=True)
    for d in (node.paths.kubelet_root, node.paths.pod_logs, node.paths.cni_ipam_dir,
              node.paths.containerd_state, node.paths.cni_conf_dir):
        subprocess.run(["rm", "-rf", "--one-file-system", str(d)], capture_output=True)
    remove_node_rules()


def _write(path: Path, text: str, mode: int = 0o600) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(mode)
    return path


def _start_containerd(node: Node) -> None:
    paths = node.paths
    conf = _write(paths.state / "containerd.toml",
                  config.containerd_config(paths, node.bin_dir / "runc", CNI_BIN_DIRS))
    _write(paths.cni_conf_dir / "10-mep-pods.conflist", json.dumps(config.cni_conflist(paths), indent=2), 0o644)
    paths.containerd_root.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    # The shim starts runc from PATH when asked without a full path: ours first.
    env["PATH"] = f"{node.bin_dir}{os.pathsep}{env.get('PATH', '')}"
    _spawn(node, "containerd", [str(node.bin_dir / "containerd"), f"--config={conf}", "--log-level=warn"], env)
    _wait(node, "containerd's CRI", lambda: bool(node.crictl("info", check=True, timeout=10)), 60, "containerd")


def _node_ready(cp: ControlPlane) -> bool:
    out = cp.kubectl("get", "node", config.NODE_NAME, "-o", "json", check=False)
    if not out:
        return False
    conditions = json.loads(out).get("status", {}).get("conditions", [])
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)


def start(cp: ControlPlane, state_dir: Path, *, outlive_starter: bool = False,
          setup: bool = True) -> Node:
    """Start the node against ``cp`` (started with ``node_ip=config.NODE_IP``); wait for Ready."""
    if cp.node_ip != config.NODE_IP:
        raise ValueError(f"the control plane must bind the node's address: "
                         f"localcluster.start(..., node_ip={config.NODE_IP!r})")
    if setup:
        host_setup()
    paths = config.Paths(cache=localcluster.default_cache_dir(), state=state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    node = Node(paths=paths, bin_dir=node_bin_dir(), k8s_bin_dir=cp.bin_dir, kubeconfig=cp.kubeconfig,
                outlive_starter=outlive_starter)
    node._lock_fd = _lock(paths)
    try:
        _start(node, cp)
    except BaseException:
        node.stop()
        raise
    return node


def _start(node: Node, cp: ControlPlane) -> None:
    import images

    paths = node.paths
    pki = cp.state_dir / "pki"
    # What a killed node left: its pods are removed through a fresh containerd
    # (which finds them in its state folder), then its mounts and rules.
    if paths.containerd_state.exists():
        _start_containerd(node)
        remove_all_pods(node)
        localcluster.stop_pids([node.pids.pop("containerd")])
    clean_host(node)
    for cmd in config.egress_rules():
        _iptables(*cmd)
    _start_containerd(node)
    images.ensure_pause(node)

    ca_pem = (pki / "ca.crt").read_bytes()
    server = cp.server
    kubelet_cert, kubelet_key = localcluster.issue_client_cert(
        pki, f"system:node:{config.NODE_NAME}", "system:nodes")
    kubelet_kc = _write(paths.state / "kubelet.kubeconfig", json.dumps(
        config.kubeconfig(server, ca_pem, kubelet_cert, kubelet_key, f"system:node:{config.NODE_NAME}")))
    proxy_cert, proxy_key = localcluster.issue_client_cert(pki, "system:kube-proxy")
    proxy_kc = _write(paths.state / "kube-proxy.kubeconfig", json.dumps(
        config.kubeconfig(server, ca_pem, proxy_cert, proxy_key, "system:kube-proxy")))

    port, healthz, proxy_metrics, proxy_healthz = localcluster.free_ports(4)
    kubelet_conf = _write(paths.state / "kubelet.json", json.dumps(config.kubelet_config(
        paths, ca_file=pki / "ca.crt", port=port, healthz_port=healthz), indent=2))
    paths.kubelet_root.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env["PATH"] = f"{node.bin_dir}{os.pathsep}{env.get('PATH', '')}"
    _spawn(node, "kubelet", [str(node.k8s_bin_dir / "kubelet"),
                             *config.kubelet_args(paths, config=kubelet_conf, kubeconfig_path=kubelet_kc)], env)
    _wait(node, "the kubelet's /healthz", lambda: localcluster._http_ok(f"http://127.0.0.1:{healthz}/healthz"),
          120, "kubelet")
    proxy_conf = _write(paths.state / "kube-proxy.json", json.dumps(config.kube_proxy_config(
        proxy_kc, metrics_port=proxy_metrics, healthz_port=proxy_healthz), indent=2))
    _spawn(node, "kube-proxy", [str(node.k8s_bin_dir / "kube-proxy"), f"--config={proxy_conf}", "--v=1"], env)
    _wait(node, f"Node {config.NODE_NAME} Ready", lambda: _node_ready(cp), 120, "kubelet")
    _wait(node, "kube-proxy's /healthz",
          lambda: localcluster._http_ok(f"http://127.0.0.1:{proxy_healthz}/healthz"), 60, "kube-proxy")


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args != ["cleanup"]:
        print("usage: run.py cleanup   (removes what a killed node left behind)", file=sys.stderr)
        return 2
    paths = config.Paths(cache=localcluster.default_cache_dir(), state=Path("/tmp/mep-node-cleanup"))
    paths.state.mkdir(parents=True, exist_ok=True)
    node = Node(paths=paths, bin_dir=node_bin_dir(), k8s_bin_dir=localcluster.testbed_bin_dir(),
                kubeconfig=Path("/dev/null"))
    node._lock_fd = _lock(paths)
    if paths.containerd_state.exists():
        _start_containerd(node)
    node.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
