"""Child manifests of a ModelEndpoint, and the runtime container's environment (pure; no I/O).

Every function takes the ModelEndpoint object (a dict as the API server
returns it) and the operator settings, and returns plain dicts ready for
server-side apply. Fields are only set when the spec asks for them, so the
applied configuration is stable: applying it again changes nothing.
"""

from __future__ import annotations

import shlex
from typing import Any

import kopf

from . import constants as c
from .settings import OperatorSettings
from .spec import default_ingress_path, served_model_name, tensor_parallel_size, with_defaults


def _bool(value: bool) -> str:
    return "1" if value else "0"


def labels(name: str) -> dict[str, str]:
    """Labels of every child of ModelEndpoint ``name`` (and of its pods)."""
    return {
        c.LABEL_NAME: c.NAME_VALUE,
        c.LABEL_INSTANCE: name,
        c.LABEL_COMPONENT: c.COMPONENT_VALUE,
        c.LABEL_MANAGED_BY: c.MANAGED_BY_VALUE,
        c.LABEL_ENDPOINT: name,
    }


def selector_labels(name: str) -> dict[str, str]:
    """The Deployment's (immutable) selector and the Service's selector."""
    return {c.LABEL_ENDPOINT: name}


def selector_string(name: str) -> str:
    return ",".join(f"{k}={v}" for k, v in selector_labels(name).items())


def pvc_name(name: str) -> str:
    return f"{name}{c.PVC_SUFFIX}"


def _metadata(owner: dict[str, Any], name: str, extra_annotations: dict | None = None) -> dict:
    meta: dict[str, Any] = {
        "name": name,
        "namespace": owner["metadata"]["namespace"],
        "labels": labels(owner["metadata"]["name"]),
    }
    if extra_annotations:
        meta["annotations"] = dict(extra_annotations)
    return meta


def _owned(obj: dict[str, Any], owner: dict[str, Any]) -> dict[str, Any]:
    ref_owner = {
        "apiVersion": owner.get("apiVersion", c.API_VERSION),
        "kind": owner.get("kind", c.KIND),
        "metadata": {"name": owner["metadata"]["name"], "uid": owner["metadata"]["uid"]},
    }
    kopf.append_owner_reference(obj, owner=ref_owner, controller=True, block_owner_deletion=True)
    return obj


def drain_seconds(spec: dict[str, Any]) -> int:
    return int(with_defaults(spec)["drainTimeoutSeconds"])


def grace_period_seconds(spec: dict[str, Any]) -> int:
    return c.PRESTOP_SLEEP_SECONDS + drain_seconds(spec) + c.GRACE_MARGIN_SECONDS


def container_env(owner: dict[str, Any]) -> list[dict[str, Any]]:
    """The runtime container's env: every spec field as the runtime variable it maps to.

    Secrets reach the container through ``secretKeyRef`` only. A ``spec.env``
    entry named like an operator-set variable replaces it (same position);
    the others follow in their order.
    """
    name = owner["metadata"]["name"]
    spec = with_defaults(owner.get("spec"))
    engine = spec["engine"]
    env: list[dict[str, Any]] = [
        {"name": "MODEL_NAME", "value": spec["model"]},
        {"name": "ENDPOINT_ID", "value": name},
        {"name": "HOST", "value": "0.0.0.0"},
        {"name": "PORT", "value": str(c.RUNTIME_PORT)},
        {"name": "OPENAI_RESPONSE_ROLE", "value": spec["responseRole"]},
        {"name": "RAW_OPENAI_OUTPUT", "value": _bool(spec["rawOpenAIOutput"])},
    ]
    if spec.get("servedModelName"):
        env.append({"name": "OPENAI_SERVED_MODEL_NAME_OVERRIDE", "value": spec["servedModelName"]})
    tp = tensor_parallel_size(spec)
    if tp is not None:
        env.append({"name": "TENSOR_PARALLEL_SIZE", "value": str(tp)})
    scalar_engine = (
        ("maxModelLen", "MAX_MODEL_LEN", str),
        ("dtype", "DTYPE", str),
        ("gpuMemoryUtilization", "GPU_MEMORY_UTILIZATION", lambda v: repr(float(v))),
        ("quantization", "QUANTIZATION", str),
        ("enforceEager", "ENFORCE_EAGER", _bool),
        ("trustRemoteCode", "TRUST_REMOTE_CODE", _bool),
        ("maxNumSeqs", "MAX_NUM_SEQS", str),
    )
    for field, var, fmt in scalar_engine:
        if engine.get(field) is not None:
            env.append({"name": var, "value": fmt(engine[field])})
    if engine.get("extraArgs"):
        env.append({"name": "VLLM_EXTRA_ARGS", "value": shlex.join(engine["extraArgs"])})
    env.append({"name": "DRAIN_TIMEOUT_SECONDS", "value": str(drain_seconds(spec))})
    env.append({"name": "HF_HOME", "value": c.HF_HOME})
    for field, var in (("hfTokenSecretRef", "HF_TOKEN"), ("apiKeySecretRef", "API_KEY")):
        ref = spec.get(field)
        if ref:
            env.append({
                "name": var,
                "valueFrom": {"secretKeyRef": {"name": ref["name"], "key": ref["key"]}},
            })
    user = list(spec.get("env") or [])
    by_name = {e["name"]: e for e in user}
    merged = [by_name.pop(e["name"], e) for e in env]
    merged.extend(e for e in user if e["name"] in by_name)
    return merged


