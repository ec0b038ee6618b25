"""Prometheus metrics of the operator (served on MEP_OPERATOR_METRICS_PORT at /metrics)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, start_http_server

RECONCILES = Counter(
    "modelendpoint_operator_reconciles_total",
    "Reconciliations of ModelEndpoints, by what triggered them and how they ended.",
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
ENDPOINTS = Gauge(
    "modelendpoint_operator_endpoints",
    "ModelEndpoints known to this operator process.",
)


def serve(port: int, addr: str = "0.0.0.0") -> None:
    """Start the /metrics HTTP server in a background thread (port 0: disabled)."""
    if port:
        start_http_server(port, addr=addr)
