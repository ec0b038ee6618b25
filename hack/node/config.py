"""Configuration of the real node, rendered from a few inputs (pure; no I/O).

One node per machine, named ``local-runner``: its runtime state lives in fixed
folders (``RUN_DIR``, ``VAR_DIR``) so that a later start finds and removes
whatever a killed one left (containers, mounts, network namespaces); its
images live in the cache (``containerd_root``), so they survive restarts.

Network: pods get addresses from ``POD_SUBNET`` on the bridge ``BRIDGE``, whose
own address ``NODE_IP`` is the node's InternalIP and the address the API server
of such a cluster binds (pods reach it through the ``kubernetes`` Service).
Cluster IPs come from ``SERVICE_CIDR``; kwok's simulated pods from ``KWOK_POD_CIDR``.

Run as a script (``python3 config.py network``) it prints the network
settings for hack/node/host-setup.sh, with nothing but the standard library.
"""

from __future__ import annotations

import hashlib
import json
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

NODE_NAME = "local-runner"
NODE_LABEL = ("modelendpoint.dev/local-runner", "true")
BRIDGE = "mep0"
POD_SUBNET = "10.88.0.0/24"
NODE_IP = "10.88.0.1"
SERVICE_CIDR = "10.96.0.0/16"
KWOK_POD_CIDR = "10.244.0.0/16"
CLUSTER_DOMAIN = "cluster.local"
# Fixed per machine (see the module docstring). /run is for sockets and
# containerd's state, which must not outlive a reboot; /var/lib for the kubelet.
RUN_DIR = Path("/run/mep-node")
VAR_DIR = Path("/var/lib/mep-node")
# The sandbox ("pause") image containerd uses for every pod, built locally
# (hack/images) since no registry is reachable; the tag containerd 2.4 defaults to.
SANDBOX_IMAGE = "registry.k8s.io/pause:3.10.2"
CRI_NAMESPACE = "k8s.io"


def parse_versions(text: str) -> dict[str, str]:
    """hack/versions.env (``NAME=value`` lines, ``#`` comments) as a dict."""
    out = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            key, _, value = line.partition("=")
            out[key.strip()] = value.strip().strip('"')
    return out


def node_bin_dir(cache: Path, versions: dict[str, str]) -> Path:
    """Where hack/build-testbed.sh puts containerd, runc and crictl (keyed by their versions)."""
    v = versions
    return (cache / f"node-containerd-{v['CONTAINERD_VERSION']}-runc-{v['RUNC_VERSION']}"
            f"-crictl-{v['CRICTL_VERSION']}" / "bin")


@dataclass(frozen=True)
class Paths:
    """Every folder and socket of the node."""

    cache: Path  # persistent: containerd's content and snapshots (the images)
    state: Path  # this run's configuration, certificates and logs

    @property
    def containerd_root(self) -> Path:
        return self.cache / "node" / "containerd"

    @property
    def containerd_state(self) -> Path:
        return RUN_DIR / "containerd"

    @property
    def containerd_socket(self) -> Path:
        return RUN_DIR / "containerd.sock"

    @property
    def kubelet_root(self) -> Path:
        return VAR_DIR / "kubelet"

    @property
    def pod_logs(self) -> Path:
        return VAR_DIR / "pod-logs"

    @property
    def cni_conf_dir(self) -> Path:
        return RUN_DIR / "cni" / "net.d"

    @property
    def cni_ipam_dir(self) -> Path:
        return VAR_DIR / "cni" / "networks"

    @property
    def lock(self) -> Path:
        return RUN_DIR / "node.lock"


def _toml_str(value: str) -> str:
    return json.dumps(value)  # a JSON string is a valid TOML basic string


