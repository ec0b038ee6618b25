"""Prometheus metrics of the operator (served on MEP_OPERATOR_METRICS_PORT at /metrics)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, start_http_server

RECONCILES = Counter(
    "modelendpoint_operator_reconciles_total",
    "Reconciliations of ModelEndpoints, by what queued them (endpoint, child, pod, autoscaler, retry) and how "
    "they ended (ok, retry, failed, error).",
    ["trigger", "result"],
)
RECONCILE_ERRORS = Counter(
    "modelendpoint_operator_reconcile_errors_total",
    "Failed reconciliations, by kind: temporary (retried) or permanent (phase Failed).",
    ["kind"],
)
RECONCILE_SECONDS = Histogram(
    "modelendpoint_operator_reconcile_duration_seconds",
    "Time to reconcile one ModelEndpoint (apply its children and write its status).",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
STATUS_UPDATES = Counter(
    "modelendpoint_operator_status_updates_total",
    "Status writes to ModelEndpoints, by the phase written.",
    ["phase"],
)
CHILDREN_RESTORED = Counter(
    "modelendpoint_operator_children_restored_total",
    "Children re-applied because they were deleted or changed by someone else.",
    ["kind"],
)
API_REQUESTS = Counter(
    "modelendpoint_operator_api_requests_total",
    "Requests the operator's reconciler made to the Kubernetes API (kopf's watches excluded).",
    ["verb", "resource", "code"],
)
AUTOSCALER_LOAD = Gauge(
    "modelendpoint_operator_autoscaler_load",
    "Requests in flight on the ready replicas (engine running and waiting) plus held by gateways, last sample.",
    ["namespace", "name"],
)
AUTOSCALER_DESIRED = Gauge(
    "modelendpoint_operator_autoscaler_desired_replicas",
    "Replicas the autoscaler wants for the ModelEndpoint.",
    ["namespace", "name"],
)
AUTOSCALER_CURRENT = Gauge(
    "modelendpoint_operator_autoscaler_current_replicas",
    "Replicas the ModelEndpoint's Deployment has (spec), at the last sample.",
    ["namespace", "name"],
)
ENDPOINTS = Gauge(
    "modelendpoint_operator_endpoints",
    "ModelEndpoints known to this operator process.",
)


def serve(port: int, addr: str = "0.0.0.0") -> None:
    """Start the /metrics HTTP server in a background thread (port 0: disabled)."""
    if port:
        start_http_server(port, addr=addr)
