"""The API server itself rejects invalid ModelEndpoints (schema, CEL rules, strict fields).

Only the CRD is needed (no operator): each case goes through `kubectl create
--validate=strict --dry-run=server`, exactly what a user's apply hits, and the
error must name the offending field.
"""

from __future__ import annotations

import json

import pytest

from fixtures_operator import Kubectl, mep

VALID = {"model": "org/model"}

# (id, spec changes or a whole object, field the message must name, extra text expected)
CASES = [
    ("missing-model", {"model": None}, "spec.model", "Required"),
    ("empty-model", {"model": ""}, "spec.model", ""),
    ("negative-replicas", {"replicas": -1}, "spec.replicas", ""),
    ("negative-gpus", {"gpus": -2}, "spec.gpus", ""),
    ("gpu-resource-bare", {"gpuResourceName": "gpu"}, "spec.gpuResourceName", ""),
    ("gpu-resource-memory", {"gpuResourceName": "memory"}, "spec.gpuResourceName", ""),
    ("gpus-not-integer", {"gpus": "two"}, "spec.gpus", ""),
    ("dtype-enum", {"engine": {"dtype": "int3"}}, "spec.engine.dtype", "supported values"),
    ("gpu-mem-zero", {"engine": {"gpuMemoryUtilization": 0}}, "spec.engine.gpuMemoryUtilization",
     ""),
    ("gpu-mem-above-one", {"engine": {"gpuMemoryUtilization": 1.5}},
     "spec.engine.gpuMemoryUtilization", ""),
    ("tp-above-gpus", {"gpus": 2, "engine": {"tensorParallelSize": 4}},
     "spec.engine.tensorParallelSize", "at most gpus"),
    ("tp-with-default-gpus", {"engine": {"tensorParallelSize": 2}},
     "spec.engine.tensorParallelSize", "at most gpus"),
    ("tp-above-one-without-gpus", {"gpus": 0, "engine": {"tensorParallelSize": 2}},
     "spec.engine.tensorParallelSize", "or 1 without GPUs"),
    ("max-model-len-zero", {"engine": {"maxModelLen": 0}}, "spec.engine.maxModelLen", ""),
    ("extra-args-not-strings", {"engine": {"extraArgs": [{"a": 1}]}}, "spec.engine.extraArgs", ""),
    ("pull-policy-enum", {"imagePullPolicy": "Sometimes"}, "spec.imagePullPolicy", ""),
    ("bad-quantity", {"resources": {"limits": {"memory": "lots"}}}, "spec.resources.limits.memory",
     ""),
    ("unknown-resource", {"resources": {"limits": {"nvidia.com/gpu": 1}}}, "spec.resources.limits",
     "unknown field"),
    ("secret-ref-without-key", {"apiKeySecretRef": {"name": "api"}}, "spec.apiKeySecretRef.key",
     "Required"),
    ("cache-both", {"modelCache": {"claimName": "c", "size": "10Gi"}}, "spec.modelCache.claimName",
     "exactly one"),
    ("cache-neither", {"modelCache": {}}, "spec.modelCache.claimName", "exactly one"),
    ("cache-class-without-size", {"modelCache": {"claimName": "c", "storageClassName": "fast"}},
     "spec.modelCache.storageClassName", ""),
    ("shm-not-quantity", {"shmSize": "big"}, "spec.shmSize", ""),
    # Sizes and resources are never negative (a quantity's sign is not accepted).
    ("shm-negative", {"shmSize": "-1Gi"}, "spec.shmSize", ""),
    ("shm-negative-integer", {"shmSize": -1}, "spec.shmSize", ""),
    ("cache-size-negative", {"modelCache": {"size": "-5Gi"}}, "spec.modelCache.size", ""),
    ("cache-size-zero", {"modelCache": {"size": "0Gi"}}, "spec.modelCache.size", "more than zero"),
    ("cache-size-zero-integer", {"modelCache": {"size": 0}}, "spec.modelCache.size", "more than zero"),
    ("cache-size-zero-exponent", {"modelCache": {"size": "0.0e3"}}, "spec.modelCache.size", "more than zero"),
    ("cpu-request-negative", {"resources": {"requests": {"cpu": "-1"}}},
     "spec.resources.requests.cpu", ""),
    ("memory-limit-negative", {"resources": {"limits": {"memory": "-1Gi"}}},
     "spec.resources.limits.memory", ""),
    ("storage-request-plus-sign", {"resources": {"requests": {"ephemeral-storage": "+1Gi"}}},
     "spec.resources.requests.ephemeral-storage", ""),
    ("tls-without-host", {"ingress": {"enabled": True, "tlsSecretName": "t"}},
     "spec.ingress.tlsSecretName", "requires ingress.host"),
    ("ingress-path-relative", {"ingress": {"enabled": True, "path": "v2/x"}}, "spec.ingress.path",
     ""),
    ("service-type-enum", {"service": {"type": "ExternalName"}}, "spec.service.type", ""),
    ("service-port-range", {"service": {"port": 70000}}, "spec.service.port", ""),
    ("toleration-operator", {"tolerations": [{"key": "a", "operator": "Maybe"}]},
     "spec.tolerations[0].operator", ""),
    ("env-value-and-valuefrom", {"env": [{"name": "A", "value": "1",
                                          "valueFrom": {"fieldRef": {"fieldPath": "x"}}}]},
     "spec.env[0].valueFrom", ""),
    ("env-duplicate-name", {"env": [{"name": "A", "value": "1"}, {"name": "A", "value": "2"}]},
     "spec.env[1]", "Duplicate"),
    ("unknown-spec-field", {"replica": 2}, "spec.replica", "unknown field"),
    ("unknown-engine-field", {"engine": {"tensorParalelSize": 1}}, "spec.engine.tensorParalelSize",
     "unknown field"),
    # Issue 13, item 6: what can only break is refused, naming the field.
    ("env-sets-api-key-empty", {"env": [{"name": "API_KEY", "value": ""}]}, "spec.env[0]",
     "spec.env sets API_KEY, which the operator sets"),
    ("env-sets-model-name", {"env": [{"name": "X", "value": "1"}, {"name": "MODEL_NAME", "value": "y"}]},
     "spec.env[1]", "spec.env sets MODEL_NAME"),
    ("env-sets-port", {"env": [{"name": "PORT", "value": "1"}]}, "spec.env[0]", "spec.env sets PORT"),
    ("env-sets-endpoint-id", {"env": [{"name": "ENDPOINT_ID", "value": "x"}]}, "spec.env[0]", "ENDPOINT_ID"),
    ("env-sets-an-engine-field", {"env": [{"name": "MAX_MODEL_LEN", "value": "8"}]}, "spec.env[0]",
     "set engine.maxModelLen instead"),
    ("env-sets-hf-token-twice", {"hfTokenSecretRef": {"name": "h", "key": "k"},
                                 "env": [{"name": "HF_TOKEN", "value": "x"}]}, "spec.env", "keep one"),
    ("extra-args-served-name", {"engine": {"extraArgs": ["--seed", "1", "--served-model-name", "x"]}},
     "spec.engine.extraArgs[2]", "--served-model-name, an option the runtime sets itself"),
    ("extra-args-port-equals", {"engine": {"extraArgs": ["--port=9000"]}}, "spec.engine.extraArgs[0]",
     "--port=9000"),
    ("extra-args-underscores", {"engine": {"extraArgs": ["--api_key", "k"]}}, "spec.engine.extraArgs[0]",
     "--api_key"),
    ("extra-args-config", {"engine": {"extraArgs": ["--config", "f.yaml"]}}, "spec.engine.extraArgs[0]",
     "--config"),
    ("extra-args-host", {"engine": {"extraArgs": ["--host", "1.2.3.4"]}}, "spec.engine.extraArgs[0]", "--host"),
    ("extra-args-short-form", {"engine": {"extraArgs": ["-asc", "2"]}}, "spec.engine.extraArgs[0]", "-asc"),
    ("extra-args-negated", {"engine": {"extraArgs": ["--seed", "1", "--no-enable-request-id-headers"]}},
     "spec.engine.extraArgs[2]", "--no-enable-request-id-headers"),
    ("extra-args-help", {"engine": {"extraArgs": ["-h"]}}, "spec.engine.extraArgs[0]", "-h, an option"),
    # Issue 13, item 7: no anonymous public endpoints by accident.
    ("public-ingress-without-key", {"ingress": {"enabled": True}}, "spec.apiKeySecretRef",
     "allowUnauthenticated: true"),
    ("load-balancer-without-key", {"service": {"type": "LoadBalancer"}}, "spec.apiKeySecretRef",
     "needs apiKeySecretRef"),
    ("node-port-without-key", {"service": {"type": "NodePort"}}, "spec.apiKeySecretRef", "needs apiKeySecretRef"),
    # Autoscaling (issue 12).
    ("autoscaling-min-above-max", {"autoscaling": {"minReplicas": 3, "maxReplicas": 2}},
     "spec.autoscaling.minReplicas", "at most autoscaling.maxReplicas"),
    ("autoscaling-max-zero", {"autoscaling": {"minReplicas": 0, "maxReplicas": 0}}, "spec.autoscaling.maxReplicas",
     ""),
    ("autoscaling-without-max", {"autoscaling": {"minReplicas": 0}}, "spec.autoscaling.maxReplicas", "Required"),
    ("autoscaling-target-zero", {"autoscaling": {"maxReplicas": 2, "targetRequests": 0}},
     "spec.autoscaling.targetRequests", ""),
    ("autoscaling-negative-delay", {"autoscaling": {"maxReplicas": 2, "scaleDownDelaySeconds": -1}},
     "spec.autoscaling.scaleDownDelaySeconds", ""),
    # Issue 14.
    ("chat-template-both", {"engine": {"chatTemplate": {"inline": "x", "configMapRef": {"name": "a", "key": "b"}}}},
     "spec.engine.chatTemplate.inline", "exactly one"),
    ("auto-tool-choice-without-parser", {"engine": {"enableAutoToolChoice": True}},
     "spec.engine.toolCallParser", "needs engine.toolCallParser"),
    ("task-enum", {"task": "speech"}, "spec.task", ""),
    ("adapter-named-like-the-model", {"adapters": [{"name": "org/model", "source": "x/y"}]}, "spec.adapters",
     "must differ from the served model name"),
    ("adapter-duplicate", {"adapters": [{"name": "a", "source": "x"}, {"name": "a", "source": "y"}]},
     "spec.adapters[1]", "Duplicate"),
    ("balancing-strategy-enum", {"loadBalancing": {"strategy": "Random"}}, "spec.loadBalancing.strategy", ""),
    ("prefix-hash-load-below-mean", {"loadBalancing": {"prefixHash": {"meanLoadPercentage": 90}}},
     "spec.loadBalancing.prefixHash.meanLoadPercentage", ""),
]


