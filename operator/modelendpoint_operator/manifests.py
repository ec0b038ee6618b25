"""Child manifests of a ModelEndpoint, and the runtime container's environment (pure; no I/O).

Every function takes the ModelEndpoint as the operator reads it (``spec.Endpoint``:
its identity and typed spec) and the operator settings, and returns plain dicts
ready for server-side apply. Fields are only set when the spec asks for them, so
the applied configuration is stable: applying it again changes nothing.
"""

from __future__ import annotations

import hashlib
import json
import shlex
from typing import Any

import kopf
from kubernetes.utils.quantity import parse_quantity

from . import constants as c
from .settings import OperatorSettings
from .spec import ENGINE_FIELDS_BY_RULE, TASK_OPTIONS, Endpoint, default_ingress_path, engine_value, engine_variable


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


def adapters_name(name: str) -> str:
    return f"{name}{c.ADAPTERS_SUFFIX}"


def _metadata(ep: Endpoint, name: str, extra_annotations: dict[str, str] | None = None) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": ep.namespace, "labels": labels(ep.name)}
    if extra_annotations:
        meta["annotations"] = dict(extra_annotations)
    return meta


def _owned(obj: dict[str, Any], ep: Endpoint) -> dict[str, Any]:
    owner = kopf.Body({"apiVersion": ep.api_version, "kind": ep.kind, "metadata": {"name": ep.name, "uid": ep.uid}})
    kopf.append_owner_reference(obj, owner=owner, controller=True, block_owner_deletion=True)
    return obj


def grace_period_seconds(ep: Endpoint) -> int:
    return c.PRESTOP_SLEEP_SECONDS + ep.spec.drain_timeout_seconds + c.GRACE_MARGIN_SECONDS


def _flag(value: bool) -> str:
    return "1" if value else "0"


