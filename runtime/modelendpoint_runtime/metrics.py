"""Prometheus metrics of the runtime, beside vLLM's own engine metrics.

All live in prometheus-client's default registry, where vLLM's stat logger
registers its ``vllm:*`` series too, so ``/metrics`` exposes both in one scrape.
Route labels are route templates (``/openai/v1/chat/completions``), never raw
paths: the endpoint id in ``/v2/{id}/...`` must not multiply the series.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram

# Buckets for a model server: milliseconds to minutes.
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300)
_TTFT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class Metrics:
    """The runtime's series; a fresh registry can be given in unit tests."""

    def __init__(self, registry: CollectorRegistry = REGISTRY) -> None:
        self.requests = Counter(
            "modelendpoint_requests_total", "HTTP requests by route, method and status.",
            ["route", "method", "status"], registry=registry,
        )  # fmt: skip
        self.latency = Histogram(
            "modelendpoint_request_duration_seconds", "Time from request to the last byte of the response.",
            ["route"], buckets=_LATENCY_BUCKETS, registry=registry,
        )  # fmt: skip
        self.ttft = Histogram(
            "modelendpoint_time_to_first_token_seconds",
            "Time from request to the first generated token (streaming) or to the response (non-streaming).",
            ["route", "stream"], buckets=_TTFT_BUCKETS, registry=registry,
        )  # fmt: skip
        self.prompt_tokens = Counter(
            "modelendpoint_prompt_tokens_total", "Prompt (input) tokens processed.", ["route"], registry=registry
        )
        self.completion_tokens = Counter(
            "modelendpoint_completion_tokens_total", "Completion (output) tokens generated.", ["route"],
            registry=registry,
        )  # fmt: skip
        self.in_flight = Gauge(
            "modelendpoint_requests_in_flight", "Generation requests admitted and not finished (running or queued).",
            registry=registry,
        )  # fmt: skip
        self.sequences_in_flight = Gauge(
            "modelendpoint_sequences_in_flight",
            "Sequences of the admitted generation requests (prompts x max(n, best_of)): what admission counts.",
            registry=registry,
        )  # fmt: skip
        self.client_timeouts = Counter(
            "modelendpoint_client_timeouts_total",
            "Connections cut because the client was too slow: headers or body late (read), or not reading (write).",
            ["kind"], registry=registry,
        )  # fmt: skip
        self.rejected = Counter(
            "modelendpoint_requests_rejected_total", "Requests refused before the engine, by reason.",
            ["reason"], registry=registry,
        )  # fmt: skip
        self.ready = Gauge("modelendpoint_ready", "1 when the model is loaded and not draining.", registry=registry)
        self._children: dict[tuple[Any, tuple[str, ...]], Any] = {}

    def child(self, metric: Any, *labels: str) -> Any:
        """``metric.labels(*labels)``, remembered.

        ``labels()`` validates, takes a lock and builds a key on every call;
        the label values here are a small fixed set (route templates, methods,
        statuses, reasons), so each child is looked up once and kept.
        """
        key = (metric, labels)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*labels)
        return found