def _resources(spec: dict[str, Any]) -> dict[str, Any]:
    res = spec.get("resources") or {}
    out: dict[str, Any] = {}
    for part in ("requests", "limits"):
        values = {k: v for k, v in (res.get(part) or {}).items() if v is not None}
        if values:
            out[part] = values
    gpus = int(spec["gpus"])
    if gpus > 0:
        out.setdefault("limits", {})[spec["gpuResourceName"]] = gpus
    return out


def _http_probe(path: str, *, period: int, timeout: int, failures: int) -> dict[str, Any]:
    return {
        "httpGet": {"path": path, "port": c.RUNTIME_PORT_NAME},
        "periodSeconds": period,
        "timeoutSeconds": timeout,
        "failureThreshold": failures,
    }


def pod_template(owner: dict[str, Any], settings: OperatorSettings) -> dict[str, Any]:
    name = owner["metadata"]["name"]
    spec = with_defaults(owner.get("spec"))
    cache = spec.get("modelCache") or {}
    if cache.get("claimName"):
        cache_volume = {"name": c.CACHE_VOLUME, "persistentVolumeClaim": {"claimName": cache["claimName"]}}
    elif cache.get("size") is not None:
        cache_volume = {"name": c.CACHE_VOLUME, "persistentVolumeClaim": {"claimName": pvc_name(name)}}
    else:
        cache_volume = {"name": c.CACHE_VOLUME, "emptyDir": {}}
    container: dict[str, Any] = {
        "name": c.RUNTIME_CONTAINER,
        "image": spec.get("image") or settings.default_runtime_image,
        "imagePullPolicy": spec.get("imagePullPolicy") or settings.default_image_pull_policy,
        "ports": [{"name": c.RUNTIME_PORT_NAME, "containerPort": c.RUNTIME_PORT, "protocol": "TCP"}],
        "env": container_env(owner),
        # Patient: downloading and loading a large model takes long; liveness starts after it.
        "startupProbe": _http_probe(
            c.READY_PATH, period=c.STARTUP_PERIOD_SECONDS, timeout=5,
            failures=c.STARTUP_FAILURE_THRESHOLD,
        ),
        "readinessProbe": _http_probe(c.READY_PATH, period=5, timeout=3, failures=3),
        "livenessProbe": _http_probe(c.HEALTH_PATH, period=10, timeout=5, failures=6),
        "lifecycle": {"preStop": {"sleep": {"seconds": c.PRESTOP_SLEEP_SECONDS}}},
        "volumeMounts": [
            {"name": c.SHM_VOLUME, "mountPath": c.SHM_PATH},
            {"name": c.CACHE_VOLUME, "mountPath": c.HF_HOME},
        ],
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "runAsNonRoot": True,
            "capabilities": {"drop": ["ALL"]},
        },
    }
    if spec.get("envFrom"):
        container["envFrom"] = spec["envFrom"]
    resources = _resources(spec)
    if resources:
        container["resources"] = resources
    pod: dict[str, Any] = {
        "terminationGracePeriodSeconds": grace_period_seconds(spec),
        # Docker-link variables (FOO_SERVICE_HOST, ...) would mix with the runtime's own.
        "enableServiceLinks": False,
        "automountServiceAccountToken": False,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": c.RUNTIME_UID,
            "runAsGroup": c.RUNTIME_GID,
            "fsGroup": c.RUNTIME_GID,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [container],
        "volumes": [
            {"name": c.SHM_VOLUME, "emptyDir": {"medium": "Memory", "sizeLimit": spec["shmSize"]}},
            cache_volume,
        ],
    }
    for field in ("nodeSelector", "tolerations", "affinity", "priorityClassName", "runtimeClassName",
                  "imagePullSecrets"):
        if spec.get(field):
            pod[field] = spec[field]
    return {"metadata": {"labels": labels(name)}, "spec": pod}