def container_env(ep: Endpoint) -> list[dict[str, Any]]:
    """The runtime container's env: the spec's fields as the runtime variables they map to.

    Engine fields follow the one rule (``spec.engine_variable``). Secrets reach the
    container only by reference: the Hugging Face token through ``secretKeyRef``, the
    API keys as a mounted file (``API_KEY_FILE``) that the runtime re-reads, so a key
    rotated in the Secret reaches running pods without a restart. ``spec.env`` comes
    last; the CRD refuses entries that name a variable the operator sets, and such an
    entry in an object stored before that rule existed is ignored.
    """
    spec = ep.spec
    env: list[dict[str, Any]] = [
        {"name": "MODEL_NAME", "value": spec.model},
        {"name": "ENDPOINT_ID", "value": ep.name},
        {"name": "HOST", "value": "0.0.0.0"},
        {"name": "PORT", "value": str(c.RUNTIME_PORT)},
        {"name": "METRICS_PORT", "value": str(c.RUNTIME_METRICS_PORT)},
        {"name": "OPENAI_RESPONSE_ROLE", "value": spec.response_role},
        {"name": "RAW_OPENAI_OUTPUT", "value": _flag(spec.raw_openai_output)},
    ]
    if spec.served_model_name:
        env.append({"name": "OPENAI_SERVED_MODEL_NAME_OVERRIDE", "value": spec.served_model_name})
    tp = spec.tensor_parallel
    if tp is not None:
        env.append({"name": "TENSOR_PARALLEL_SIZE", "value": str(tp)})
    for field in ENGINE_FIELDS_BY_RULE:
        value = getattr(spec.engine, field)
        if field != "tensor_parallel_size" and value is not None:
            env.append({"name": engine_variable(field), "value": engine_value(value)})
    template = spec.engine.chat_template
    if template is not None:
        env.append({"name": "CHAT_TEMPLATE", "value": template.inline if template.inline is not None
                    else f"{c.CHAT_TEMPLATE_DIR}/{c.CHAT_TEMPLATE_FILE_NAME}"})
    for var, value in TASK_OPTIONS.get(spec.task or "", {}).items():
        env.append({"name": var, "value": value})
    if spec.adapters is not None:
        env.append({"name": "ENABLE_LORA", "value": "true"})
        env.append({"name": "ADAPTERS_FILE", "value": c.ADAPTERS_FILE})
    if spec.engine.extra_args:
        env.append({"name": "VLLM_EXTRA_ARGS", "value": shlex.join(spec.engine.extra_args)})
    env.append({"name": "DRAIN_TIMEOUT_SECONDS", "value": str(spec.drain_timeout_seconds)})
    env.append({"name": "HF_HOME", "value": c.HF_HOME})
    if spec.hf_token_secret_ref:
        ref = spec.hf_token_secret_ref
        env.append({"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}}})
    if spec.api_key_secret_ref:
        env.append({"name": "API_KEY_FILE", "value": c.API_KEY_FILE})
    refused = {e["name"] for e in env} | set(c.OPERATOR_SET_VARIABLES)
    user = [e.wire() for e in spec.env or [] if e.name not in refused]
    named = {e["name"] for e in user}
    env.extend({"name": k, "value": v} for k, v in overridable_env(ep).items() if k not in named)
    env.extend(user)
    return env


def overridable_env(ep: Endpoint) -> dict[str, str]:
    """Variables the operator sets unless ``spec.env`` names them."""
    out = {"HOME": c.RUNTIME_HOME}  # writable (a volume) in any image, the root being read-only
    if ep.spec.gpus == 0:
        # vLLM's CPU backend binds its compute threads to cores it picks from the whole
        # machine ("auto"): every such pod on a node would pick the same cores (measured:
        # three engines on core 0 of two, a fourth never finishing its load). Unbound, the
        # kernel spreads them. Where the kubelet's static CPU manager gives a pod its own
        # cores, spec.env sets "auto" (or a core list) back.
        out["VLLM_CPU_OMP_THREADS_BIND"] = "nobind"
    return out


def _resources(ep: Endpoint) -> dict[str, Any]:
    spec = ep.spec
    out: dict[str, Any] = {}
    for part in ("requests", "limits"):
        values = getattr(spec.resources, part).wire() if spec.resources and getattr(spec.resources, part) else {}
        if values:
            out[part] = values
    if spec.gpus > 0:
        out.setdefault("limits", {})[spec.gpu_resource_name] = spec.gpus
    return out


def _tolerations(ep: Endpoint) -> list[dict[str, Any]]:
    """The spec's tolerations, plus, for a GPU pod, the toleration of the GPU nodes' taint.

    GPU node pools are tainted (``nvidia.com/gpu=present:NoSchedule`` on managed
    clusters) so that only pods asking for GPUs land there; the ExtendedResourceToleration
    admission plugin adds this toleration where it is enabled, and many clusters don't
    enable it, so the operator adds it itself (operator Exists: any value of the taint).
    """
    out = [t.wire() for t in ep.spec.tolerations or []]
    if ep.spec.gpus > 0:
        gpu = {"key": ep.spec.gpu_resource_name, "operator": "Exists", "effect": "NoSchedule"}
        if gpu not in out:
            out.append(gpu)
    return out


def _http_probe(path: str, *, period: int, timeout: int, failures: int) -> dict[str, Any]:
    return {
        "httpGet": {"path": path, "port": c.RUNTIME_PORT_NAME},
        "periodSeconds": period,
        "timeoutSeconds": timeout,
        "failureThreshold": failures,
    }


def pod_template(ep: Endpoint, settings: OperatorSettings) -> dict[str, Any]:
    spec = ep.spec
    cache = spec.model_cache
    if cache and cache.claim_name:
        cache_volume: dict[str, Any] = {"name": c.CACHE_VOLUME,
                                        "persistentVolumeClaim": {"claimName": cache.claim_name}}
    elif cache and cache.size is not None:
        cache_volume = {"name": c.CACHE_VOLUME, "persistentVolumeClaim": {"claimName": pvc_name(ep.name)}}
    else:
        cache_volume = {"name": c.CACHE_VOLUME, "emptyDir": {}}
    volumes: list[dict[str, Any]] = [
        {"name": c.SHM_VOLUME, "emptyDir": {"medium": "Memory", "sizeLimit": spec.shm_size}},
        cache_volume,
        {"name": c.TMP_VOLUME, "emptyDir": {}},
        {"name": c.HOME_VOLUME, "emptyDir": {}},
    ]
    mounts: list[dict[str, Any]] = [
        {"name": c.SHM_VOLUME, "mountPath": c.SHM_PATH},
        {"name": c.CACHE_VOLUME, "mountPath": c.HF_HOME},
        {"name": c.TMP_VOLUME, "mountPath": c.TMP_PATH},
        {"name": c.HOME_VOLUME, "mountPath": c.RUNTIME_HOME},
    ]
    if spec.api_key_secret_ref:
        # The kubelet updates a Secret volume in place (an atomic symlink swap) when the
        # Secret changes; the runtime re-reads the file. 0440 + fsGroup: readable by the
        # runtime's group only.
        volumes.append({"name": c.API_KEY_VOLUME, "secret": {
            "secretName": spec.api_key_secret_ref.name, "defaultMode": 0o440,
            "items": [{"key": spec.api_key_secret_ref.key, "path": c.API_KEY_FILE_NAME}]}})
        mounts.append({"name": c.API_KEY_VOLUME, "mountPath": c.API_KEY_DIR, "readOnly": True})
    template = spec.engine.chat_template
    if template is not None and template.config_map_ref is not None:
        volumes.append({"name": c.CHAT_TEMPLATE_VOLUME, "configMap": {
            "name": template.config_map_ref.name,
            "items": [{"key": template.config_map_ref.key, "path": c.CHAT_TEMPLATE_FILE_NAME}]}})
        mounts.append({"name": c.CHAT_TEMPLATE_VOLUME, "mountPath": c.CHAT_TEMPLATE_DIR, "readOnly": True})
    if spec.adapters is not None:
        # The kubelet updates a ConfigMap volume in place: the runtime sees the new list and
        # loads or unloads adapters without a restart.
        volumes.append({"name": c.ADAPTERS_VOLUME, "configMap": {"name": adapters_name(ep.name)}})
        mounts.append({"name": c.ADAPTERS_VOLUME, "mountPath": c.ADAPTERS_DIR, "readOnly": True})
    container: dict[str, Any] = {
        "name": c.RUNTIME_CONTAINER,
        "image": spec.image or settings.default_runtime_image,
        "imagePullPolicy": spec.image_pull_policy or settings.default_image_pull_policy,
        "ports": [
            {"name": c.RUNTIME_PORT_NAME, "containerPort": c.RUNTIME_PORT, "protocol": "TCP"},
            {"name": c.RUNTIME_METRICS_PORT_NAME, "containerPort": c.RUNTIME_METRICS_PORT, "protocol": "TCP"},
        ],
        "env": container_env(ep),
        # Patient: downloading and loading a large model takes long; liveness starts after it.
        "startupProbe": _http_probe(
            c.READY_PATH, period=c.STARTUP_PERIOD_SECONDS, timeout=5, failures=c.STARTUP_FAILURE_THRESHOLD,
        ),
        "readinessProbe": _http_probe(c.READY_PATH, period=5, timeout=3, failures=3),
        "livenessProbe": _http_probe(c.HEALTH_PATH, period=10, timeout=5, failures=6),
        "lifecycle": {"preStop": {"sleep": {"seconds": c.PRESTOP_SLEEP_SECONDS}}},
        "volumeMounts": mounts,
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "runAsNonRoot": True,
            "capabilities": {"drop": ["ALL"]},
        },
    }
    if spec.env_from:
        container["envFrom"] = [e.wire() for e in spec.env_from]
    resources = _resources(ep)
    if resources:
        container["resources"] = resources
    pod: dict[str, Any] = {
        "terminationGracePeriodSeconds": grace_period_seconds(ep),
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
        "volumes": volumes,
    }
    tolerations = _tolerations(ep)
    if tolerations:
        pod["tolerations"] = tolerations
    if spec.node_selector:
        pod["nodeSelector"] = dict(spec.node_selector)
    if spec.affinity:
        pod["affinity"] = dict(spec.affinity)
    if spec.priority_class_name:
        pod["priorityClassName"] = spec.priority_class_name
    if spec.runtime_class_name:
        pod["runtimeClassName"] = spec.runtime_class_name
    if spec.image_pull_secrets:
        pod["imagePullSecrets"] = [s.wire() for s in spec.image_pull_secrets]
    return {"metadata": {"labels": labels(ep.name)}, "spec": pod}


def deployment(ep: Endpoint, settings: OperatorSettings, replicas: int | None = None) -> dict[str, Any]:
    """The runtime Deployment; ``replicas`` is the autoscaler's count (else spec.replicas)."""
    obj = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _metadata(ep, ep.name),
        "spec": {
            "replicas": ep.spec.replicas if replicas is None else replicas,
            "selector": {"matchLabels": selector_labels(ep.name)},
            "revisionHistoryLimit": 3,
            # Beyond the startup probe's patience, so a slow model load isn't "stuck".
            "progressDeadlineSeconds": c.STARTUP_PERIOD_SECONDS * c.STARTUP_FAILURE_THRESHOLD + 600,
            # Keep serving while rolling: a new pod must be ready before an old one goes.
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
            "template": pod_template(ep, settings),
        },
    }
    return _owned(obj, ep)


