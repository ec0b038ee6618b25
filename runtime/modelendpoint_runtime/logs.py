"""Structured JSON logs: one line per request, and the runtime's own messages.

A request line carries method, route, status, model, tokens and latency; it
never carries prompt or completion text, nor any header, unless LOG_PROMPTS=1
asks for the prompt (debugging only). API keys are never logged.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

LOGGER_NAME = "modelendpoint_runtime"


class JSONFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            line.update(fields)
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line, separators=(",", ":"), default=str)


def setup_logging(level: str) -> logging.Logger:
    logger = logging.getLogger(LOGGER_NAME)
    logger.setLevel(level.upper())
    logger.propagate = False
    if not any(isinstance(h.formatter, JSONFormatter) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(JSONFormatter())
        logger.addHandler(handler)
    return logger


def request_fields(
    *,
    method: str,
    route: str,
    status: int,
    latency_s: float,
    model: str | None = None,
    prompt_tokens: int | None = None,
    completion_tokens: int | None = None,
    ttft_s: float | None = None,
    stream: bool | None = None,
    request_id: str | None = None,
    error_code: str | None = None,
    prompt: Any = None,
) -> dict[str, Any]:
    """The fields of one request line (pure: the unit tests check no text leaks)."""
    fields: dict[str, Any] = {
        "method": method,
        "route": route,
        "status": status,
        "latency_ms": round(latency_s * 1000, 2),
    }
    optional = {
        "model": model,
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "ttft_ms": None if ttft_s is None else round(ttft_s * 1000, 2),
        "stream": stream,
        "request_id": request_id,
        "error_code": error_code,
        "prompt": prompt,
    }
    fields.update({k: v for k, v in optional.items() if v is not None})
    return fields