def deployment(owner: dict[str, Any], settings: OperatorSettings) -> dict[str, Any]:
    name = owner["metadata"]["name"]
    spec = with_defaults(owner.get("spec"))
    obj = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _metadata(owner, name),
        "spec": {
            "replicas": int(spec["replicas"]),
            "selector": {"matchLabels": selector_labels(name)},
            "revisionHistoryLimit": 3,
            # Beyond the startup probe's patience, so a slow model load isn't "stuck".
            "progressDeadlineSeconds": c.STARTUP_PERIOD_SECONDS * c.STARTUP_FAILURE_THRESHOLD + 600,
            # Keep serving while rolling: a new pod must be ready before an old one goes.
            "strategy": {
                "type": "RollingUpdate",
                "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1},
            },
            "template": pod_template(owner, settings),
        },
    }
    return _owned(obj, owner)


def service(owner: dict[str, Any], settings: OperatorSettings) -> dict[str, Any]:
    name = owner["metadata"]["name"]
    svc = with_defaults(owner.get("spec"))["service"]
    obj = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(owner, name),
        "spec": {
            "type": svc["type"],
            "selector": selector_labels(name),
            "ports": [{
                "name": "http",
                "port": int(svc["port"]),
                "targetPort": c.RUNTIME_PORT_NAME,
                "protocol": "TCP",
            }],
        },
    }
    return _owned(obj, owner)


def ingress_path(owner: dict[str, Any]) -> str:
    ing = with_defaults(owner.get("spec"))["ingress"]
    return ing.get("path") or default_ingress_path(owner["metadata"]["name"])


def ingress(owner: dict[str, Any], settings: OperatorSettings) -> dict[str, Any] | None:
    name = owner["metadata"]["name"]
    spec = with_defaults(owner.get("spec"))
    ing = spec["ingress"]
    if not ing.get("enabled"):
        return None
    rule: dict[str, Any] = {
        "http": {
            "paths": [{
                "path": ingress_path(owner),
                "pathType": "Prefix",
                "backend": {"service": {"name": name, "port": {"name": "http"}}},
            }]
        }
    }
    if ing.get("host"):
        rule = {"host": ing["host"], **rule}
    body: dict[str, Any] = {"rules": [rule]}
    class_name = ing.get("className") or settings.default_ingress_class
    if class_name:
        body = {"ingressClassName": class_name, **body}
    if ing.get("tlsSecretName"):
        body["tls"] = [{"hosts": [ing["host"]], "secretName": ing["tlsSecretName"]}]
    obj = {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "Ingress",
        "metadata": _metadata(owner, name, ing.get("annotations")),
        "spec": body,
    }
    return _owned(obj, owner)


def pvc(owner: dict[str, Any], settings: OperatorSettings) -> dict[str, Any] | None:
    """The model-cache PVC the operator creates (modelCache.size); None otherwise."""
    name = owner["metadata"]["name"]
    cache = with_defaults(owner.get("spec")).get("modelCache") or {}
    if cache.get("size") is None:
        return None
    spec: dict[str, Any] = {
        "accessModes": [cache.get("accessMode") or "ReadWriteOnce"],
        "resources": {"requests": {"storage": cache["size"]}},
    }
    if cache.get("storageClassName") is not None:
        spec["storageClassName"] = cache["storageClassName"]
    obj = {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": _metadata(owner, pvc_name(name)),
        "spec": spec,
    }
    return _owned(obj, owner)