def service(ep: Endpoint, settings: OperatorSettings) -> dict[str, Any]:
    obj = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(ep, ep.name),
        "spec": {
            "type": ep.spec.service.type,
            "selector": selector_labels(ep.name),
            # The metrics port is left out on purpose: it answers without a key.
            "ports": [{"name": "http", "port": ep.spec.service.port, "targetPort": c.RUNTIME_PORT_NAME,
                       "protocol": "TCP"}],
        },
    }
    return _owned(obj, ep)


def ingress_path(ep: Endpoint) -> str:
    return ep.spec.ingress.path or default_ingress_path(ep.name)


def ingress(ep: Endpoint, settings: OperatorSettings) -> dict[str, Any] | None:
    ing = ep.spec.ingress
    if not ing.enabled:
        return None
    rule: dict[str, Any] = {"http": {"paths": [{
        "path": ingress_path(ep),
        "pathType": "Prefix",
        "backend": {"service": {"name": ep.name, "port": {"name": "http"}}},
    }]}}
    if ing.host:
        rule = {"host": ing.host, **rule}
    body: dict[str, Any] = {"rules": [rule]}
    class_name = ing.class_name or settings.default_ingress_class
    if class_name:
        body = {"ingressClassName": class_name, **body}
    if ing.tls_secret_name:
        body["tls"] = [{"hosts": [ing.host], "secretName": ing.tls_secret_name}]
    obj = {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "Ingress",
        "metadata": _metadata(ep, ep.name, ing.annotations),
        "spec": body,
    }
    return _owned(obj, ep)