def _spec(changes: dict) -> dict:
    spec = dict(VALID)
    for key, value in changes.items():
        if value is None:
            spec.pop(key, None)
        else:
            spec[key] = value
    return spec


def _create(kubectl: Kubectl, obj: dict):
    return kubectl.run("create", "--validate=strict", "--dry-run=server", "-o", "json", "-f", "-",
                       input=json.dumps(obj))


@pytest.mark.parametrize("changes,field,text", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_invalid_modelendpoint_is_rejected_naming_the_field(
    kubectl: Kubectl, mep_crds, changes: dict, field: str, text: str
) -> None:
    proc = _create(kubectl, mep("bad", "default", **_spec(changes)))
    assert proc.returncode != 0, f"accepted: {proc.stdout[:300]}"
    assert field in proc.stderr, proc.stderr
    assert text in proc.stderr, proc.stderr


def test_name_that_cannot_name_a_service_is_rejected(kubectl: Kubectl, mep_crds) -> None:
    proc = _create(kubectl, mep("model.v1", "default", **VALID))
    assert proc.returncode != 0
    assert "metadata.name" in proc.stderr and "DNS-1035" in proc.stderr, proc.stderr


def test_valid_objects_are_accepted_with_defaults(kubectl: Kubectl, mep_crds) -> None:
    proc = _create(kubectl, mep("ok", "default", model="org/m", gpus=4,
                                engine={"tensorParallelSize": 4, "enablePrefixCaching": True,
                                        "toolCallParser": "hermes",
                                        "enableAutoToolChoice": True, "chatTemplate": {"inline": "{{ x }}"},
                                        "extraArgs": ["--seed", "1", "--max-num-batched-tokens=4096"]},
                                env=[{"name": "ENABLE_CHUNKED_PREFILL", "value": "true"}],
                                modelCache={"size": "100Gi", "storageClassName": "fast"},
                                apiKeySecretRef={"name": "keys", "key": "api"},
                                autoscaling={"minReplicas": 0, "maxReplicas": 3},
                                task="generate", adapters=[{"name": "sql", "source": "org/sql-lora"}],
                                ingress={"enabled": True, "host": "a.example.com",
                                         "tlsSecretName": "t"}))
    assert proc.returncode == 0, proc.stderr
    spec = json.loads(proc.stdout)["spec"]
    assert spec["replicas"] == 1 and spec["responseRole"] == "assistant"
    assert spec["rawOpenAIOutput"] is True and spec["shmSize"] == "8Gi"
    assert spec["gpuResourceName"] == "nvidia.com/gpu"
    assert spec["service"] == {"type": "ClusterIP", "port": 80}
    assert spec["autoscaling"] == {"minReplicas": 0, "maxReplicas": 3, "targetRequests": 8,
                                   "scaleDownDelaySeconds": 300}
    assert spec["loadBalancing"] == {"strategy": "LeastRequests", "prefixHash": {
        "meanLoadPercentage": 125, "replication": 256, "prefixCharLength": 100}}
    # CPU-only endpoints are valid (gpus: 0).
    proc = _create(kubectl, mep("cpu", "default", model="org/m", gpus=0))
    assert proc.returncode == 0, proc.stderr
    # ... with tensorParallelSize 1 said explicitly, and a cache of a small positive size.
    proc = _create(kubectl, mep("cpu-tp", "default", model="org/m", gpus=0, engine={"tensorParallelSize": 1},
                                modelCache={"size": "0.5Gi"}))
    assert proc.returncode == 0, proc.stderr
    proc = _create(kubectl, mep("cache-int", "default", model="org/m", modelCache={"size": 1073741824}))
    assert proc.returncode == 0, proc.stderr
    # Published without a key, said explicitly.
    proc = _create(kubectl, mep("open", "default", model="org/m", allowUnauthenticated=True,
                                ingress={"enabled": True}, service={"type": "LoadBalancer"}))
    assert proc.returncode == 0, proc.stderr
