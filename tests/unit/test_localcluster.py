"""localcluster's pure parts: the kwok GPU nodes' taint, the API server's flags with
and without a real node beside it, and node client certificates from its CA."""

from __future__ import annotations

from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import padding
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


def _args(node_ip=None) -> list[str]:
    return localcluster.apiserver_args(etcd_url="http://127.0.0.1:1", port=6443, state_dir=Path("/s"),
                                       pki=Path("/p"), node_ip=node_ip)


def test_gpu_pods_get_the_toleration_from_the_api_server():
    # ExtendedResourceToleration adds `nvidia.com/gpu: Exists: NoSchedule` to pods that
    # ask for nvidia.com/gpu, as GKE and AKS do, so GPU pods need no toleration of their own.
    plugins = next(a for a in _args() if a.startswith("--enable-admission-plugins="))
    assert "ExtendedResourceToleration" in plugins.split("=", 1)[1].split(",")
    assert "NodeRestriction" in plugins
    assert "--authorization-mode=Node,RBAC" in _args()


def test_without_a_real_node_the_api_server_stays_on_loopback():
    args = _args()
    assert "--bind-address=127.0.0.1" in args
    assert "--endpoint-reconciler-type=none" in args
    assert not any(a.startswith("--kubelet-client-certificate") for a in args)


def test_with_a_real_node_the_api_server_binds_and_advertises_the_node_address():
    args = _args("10.88.0.1")
    assert "--bind-address=10.88.0.1" in args and "--advertise-address=10.88.0.1" in args
    assert "--endpoint-reconciler-type=lease" in args  # pods reach it via the kubernetes Service
    assert "--kubelet-client-certificate=/p/admin.crt" in args
    assert "--kubelet-client-key=/p/admin.key" in args
    assert not any(a in args for a in ("--bind-address=127.0.0.1", "--endpoint-reconciler-type=none"))


def test_node_client_certificates_come_from_the_test_bed_ca(tmp_path):
    pki = tmp_path / "pki"
    localcluster.write_pki(pki, ("10.88.0.1",))
    ca = x509.load_pem_x509_certificate((pki / "ca.crt").read_bytes())
    server = x509.load_pem_x509_certificate((pki / "apiserver.crt").read_bytes())
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "10.88.0.1" in {str(ip) for ip in sans.get_values_for_type(x509.IPAddress)}

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
