"""Prometheus metrics of the gateway (served on MEP_GATEWAY_METRICS_PORT at /metrics).

Labelled by ``model``, the served name a request was routed to; requests that
matched no model are counted under ``model=""`` (a client-chosen name never
becomes a label: that would let anyone grow the series without bound). The
children of a model's labels are created once and cached (:class:`ModelMetrics`),
so a request costs a few attribute lookups, not a label resolution per metric.
Keys never appear in any label.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                    60.0, 120.0, 300.0, 600.0)

REQUESTS = Counter("modelendpoint_gateway_requests_total", "Requests answered, by model and HTTP status.",
                   ["model", "code"])
TTFB = Histogram("modelendpoint_gateway_time_to_first_byte_seconds",
                 "From the request's arrival to the first byte of the replica's answer sent to the client "
                 "(held time included).", ["model"], buckets=_LATENCY_BUCKETS)
DURATION = Histogram("modelendpoint_gateway_request_duration_seconds",
                     "From the request's arrival to the answer's last byte.", ["model"], buckets=_LATENCY_BUCKETS)
IN_FLIGHT = Gauge("modelendpoint_gateway_requests_in_flight", "Requests being forwarded to a replica.", ["model"])
HELD = Gauge("modelendpoint_gateway_requests_held", "Requests waiting for a ready replica.", ["model"])
WAKES = Counter("modelendpoint_gateway_wakes_total",
                "Times the gateway asked for a replica of a model that had none ready.", ["model"])
RETRIES = Counter("modelendpoint_gateway_retries_total",
                  "Requests sent again to another replica before any byte reached the client.",
                  ["model", "reason"])
READY_REPLICAS = Gauge("modelendpoint_gateway_ready_replicas", "Ready replicas the gateway routes to.", ["model"])
MODELS = Gauge("modelendpoint_gateway_models", "Served names the gateway routes.")
WATCH_EVENTS = Counter("modelendpoint_gateway_watch_events_total", "Watch events received.", ["resource"])
WATCH_RESTARTS = Counter("modelendpoint_gateway_watch_restarts_total",
                         "Watches restarted: expired resourceVersion (410, a full list follows), error, or timeout.",
                         ["resource", "reason"])
UPSTREAM_CONNECTIONS = Counter("modelendpoint_gateway_upstream_connections_opened_total",
                               "Connections opened to replicas: a request that found no idle pooled one (raise "
                               "MEP_GATEWAY_MAX_IDLE_CONNECTIONS_PER_REPLICA when this grows with steady load).")
KEY_READS = Counter("modelendpoint_gateway_key_reads_total", "Reads of API-key Secrets.", ["result"])
ANNOTATION_WRITES = Counter("modelendpoint_gateway_held_annotation_writes_total",
                            "Writes of the held-requests annotation on ModelEndpoints.", ["result"])

UNROUTED = ""  # the model label of requests that matched no model


class ModelMetrics:
    """The label children of one served name."""

    __slots__ = ("model", "ttfb", "duration", "in_flight", "held", "wakes", "_codes", "_retries")

    def __init__(self, model: str) -> None:
        self.model = model
        self.ttfb = TTFB.labels(model)
        self.duration = DURATION.labels(model)
        self.in_flight = IN_FLIGHT.labels(model)
        self.held = HELD.labels(model)
        self.wakes = WAKES.labels(model)
        self._codes: dict[int, Counter] = {}
        self._retries: dict[str, Counter] = {}

    def request(self, status: int) -> None:
        child = self._codes.get(status)
        if child is None:
            child = self._codes[status] = REQUESTS.labels(self.model, str(status))
        child.inc()

    def retry(self, reason: str) -> None:
        child = self._retries.get(reason)
        if child is None:
            child = self._retries[reason] = RETRIES.labels(self.model, reason)
        child.inc()


_cache: dict[str, ModelMetrics] = {}


def for_model(model: str) -> ModelMetrics:
    m = _cache.get(model)
    if m is None:
        m = _cache[model] = ModelMetrics(model)
    return m


def forget_model(model: str) -> None:
    """Drop the gauges of a served name that is gone (counters and histograms stay, as Prometheus expects)."""
    _cache.pop(model, None)
    for gauge in (IN_FLIGHT, HELD, READY_REPLICAS):
        try:
            gauge.remove(model)
        except KeyError:
            pass
