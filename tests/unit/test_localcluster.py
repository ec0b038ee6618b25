"""localcluster's pure parts: the kwok GPU nodes' taint, the flags it adds to kwokctl's
with and without a real node beside it, and node client certificates from its CA."""

from __future__ import annotations

import datetime
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

import localcluster


def test_kwok_gpu_nodes_are_tainted_as_real_gpu_node_pools():
    for name, gpus in localcluster.GPU_NODES:
        node = localcluster.gpu_node_manifest(name, gpus)
        assert node["spec"]["taints"] == [{"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}]
        assert node["status"]["allocatable"]["nvidia.com/gpu"] == str(gpus)
    # Each manifest has its own taint list (kubectl apply of one must not alias another's).
    a, b = (localcluster.gpu_node_manifest(n, g) for n, g in localcluster.GPU_NODES)
    assert a["spec"]["taints"][0] is not b["spec"]["taints"][0]


def _config(node_ip=None) -> dict:
    return localcluster.kwokctl_config(Path("/b"), Path("/w"), [6443, 2, 3, 4, 5, 6], node_ip)


def _args(component: str, node_ip=None) -> dict[str, str]:
    """The flags the test bed adds to (or, where marked, overrides in) kwokctl's for ``component``."""
    patch = next(p for p in _config(node_ip)["componentsPatches"] if p["name"] == component)
    return {a["key"]: a["value"] + ("!" if a["override"] else "") for a in patch["extraArgs"]}


def test_kwokctl_runs_only_the_test_bed_binaries_on_loopback():
    options = _config()["options"]
    assert options["runtime"] == "binary" and options["bindAddress"] == "127.0.0.1"
    for key in ("etcdBinary", "kubeApiserverBinary", "kubeControllerManagerBinary", "kubeSchedulerBinary",
                "kubectlBinary", "kwokControllerBinary"):
        assert options[key].startswith("/b/"), key  # nothing for kwokctl to download
    assert options["kubeApiserverPort"] == 6443
    assert "10.96.0.1" in options["kubeApiserverCertSANs"]  # the `kubernetes` Service's address
    assert options["nodeLeaseDurationSeconds"] == 40 and options["heartbeatFactor"] == 1


def test_gpu_pods_get_the_toleration_from_the_api_server():
    # ExtendedResourceToleration adds `nvidia.com/gpu: Exists: NoSchedule` to pods that
    # ask for nvidia.com/gpu, as GKE and AKS do, so GPU pods need no toleration of their own.
    # (kwokctl itself sets --authorization-mode=Node,RBAC.)
    plugins = _args("kube-apiserver")["enable-admission-plugins"].split(",")
    assert "ExtendedResourceToleration" in plugins and "NodeRestriction" in plugins


def test_kwok_manages_only_the_annotated_nodes():
    args = _args("kwok-controller")
    assert args["manage-all-nodes"] == "false!"  # overrides kwokctl's --manage-all-nodes=true
    assert args["manage-nodes-with-annotation-selector"] == "kwok.x-k8s.io/node=fake"
    assert args["node-ip"] == "127.0.0.1!"


def test_without_a_real_node_the_api_server_stays_on_loopback():
    args = _args("kube-apiserver")
    assert "bind-address" not in args  # kwokctl's, from bindAddress
    assert args["endpoint-reconciler-type"] == "none"
    assert "kubelet-client-certificate" not in args
    assert _config()["options"]["kubeApiserverCertSANs"] == ["10.96.0.1"]


def test_with_a_real_node_the_api_server_binds_and_advertises_the_node_address():
    args = _args("kube-apiserver", "10.88.0.1")
    # On every address: node_ip for pods and the node, loopback for kwokctl's components.
    assert args["bind-address"] == "0.0.0.0!" and args["advertise-address"] == "10.88.0.1"
    assert args["endpoint-reconciler-type"] == "lease"  # pods reach it via the kubernetes Service
    assert args["kubelet-client-certificate"] == "/w/pki/admin.crt"
    assert args["kubelet-client-key"] == "/w/pki/admin.key"
    assert "10.88.0.1" in _config("10.88.0.1")["options"]["kubeApiserverCertSANs"]


def test_node_client_certificates_come_from_the_test_bed_ca(tmp_path):
    # A CA as kwokctl's pki package makes one (RSA), in the files it writes.
    pki = tmp_path / "pki"
    pki.mkdir()
    ca_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kwok-ca")])
    now = datetime.datetime.now(datetime.UTC)
    ca = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(ca_key.public_key())
          .serial_number(1).not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    (pki / "ca.crt").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    (pki / "ca.key").write_bytes(ca_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                      serialization.NoEncryption()))

    cert_pem, key_pem = localcluster.issue_client_cert(pki, "system:node:local-runner", "system:nodes")
    cert = x509.load_pem_x509_certificate(cert_pem)
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "system:node:local-runner"
    assert cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value == "system:nodes"
    assert cert.issuer == ca.subject
    usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    ca.public_key().verify(cert.signature, cert.tbs_certificate_bytes, padding.PKCS1v15(),
                           cert.signature_hash_algorithm)
    assert b"PRIVATE KEY" in key_pem
