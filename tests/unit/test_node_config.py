"""The real node's configuration, rendered without running anything: containerd's
config, the CNI network, the kubelet's and kube-proxy's configurations, the
iptables clean-up, and where build-testbed.sh puts the node's binaries."""

from __future__ import annotations

import ipaddress
import json
import subprocess
import sys
import tomllib
from pathlib import Path

import localcluster
from node import config

HACK = Path(__file__).resolve().parents[2] / "hack"


def _paths(tmp_path: Path) -> config.Paths:
    return config.Paths(cache=tmp_path / "cache", state=tmp_path / "state")


def test_containerd_config_is_its_own_and_says_what_the_node_needs(tmp_path):
    paths = _paths(tmp_path)
    text = config.containerd_config(paths, Path("/opt/bin/runc"), ["/usr/lib/cni"])
    conf = tomllib.loads(text)
    assert conf["version"] == 3
    # Nothing shared with a containerd the machine may run: root, state, socket, no imports.
    assert conf["root"] == str(paths.containerd_root) and str(tmp_path / "cache") in conf["root"]
    assert conf["state"] == str(config.RUN_DIR / "containerd")
    assert conf["grpc"]["address"] == str(paths.containerd_socket)
    assert conf["imports"] == []
    images = conf["plugins"]["io.containerd.cri.v1.images"]
    assert images["pinned_images"]["sandbox"] == config.SANDBOX_IMAGE
    runtime = conf["plugins"]["io.containerd.cri.v1.runtime"]
    # Without CAP_SYS_RESOURCE (CI's VM) runc cannot lower a sandbox's OOM score.
    assert runtime["restrict_oom_score_adj"] is True
    runc = runtime["containerd"]["runtimes"]["runc"]
    assert runc["runtime_type"] == "io.containerd.runc.v2"
    assert runc["options"] == {"BinaryName": "/opt/bin/runc", "SystemdCgroup": False}
    assert runtime["cni"]["bin_dirs"] == ["/usr/lib/cni"]
    assert runtime["cni"]["conf_dir"] == str(paths.cni_conf_dir)


def test_pod_network_is_one_bridge_whose_gateway_is_the_node_address(tmp_path):
    conf = config.cni_conflist(_paths(tmp_path))
    bridge, portmap = conf["plugins"]
    assert bridge["type"] == "bridge" and bridge["bridge"] == config.BRIDGE
    assert bridge["isGateway"] and bridge["hairpinMode"] and not bridge["ipMasq"]
    [[subnet]] = bridge["ipam"]["ranges"]
    assert subnet == {"subnet": config.POD_SUBNET, "gateway": config.NODE_IP}
    assert ipaddress.ip_address(config.NODE_IP) in ipaddress.ip_network(config.POD_SUBNET)
    assert portmap == {"type": "portmap", "capabilities": {"portMappings": True}}
    # Pods, cluster IPs and kwok's simulated pods never overlap.
    nets = [ipaddress.ip_network(n) for n in (config.POD_SUBNET, config.SERVICE_CIDR, config.KWOK_POD_CIDR)]
    assert not any(a.overlaps(b) for i, a in enumerate(nets) for b in nets[i + 1:])
    assert localcluster.SERVICE_CIDR == config.SERVICE_CIDR


def test_kubelet_config_runs_on_cgroup_v1_and_refreshes_volumes_within_seconds(tmp_path):
    paths = _paths(tmp_path)
    conf = config.kubelet_config(paths, ca_file=Path("/pki/ca.crt"), port=10555, healthz_port=10556)
    assert conf["kind"] == "KubeletConfiguration"
    assert conf["failCgroupV1"] is False
    assert conf["containerRuntimeEndpoint"] == f"unix://{paths.containerd_socket}"
    assert conf["syncFrequency"] == "5s"
    assert conf["address"] == config.NODE_IP and conf["port"] == 10555
    assert conf["readOnlyPort"] == 0
    assert conf["authentication"]["anonymous"] == {"enabled": False}
    assert conf["authentication"]["x509"] == {"clientCAFile": "/pki/ca.crt"}
    assert conf["authorization"] == {"mode": "Webhook"}
    assert conf["oomScoreAdj"] == 0
    assert conf["imageGCHighThresholdPercent"] == 100  # never deletes the locally built images
    args = config.kubelet_args(paths, config=Path("/s/kubelet.json"), kubeconfig_path=Path("/s/kc"))
    assert f"--hostname-override={config.NODE_NAME}" in args
    assert "--node-labels=modelendpoint.dev/local-runner=true" in args
    assert f"--node-ip={config.NODE_IP}" in args
    assert f"--root-dir={paths.kubelet_root}" in args


def test_kube_proxy_runs_iptables_mode_for_the_pod_network():
    conf = config.kube_proxy_config(Path("/s/kp.kubeconfig"), metrics_port=1, healthz_port=2)
    assert conf["mode"] == "iptables"
    assert conf["clusterCIDR"] == config.POD_SUBNET
    assert conf["hostnameOverride"] == config.NODE_NAME
    assert conf["clientConnection"] == {"kubeconfig": "/s/kp.kubeconfig"}
    assert conf["metricsBindAddress"] == "127.0.0.1:1" and conf["healthzBindAddress"] == "127.0.0.1:2"
    assert conf["conntrack"]["maxPerCore"] == 0  # leaves the machine's conntrack sysctls alone