def containerd_config(paths: Paths, runc: Path, cni_bin_dirs: list[str]) -> str:
    """containerd's config.toml (version 3, which containerd 2.x reads as is).

    Only what differs from containerd's defaults, plus what makes this
    containerd independent of any other on the machine: its own root, state
    and socket, no imports of /etc/containerd, its own CNI folder.
    """
    bins = ", ".join(_toml_str(d) for d in cni_bin_dirs)
    return f"""\
version = 3
root = {_toml_str(str(paths.containerd_root))}
state = {_toml_str(str(paths.containerd_state))}
imports = []

[grpc]
  address = {_toml_str(str(paths.containerd_socket))}

[ttrpc]
  address = {_toml_str(str(paths.containerd_socket) + ".ttrpc")}

[plugins."io.containerd.cri.v1.images"]
  snapshotter = "overlayfs"
  [plugins."io.containerd.cri.v1.images".pinned_images]
    sandbox = {_toml_str(SANDBOX_IMAGE)}

[plugins."io.containerd.cri.v1.runtime"]
  # No OOM score below containerd's own (0): lowering it needs CAP_SYS_RESOURCE,
  # which the CI VM's bounding set lacks (runc would fail every pod sandbox).
  restrict_oom_score_adj = true
  # The hugetlb controller is not mounted on every cgroup v1 host (not on CI's).
  tolerate_missing_hugetlb_controller = true
  disable_hugetlb_controller = true
  [plugins."io.containerd.cri.v1.runtime".containerd]
    default_runtime_name = "runc"
    [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc.options]
        BinaryName = {_toml_str(str(runc))}
        # cgroupfs: there is no systemd here; the kubelet learns it from the CRI.
        SystemdCgroup = false
  [plugins."io.containerd.cri.v1.runtime".cni]
    bin_dirs = [{bins}]
    conf_dir = {_toml_str(str(paths.cni_conf_dir))}
    max_conf_num = 1
"""


def cni_conflist(paths: Paths) -> dict:
    """The pod network: one bridge, host-local addresses, hostPort mappings.

    The bridge exists before (host-setup.sh) with the gateway address, which
    the plugin then keeps. No IP masquerade: pods talk to pods, Services and
    the API server on this machine only (``egress_rules`` keeps them there).
    """
    return {
        "cniVersion": "1.0.0",
        "name": "mep-pods",
        "plugins": [
            {
                "type": "bridge",
                "bridge": BRIDGE,
                "isGateway": True,
                "ipMasq": False,
                # A pod reaching its own Service may be sent back to itself.
                "hairpinMode": True,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": POD_SUBNET, "gateway": NODE_IP}]],
                    "routes": [{"dst": "0.0.0.0/0"}],
                    "dataDir": str(paths.cni_ipam_dir),
                },
            },
            {"type": "portmap", "capabilities": {"portMappings": True}},
        ],
    }


# iptables rules the node adds (and removes on stop) in a chain of its own:
# nothing a pod sends leaves this machine (a model server has no business on the
# network, and this machine's network must only see its registries' traffic).
EGRESS_CHAIN = "MEP-NODE-EGRESS"


def egress_rules() -> list[list[str]]:
    """``iptables`` argument lists, in order, that set up ``EGRESS_CHAIN``."""
    return [
        ["-t", "filter", "-N", EGRESS_CHAIN],
        ["-t", "filter", "-A", EGRESS_CHAIN, "-i", BRIDGE, "-o", BRIDGE, "-j", "RETURN"],
        ["-t", "filter", "-A", EGRESS_CHAIN, "-i", BRIDGE, "-j", "REJECT"],
        ["-t", "filter", "-I", "FORWARD", "1", "-j", EGRESS_CHAIN],
    ]


def rules_to_remove(listing: str) -> list[tuple[list[str] | None, str | None]]:
    """From ``iptables -S`` of one table: what removes the node's rules and chains.

    Each item is (``-D ...`` arguments of a rule in a built-in chain that jumps to
    a node chain, None) or (None, a node chain to flush and delete). Node chains
    are the kubelet's and kube-proxy's (``KUBE-``) and ``EGRESS_CHAIN``.
    """
    def ours(chain: str) -> bool:
        return chain.startswith("KUBE-") or chain == EGRESS_CHAIN

    out: list[tuple[list[str] | None, str | None]] = []
    for line in listing.splitlines():
        words = shlex.split(line)  # comments are quoted: "kubernetes service portals"
        if len(words) >= 2 and words[0] == "-A" and not ours(words[1]) and "-j" in words:
            target = words[words.index("-j") + 1]
            if ours(target):
                out.append((["-D", *words[1:]], None))
        elif len(words) == 2 and words[0] == "-N" and ours(words[1]):
            out.append((None, words[1]))
    return out


