"""The gateway's JSON log lines: one object per line, the request fields and nothing else."""

from __future__ import annotations

import json
import logging

from modelendpoint_gateway.logs import JSONFormatter, request_fields


def record(created: float, fields: dict | None = None) -> logging.LogRecord:
    rec = logging.LogRecord("modelendpoint_gateway.access", logging.INFO, "", 0, "request", None, None)
    rec.created, rec.msecs = created, (created % 1) * 1000
    if fields is not None:
        rec.fields = fields  # type: ignore[attr-defined]
    return rec


def test_timestamps_are_right_across_seconds_with_the_per_second_cache():
    fmt = JSONFormatter()
    stamps = [json.loads(fmt.format(record(t)))["ts"] for t in (1767225600.25, 1767225600.999, 1767225601.0)]
    assert stamps == ["2026-01-01T00:00:00.250Z", "2026-01-01T00:00:00.999Z", "2026-01-01T00:00:01.000Z"]


def test_a_request_line_has_the_request_fields_only():
    fields = request_fields(method="POST", route="/v1/chat/completions", status=200, latency_s=0.01234,
                            model="m", replica="ns/p-0", ttfb_s=0.001, stream=True)
    line = json.loads(JSONFormatter().format(record(1767225600.0, fields)))
    assert line == {"ts": "2026-01-01T00:00:00.000Z", "level": "info", "logger": "modelendpoint_gateway.access",
                    "msg": "request", "method": "POST", "route": "/v1/chat/completions", "status": 200,
                    "latency_ms": 12.34, "model": "m", "replica": "ns/p-0", "ttfb_ms": 1.0, "stream": True}
