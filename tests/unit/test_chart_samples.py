"""The samples users copy: every field exists in the CRD, each sample shows what it is
for, and the Secrets a sample references are the ones beside it. (The API server's own
verdict, `kubectl apply --dry-run=server`, is in tests/integration/test_chart_install.py.)"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

import embedded_model

REPO = Path(__file__).resolve().parents[2]
SAMPLES = REPO / "samples"
CRD = yaml.safe_load((REPO / "crds" / "modelendpoints.yaml").read_text())
[VERSION] = CRD["spec"]["versions"]
API_VERSION = f"{CRD['spec']['group']}/{VERSION['name']}"
SCHEMA = VERSION["schema"]["openAPIV3Schema"]


def load(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((SAMPLES / name).read_text()) if d]


def endpoint(name: str) -> dict:
    [ep] = [d for d in load(name) if d["kind"] == "ModelEndpoint"]
    return ep


def unknown_fields(value, schema: dict, path: str) -> list[str]:
    """Paths in ``value`` that the CRD's structural schema would prune or reject."""
    if schema.get("x-kubernetes-preserve-unknown-fields"):
        return []
    out = []
    if isinstance(value, dict) and schema.get("type") == "object":
        props = schema.get("properties")
        extra = schema.get("additionalProperties")
        for key, child in value.items():
            if props is not None and key in props:
                out += unknown_fields(child, props[key], f"{path}.{key}")
            elif isinstance(extra, dict):
                out += unknown_fields(child, extra, f"{path}.{key}")
            elif props is not None:
                out.append(f"{path}.{key}")
        for key in schema.get("required", []):
            if key not in value:
                out.append(f"{path}.{key} (required, missing)")
    elif isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            out += unknown_fields(item, schema["items"], f"{path}[{i}]")
    return out


SAMPLE_FILES = sorted(p.name for p in SAMPLES.glob("*.yaml"))


def test_the_four_kinds_of_sample_exist():
    endpoints = [n for n in SAMPLE_FILES if any(d["kind"] == "ModelEndpoint" for d in load(n))]
    assert len(endpoints) == 4, endpoints


@pytest.mark.parametrize("name", SAMPLE_FILES)
def test_sample_is_commented_and_uses_only_crd_fields(name):
    text = (SAMPLES / name).read_text()
    assert text.startswith("#"), "a sample starts with a comment saying what it is for"
    assert sum(line.lstrip().startswith("#") for line in text.splitlines()) >= 5
    for doc in load(name):
        assert "namespace" not in doc["metadata"], "samples go to the namespace of kubectl -n"
        if doc["kind"] == "ModelEndpoint":
            assert doc["apiVersion"] == API_VERSION
            assert unknown_fields(doc, SCHEMA, "") == []
        else:
            assert (doc["apiVersion"], doc["kind"]) == ("v1", "Secret")


def test_unknown_fields_would_be_caught():
    # The checker above is not vacuous.
    bad = {"apiVersion": API_VERSION, "kind": "ModelEndpoint", "metadata": {"name": "x"},
           "spec": {"model": "m", "gpu": 1, "engine": {"tensorParallel": 2}}}
    assert unknown_fields(bad, SCHEMA, "") == [".spec.gpu", ".spec.engine.tensorParallel"]


def test_8b_instruct_on_one_gpu_with_ingress_host_and_tls():
    spec = endpoint("qwen2.5-7b-instruct-ingress-tls.yaml")["spec"]
    assert spec["gpus"] == 1
    assert "Instruct" in spec["model"]
    assert spec["ingress"]["enabled"] is True
    assert spec["ingress"]["host"] and spec["ingress"]["tlsSecretName"]


def test_70b_on_four_gpus_with_tensor_parallelism_and_a_cache_pvc():
    spec = endpoint("llama-3.3-70b-instruct-tp4.yaml")["spec"]
    assert "70B" in spec["model"]
    assert spec["gpus"] == 4 and spec["engine"]["tensorParallelSize"] == 4
    assert "size" in spec["modelCache"]


def test_secured_sample_references_the_secrets_beside_it():
    spec = endpoint("secured-endpoint.yaml")["spec"]
    secrets = {s["metadata"]["name"]: s for s in load("secured-endpoint-secrets.yaml")}
    for ref in (spec["apiKeySecretRef"], spec["hfTokenSecretRef"]):
        assert ref["key"] in secrets[ref["name"]]["stringData"], ref
    # The 70B sample's gated model uses the same token Secret.
    hf = endpoint("llama-3.3-70b-instruct-tp4.yaml")["spec"]["hfTokenSecretRef"]
    assert hf["key"] in secrets[hf["name"]]["stringData"]


def test_local_cpu_sample_serves_the_embedded_model_on_the_local_runner():
    spec = endpoint("smollm2-cpu-local.yaml")["spec"]
    assert spec["gpus"] == 0
    assert spec["model"] == embedded_model.HUB_ID
    # No nodeSelector (issue 13, item 12): without GPUs it does not tolerate the GPU nodes'
    # taint, so it lands on the local node, which runs it for real.
    assert "nodeSelector" not in spec and "tolerations" not in spec
    # Its Ingress is on loopback only, and says so to be published without a key.
    assert spec["ingress"]["enabled"] and spec["allowUnauthenticated"] is True


def test_published_samples_have_a_key() -> None:
    """Issue 13, item 7: no sample publishes an anonymous endpoint but the loopback one."""
    for path in sorted(SAMPLES.glob("*.yaml")):
        for obj in load(path.name):
            if obj.get("kind") != "ModelEndpoint":
                continue
            spec = obj["spec"]
            public = (spec.get("ingress") or {}).get("enabled") or (spec.get("service") or {}).get("type") in (
                "LoadBalancer", "NodePort")
            if public and path.name != "smollm2-cpu-local.yaml":
                assert spec.get("apiKeySecretRef"), path.name
