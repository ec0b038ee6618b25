"""The ModelEndpoint spec with the CRD's defaults filled in (pure; no I/O).

The API server applies the CRD's defaults already; filling them here again
keeps the manifests right for objects written before a default existed and
for unit tests that pass partial specs. ``tests/unit`` checks that these
defaults equal the CRD's.
"""

from __future__ import annotations

import copy
from typing import Any

DEFAULTS: dict[str, Any] = {
    "responseRole": "assistant",
    "rawOpenAIOutput": True,
    "replicas": 1,
    "gpus": 1,
    "gpuResourceName": "nvidia.com/gpu",
    "shmSize": "8Gi",
    "drainTimeoutSeconds": 30,
}
SERVICE_DEFAULTS: dict[str, Any] = {"type": "ClusterIP", "port": 80}
INGRESS_DEFAULTS: dict[str, Any] = {"enabled": False}


def with_defaults(spec: dict[str, Any] | None) -> dict[str, Any]:
    """A deep copy of ``spec`` with every defaulted field present."""
    out = copy.deepcopy(dict(spec or {}))
    for key, value in DEFAULTS.items():
        out.setdefault(key, value)
    out["service"] = {**SERVICE_DEFAULTS, **(out.get("service") or {})}
    out["ingress"] = {**INGRESS_DEFAULTS, **(out.get("ingress") or {})}
    out["engine"] = dict(out.get("engine") or {})
    return out


def served_model_name(spec: dict[str, Any]) -> str:
    return spec.get("servedModelName") or spec["model"]


def tensor_parallel_size(spec: dict[str, Any]) -> int | None:
    """engine.tensorParallelSize, else gpus; None without GPUs (the runtime's default, 1)."""
    spec = with_defaults(spec)
    tp = spec["engine"].get("tensorParallelSize")
    if tp is not None:
        return int(tp)
    return int(spec["gpus"]) if int(spec["gpus"]) > 0 else None


def default_ingress_path(name: str) -> str:
    return f"/v2/{name}/openai/v1"


def secret_refs(spec: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(variable, secret name, key) for every Secret the spec references through a field."""
    refs = []
    for field, var in (("hfTokenSecretRef", "HF_TOKEN"), ("apiKeySecretRef", "API_KEY")):
        ref = spec.get(field)
        if ref:
            refs.append((var, ref["name"], ref["key"]))
    return refs