def pvc(ep: Endpoint, settings: OperatorSettings) -> dict[str, Any] | None:
    """The model-cache PVC the operator creates (modelCache.size); None otherwise."""
    cache = ep.spec.model_cache
    if cache is None or cache.size is None:
        return None
    spec: dict[str, Any] = {
        "accessModes": [cache.access_mode or "ReadWriteOnce"],
        "resources": {"requests": {"storage": cache.size}},
    }
    if cache.storage_class_name is not None:
        spec["storageClassName"] = cache.storage_class_name
    obj = {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": _metadata(ep, pvc_name(ep.name)),
        "spec": spec,
    }
    return _owned(obj, ep)


def adapters_config_map(ep: Endpoint, settings: OperatorSettings) -> dict[str, Any] | None:
    """The list of LoRA adapters the runtime loads (spec.adapters); None without the field."""
    if ep.spec.adapters is None:
        return None
    listing = [{"name": a.name, "source": a.source} for a in ep.spec.adapters]
    obj = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(ep, adapters_name(ep.name)),
        "data": {c.ADAPTERS_FILE_NAME: json.dumps(listing, indent=1)},
    }
    return _owned(obj, ep)


# Kinds of children, in apply order. The Deployment, the only child that starts pods
# (and takes GPUs), comes last: a spec found unworkable at another child (a name taken
# by someone else's object, a child the API server rejects) starts no pods. The PVC
# comes before the pods that mount it.
CHILD_KINDS: tuple[tuple[str, str], ...] = (
    ("v1", "Service"),
    ("networking.k8s.io/v1", "Ingress"),
    ("v1", "PersistentVolumeClaim"),
    ("v1", "ConfigMap"),
    ("apps/v1", "Deployment"),
)