# Kinds of children, in apply order. The Deployment, the only child that starts pods
# (and takes GPUs), comes last: a spec found unworkable at another child (a name taken
# by someone else's object, a child the API server rejects) starts no pods. The PVC
# comes before the pods that mount it.
CHILD_KINDS: tuple[tuple[str, str], ...] = (
    ("v1", "Service"),
    ("networking.k8s.io/v1", "Ingress"),
    ("v1", "PersistentVolumeClaim"),
    ("apps/v1", "Deployment"),
)


def children(owner: dict[str, Any], settings: OperatorSettings) -> dict[str, dict[str, Any] | None]:
    """Kind -> desired manifest, or None for a kind this spec must not have."""
    return {
        "PersistentVolumeClaim": pvc(owner, settings),
        "Deployment": deployment(owner, settings),
        "Service": service(owner, settings),
        "Ingress": ingress(owner, settings),
    }


def child_name(owner_name: str, kind: str) -> str:
    return pvc_name(owner_name) if kind == "PersistentVolumeClaim" else owner_name


def urls(owner: dict[str, Any], settings: OperatorSettings) -> tuple[str, str | None]:
    """(in-cluster base URL, external base URL or None); both end where the OpenAI SDK wants."""
    name = owner["metadata"]["name"]
    ns = owner["metadata"]["namespace"]
    spec = with_defaults(owner.get("spec"))
    port = int(spec["service"]["port"])
    port_part = "" if port == 80 else f":{port}"
    url = f"http://{name}.{ns}.svc.{settings.cluster_domain}{port_part}{default_ingress_path(name)}"
    ing = spec["ingress"]
    external = None
    if ing.get("enabled") and ing.get("host"):
        scheme = "https" if ing.get("tlsSecretName") else "http"
        path = ingress_path(owner).rstrip("/") or "/"
        runtime_path = default_ingress_path(name)
        if path.endswith("/openai/v1"):
            ext_path = path
        elif runtime_path.startswith(path):
            ext_path = runtime_path  # a shorter prefix ("/", "/v2") routes the full path
        elif "/openai/v1".startswith(path):
            ext_path = "/openai/v1"
        else:
            ext_path = path
        external = f"{scheme}://{ing['host']}{ext_path}"
    return url, external


def summary(owner: dict[str, Any]) -> dict[str, Any]:
    """Fields of the status that follow from the spec alone."""
    spec = with_defaults(owner.get("spec"))
    return {"servedModelName": served_model_name(spec)}


def differs(desired: Any, live: Any) -> bool:
    """True when ``live`` lacks a value ``desired`` sets (extra live fields are fine).

    Scalars compare as strings (the API server turns quantities like 1 into "1");
    a false positive only costs one no-op apply.
    """
    if isinstance(desired, dict):
        if not isinstance(live, dict):
            return True
        return any(differs(v, live.get(k)) for k, v in desired.items())
    if isinstance(desired, list):
        if not isinstance(live, list) or len(live) != len(desired):
            return True
        return any(differs(d, x) for d, x in zip(desired, live))
    if live is None:
        return desired is not None
    return str(desired) != str(live)


def metadata_differs(desired: dict[str, Any], live: dict[str, Any]) -> bool:
    """True when ``live`` lacks a label, annotation or ownerReference that ``desired`` sets.

    Labels and annotations others add are fine; ownerReferences are compared by
    uid (others' references are left alone, as server-side apply does).
    """
    want = desired.get("metadata") or {}
    have = live.get("metadata") or {}
    for field in ("labels", "annotations"):
        if differs(want.get(field) or {}, have.get(field) or {}):
            return True
    refs = {r.get("uid"): r for r in have.get("ownerReferences") or []}
    return any(differs(ref, refs.get(ref.get("uid"))) for ref in want.get("ownerReferences") or [])