def kubelet_config(paths: Paths, *, ca_file: Path, port: int, healthz_port: int,
                   sync_seconds: int = 5) -> dict:
    """The KubeletConfiguration (JSON is YAML, so the kubelet reads it as is)."""
    return {
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        "containerRuntimeEndpoint": f"unix://{paths.containerd_socket}",
        # kubelet 1.37 refuses cgroup v1 unless told otherwise; CI's VM has only v1.
        "failCgroupV1": False,
        "failSwapOn": False,
        # The kubelet's own OOM score: lowering it needs CAP_SYS_RESOURCE (see containerd_config).
        "oomScoreAdj": 0,
        "address": NODE_IP,
        "port": port,
        "readOnlyPort": 0,
        "healthzBindAddress": "127.0.0.1",
        "healthzPort": healthz_port,
        "authentication": {
            "anonymous": {"enabled": False},
            "webhook": {"enabled": True},
            "x509": {"clientCAFile": str(ca_file)},
        },
        "authorization": {"mode": "Webhook"},
        # Secret, ConfigMap and projected volumes are refreshed on every sync:
        # a rotated API key reaches the pods within seconds, not a minute.
        "syncFrequency": f"{sync_seconds}s",
        "clusterDomain": CLUSTER_DOMAIN,
        "podLogsDir": str(paths.pod_logs),
        "maxPods": 110,
        # A test node on a shared disk: never evict pods or delete images for space.
        "evictionHard": {"memory.available": "100Mi", "nodefs.available": "1%",
                         "imagefs.available": "1%", "nodefs.inodesFree": "1%"},
        "imageGCHighThresholdPercent": 100,
        "imageGCLowThresholdPercent": 99,
        "serializeImagePulls": False,
        # Pods are deleted with the cluster: no graceful node shutdown to wait for.
        "shutdownGracePeriod": "0s",
    }


def kube_proxy_config(kubeconfig: Path, *, metrics_port: int, healthz_port: int) -> dict:
    return {
        "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
        "kind": "KubeProxyConfiguration",
        "clientConnection": {"kubeconfig": str(kubeconfig)},
        "hostnameOverride": NODE_NAME,
        "mode": "iptables",
        "oomScoreAdj": 0,  # as the kubelet's (kubelet_config)
        "clusterCIDR": POD_SUBNET,
        "bindAddress": NODE_IP,
        "metricsBindAddress": f"127.0.0.1:{metrics_port}",
        "healthzBindAddress": f"127.0.0.1:{healthz_port}",
        # Rules follow Service and EndpointSlice changes at once, not every 30 s.
        "iptables": {"minSyncPeriod": "0s", "syncPeriod": "30s"},
        # Leave the machine's conntrack sysctls alone.
        "conntrack": {"maxPerCore": 0, "min": 0,
                      "tcpEstablishedTimeout": "0s", "tcpCloseWaitTimeout": "0s"},
        "nodePortAddresses": [f"{NODE_IP}/32"],
    }


def kubeconfig(server: str, ca_pem: bytes, cert_pem: bytes, key_pem: bytes, user: str) -> dict:
    import base64

    def b64(data: bytes) -> str:
        return base64.b64encode(data).decode()

    return {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "local", "cluster": {"server": server,
                                                   "certificate-authority-data": b64(ca_pem)}}],
        "users": [{"name": user, "user": {"client-certificate-data": b64(cert_pem),
                                          "client-key-data": b64(key_pem)}}],
        "contexts": [{"name": "local", "context": {"cluster": "local", "user": user}}],
        "current-context": "local",
    }


def kubelet_args(paths: Paths, *, config: Path, kubeconfig_path: Path, verbosity: int = 1) -> list[str]:
    """The kubelet's flags beside its config file (what the config file cannot say)."""
    return [
        f"--config={config}",
        f"--kubeconfig={kubeconfig_path}",
        f"--root-dir={paths.kubelet_root}",
        f"--hostname-override={NODE_NAME}",
        f"--node-ip={NODE_IP}",
        f"--node-labels={NODE_LABEL[0]}={NODE_LABEL[1]}",
        f"--v={verbosity}",
    ]


def content_key(*parts: bytes | str) -> str:
    """A short stable hash of the given inputs (cache keys of built artefacts)."""
    h = hashlib.sha256()
    for p in parts:
        data = p.encode() if isinstance(p, str) else p
        h.update(len(data).to_bytes(8, "big"))
        h.update(data)
    return h.hexdigest()[:16]


def main(argv: list[str]) -> int:
    if argv[1:] == ["network"]:
        print(BRIDGE, f"{NODE_IP}/{POD_SUBNET.split('/')[1]}", SERVICE_CIDR, KWOK_POD_CIDR)
        return 0
    print("usage: config.py network", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