def children(ep: Endpoint, settings: OperatorSettings,
             replicas: int | None = None) -> dict[str, dict[str, Any] | None]:
    """Kind -> desired manifest, or None for a kind this spec must not have; each with its digest."""
    out = {
        "Service": service(ep, settings),
        "Ingress": ingress(ep, settings),
        "PersistentVolumeClaim": pvc(ep, settings),
        "ConfigMap": adapters_config_map(ep, settings),
        "Deployment": deployment(ep, settings, replicas),
    }
    return {kind: None if m is None else with_digest(m) for kind, m in out.items()}


def with_digest(manifest: dict[str, Any]) -> dict[str, Any]:
    """``manifest`` with :data:`~constants.APPLIED_DIGEST_ANNOTATION`: the digest of everything else in it."""
    digest = hashlib.sha256(json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    meta = manifest["metadata"]
    return {**manifest, "metadata": {**meta, "annotations": {**(meta.get("annotations") or {}),
                                                             c.APPLIED_DIGEST_ANNOTATION: digest[:32]}}}


def applied_digest(obj: dict[str, Any] | None) -> str | None:
    """The digest a child carries of the manifest it was last applied from (None: none)."""
    return ((obj or {}).get("metadata") or {}).get("annotations", {}).get(c.APPLIED_DIGEST_ANNOTATION)


def urls(ep: Endpoint, settings: OperatorSettings) -> tuple[str, str | None]:
    """(in-cluster base URL, external base URL or None); both end where the OpenAI SDK wants."""
    port = ep.spec.service.port
    port_part = "" if port == 80 else f":{port}"
    url = f"http://{ep.name}.{ep.namespace}.svc.{settings.cluster_domain}{port_part}{default_ingress_path(ep.name)}"
    ing = ep.spec.ingress
    external = None
    if ing.enabled and ing.host:
        scheme = "https" if ing.tls_secret_name else "http"
        path = ingress_path(ep).rstrip("/") or "/"
        runtime_path = default_ingress_path(ep.name)
        if path.endswith("/openai/v1"):
            ext_path = path
        elif runtime_path.startswith(path):
            ext_path = runtime_path  # a shorter prefix ("/", "/v2") routes the full path
        elif "/openai/v1".startswith(path):
            ext_path = "/openai/v1"
        else:
            ext_path = path
        external = f"{scheme}://{ing.host}{ext_path}"
    return url, external


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
        return any(differs(d, x) for d, x in zip(desired, live, strict=True))
    if live is None:
        return desired is not None
    if str(desired) == str(live):
        return False
    return not _same_quantity(desired, live)


def _same_quantity(a: Any, b: Any) -> bool:
    """"0.5" and "500m", 1 and "1000m": the API server stores quantities canonicalized."""
    try:
        return bool(parse_quantity(a) == parse_quantity(b))
    except (ValueError, TypeError, ArithmeticError):
        return False


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


def needs_apply(desired: dict[str, Any], live: dict[str, Any] | None) -> bool:
    """Whether the live child (None: missing) lacks anything the desired one sets."""
    if live is None or metadata_differs(desired, live):
        return True
    # A ConfigMap's content is its data; every other child's is its spec.
    part = "data" if desired.get("kind") == "ConfigMap" else "spec"
    return differs(desired.get(part), live.get(part))