def test_kubeconfig_carries_the_client_certificate_and_the_ca():
    kc = config.kubeconfig("https://10.88.0.1:6443", b"CA", b"CERT", b"KEY", "system:node:local-runner")
    assert kc["clusters"][0]["cluster"] == {"server": "https://10.88.0.1:6443",
                                            "certificate-authority-data": "Q0E="}
    assert kc["users"][0] == {"name": "system:node:local-runner",
                              "user": {"client-certificate-data": "Q0VSVA==", "client-key-data": "S0VZ"}}


IPTABLES_S = """\
-P INPUT ACCEPT
-P FORWARD ACCEPT
-N KUBE-FIREWALL
-N KUBE-SERVICES
-N MEP-NODE-EGRESS
-N DOCKER
-A INPUT -j KUBE-FIREWALL
-A FORWARD -m conntrack --ctstate NEW -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A FORWARD -j MEP-NODE-EGRESS
-A FORWARD -j DOCKER
-A KUBE-FIREWALL ! -s 127.0.0.0/8 -d 127.0.0.0/8 -m comment --comment "block incoming localnet connections" -j DROP
-A MEP-NODE-EGRESS -i mep0 -j REJECT
"""


def test_iptables_cleanup_removes_only_the_node_chains_and_the_jumps_to_them():
    removals = config.rules_to_remove(IPTABLES_S)
    rules = [r for r, _ in removals if r]
    chains = [c for _, c in removals if c]
    assert rules == [
        ["-D", "INPUT", "-j", "KUBE-FIREWALL"],
        # A quoted comment stays one argument, so that `iptables -D` matches the rule.
        ["-D", "FORWARD", "-m", "conntrack", "--ctstate", "NEW", "-m", "comment", "--comment",
         "kubernetes service portals", "-j", "KUBE-SERVICES"],
        ["-D", "FORWARD", "-j", "MEP-NODE-EGRESS"],
    ]
    assert chains == ["KUBE-FIREWALL", "KUBE-SERVICES", "MEP-NODE-EGRESS"]  # not DOCKER


def test_egress_rules_keep_pod_traffic_on_the_bridge():
    rules = config.egress_rules()
    assert rules[0] == ["-t", "filter", "-N", config.EGRESS_CHAIN]
    assert ["-t", "filter", "-A", config.EGRESS_CHAIN, "-i", config.BRIDGE, "-o", config.BRIDGE,
            "-j", "RETURN"] in rules
    assert rules[-1] == ["-t", "filter", "-I", "FORWARD", "1", "-j", config.EGRESS_CHAIN]


def test_node_binaries_are_where_build_testbed_puts_them(tmp_path):
    versions = config.parse_versions((HACK / "versions.env").read_text())
    script = (HACK / "build-testbed.sh").read_text()
    expected = config.node_bin_dir(Path("/c"), versions)
    line = next(x for x in script.splitlines() if x.startswith("node_bin="))
    rendered = (line.split("=", 1)[1].strip('"').replace("$cache", "/c")
                .replace("${CONTAINERD_VERSION}", versions["CONTAINERD_VERSION"])
                .replace("${RUNC_VERSION}", versions["RUNC_VERSION"])
                .replace("${CRICTL_VERSION}", versions["CRICTL_VERSION"]))
    assert Path(rendered) == expected
    # The wrapper module pins what versions.env says (build-testbed.sh refuses otherwise).
    gomod = (HACK / "testbed" / "node" / "go.mod").read_text()
    assert f"\tgithub.com/containerd/containerd/v2 {versions['CONTAINERD_VERSION']}\n" in gomod
    assert f"\tgithub.com/opencontainers/runc {versions['RUNC_VERSION']}\n" in gomod
    assert f"\tsigs.k8s.io/cri-tools {versions['CRICTL_VERSION']}\n" in gomod


def test_parse_versions_reads_the_env_file_format():
    assert config.parse_versions('# c\nA=1\n\nB="two"\n') == {"A": "1", "B": "two"}


def test_content_key_changes_with_any_part_and_not_with_how_parts_are_split():
    assert config.content_key("a", b"b") == config.content_key(b"a", "b")
    assert config.content_key("ab") != config.content_key("a", "b")
    assert config.content_key("a", "b") != config.content_key("a", "c")


def test_network_settings_for_host_setup_come_from_the_standard_library_alone():
    # host-setup.sh runs the module with the system Python, before any venv exists.
    out = subprocess.run([sys.executable, "-I", str(HACK / "node" / "config.py"), "network"],
                         capture_output=True, text=True, check=True).stdout.split()
    assert out == [config.BRIDGE, f"{config.NODE_IP}/24", config.SERVICE_CIDR, config.KWOK_POD_CIDR]


def test_kubelet_config_is_json_serialisable(tmp_path):
    json.dumps(config.kubelet_config(_paths(tmp_path), ca_file=Path("/ca"), port=1, healthz_port=2))
