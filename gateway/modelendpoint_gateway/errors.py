"""Every error the gateway itself answers, in the shape of the route's API.

OpenAI's ``{"error": {"message", "type", "param", "code"}}``, ``code`` a
string, as the runtime answers (runtime/modelendpoint_runtime/errors.py): a
client cannot tell a gateway error from a runtime error by its shape, only by
its code. On Anthropic's Messages routes (``.../messages``,
``.../messages/count_tokens``) the same errors take Anthropic's shape,
``{"type": "error", "error": {"type", "message"}}``, the type chosen by status
exactly as the runtime chooses it (a unit test holds the two tables equal, as
the gateway cannot import the runtime). Errors of a replica are passed
through unchanged and never built here. Pure functions only.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from modelendpoint_operator import served_names

INVALID_REQUEST = "invalid_request_error"
SERVER_ERROR = "server_error"

OPENAI = "openai"
ANTHROPIC = "anthropic"
# The runtime's Anthropic routes (runtime/modelendpoint_runtime/apis.py, dialect ANTHROPIC).
ANTHROPIC_SUFFIXES = ("/messages", "/messages/count_tokens")

# Anthropic's error type by status (https://docs.anthropic.com/en/api/errors); the anthropic
# SDK picks its exception class by status, so the statuses stay ours.
ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    408: "invalid_request_error",
    413: "request_too_large",
    429: "rate_limit_error",
}
# 503s that mean "busy, retry": Anthropic's overloaded_error (the SDK retries those).
ANTHROPIC_OVERLOADED = frozenset({"overloaded", "too_many_connections", "shutting_down", "model_loading",
                                  "model_not_ready", "gateway_not_ready"})


def dialect_of(path: str) -> str:
    """The error dialect of a request path: ``anthropic`` on the Messages routes, else ``openai``."""
    return ANTHROPIC if path.rstrip("/").endswith(ANTHROPIC_SUFFIXES) else OPENAI


@dataclass(frozen=True)
class GatewayError(Exception):
    """An error response: status, body fields and extra headers (Retry-After, WWW-Authenticate)."""

    status: int
    message: str
    type: str = INVALID_REQUEST
    param: str | None = None
    code: str | None = None
    headers: tuple[tuple[str, str], ...] = field(default_factory=tuple)

    def anthropic_type(self) -> str:
        if self.status in ANTHROPIC_TYPES:
            return ANTHROPIC_TYPES[self.status]
        if self.status == 503 and self.code in ANTHROPIC_OVERLOADED:
            return "overloaded_error"
        return "invalid_request_error" if self.status < 500 else "api_error"

    def body(self, dialect: str = OPENAI) -> dict[str, Any]:
        if dialect == ANTHROPIC:
            return {"type": "error", "error": {"type": self.anthropic_type(), "message": self.message}}
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def body_bytes(self, dialect: str = OPENAI) -> bytes:
        return json.dumps(self.body(dialect), separators=(",", ":")).encode()

    def sse_event(self, dialect: str = OPENAI) -> bytes:
        return _sse_error_frame(self.body_bytes(dialect), dialect)


def _sse_error_frame(data: bytes, dialect: str) -> bytes:
    """The runtime's mid-stream error: OpenAI's error frame then ``[DONE]``; Anthropic's ``error`` event."""
    if dialect == ANTHROPIC:
        return b"event: error\ndata: " + data + b"\n\n"
    return b"data: " + data + b"\n\ndata: [DONE]\n\n"


def _short(text: str, limit: int = 200) -> str:
    """Client input quoted in a message, cut so a huge value cannot make a huge answer."""
    return text if len(text) <= limit else text[:limit] + "..."


def unknown_url(method: str, path: str) -> GatewayError:
    return GatewayError(404, f"Invalid URL ({_short(method, 20)} {_short(path)})", INVALID_REQUEST, None, "unknown_url")


def method_not_allowed(method: str, path: str) -> GatewayError:
    return GatewayError(405, f"Method {_short(method, 20)} is not allowed on {_short(path)}", INVALID_REQUEST, None,
                        "method_not_allowed")


def invalid_json(detail: str = "") -> GatewayError:
    extra = f": {detail}" if detail else ""
    return GatewayError(400, f"The request body is not valid JSON{extra}.", INVALID_REQUEST, None, "invalid_json")


def body_not_object() -> GatewayError:
    return GatewayError(400, "The request body must be a JSON object.", INVALID_REQUEST, None, "invalid_json")


def missing_model() -> GatewayError:
    return GatewayError(400, "Missing required parameter: 'model'.", INVALID_REQUEST, "model",
                        "missing_required_parameter")


def invalid_model() -> GatewayError:
    return GatewayError(400, "Invalid value for 'model': expected a string.", INVALID_REQUEST, "model",
                        "invalid_value")


def model_not_found(model: str) -> GatewayError:
    return GatewayError(404, f"The model `{_short(model)}` does not exist or you do not have access to it.",
                        INVALID_REQUEST, "model", "model_not_found")


def endpoint_not_found(name: str) -> GatewayError:
    return GatewayError(404, f"No ModelEndpoint named `{_short(name)}` is served here.", INVALID_REQUEST, None,
                        "endpoint_not_found")


def invalid_api_key(present: bool) -> GatewayError:
    message = ("Incorrect API key provided." if present
               else "You didn't provide an API key. Provide it in the Authorization header (Bearer <key>).")
    return GatewayError(401, message, INVALID_REQUEST, None, "invalid_api_key", (("WWW-Authenticate", "Bearer"),))


def keyless_on_public_gateway(model: str) -> GatewayError:
    # 403, not 404: the caller (or the model's owner) learns what to change. The wording is the
    # operator's Routable condition's on that ModelEndpoint.
    message = served_names.key_required_message(_short(model))
    return GatewayError(403, message[0].upper() + message[1:] + ".", INVALID_REQUEST, None, "model_not_published")


def body_too_large(limit: int) -> GatewayError:
    return GatewayError(413, f"The request body exceeds the limit of {limit} bytes.", INVALID_REQUEST, None,
                        "request_too_large")


def headers_too_large(limit: int) -> GatewayError:
    return GatewayError(431, f"The request headers exceed the limit of {limit} bytes.", INVALID_REQUEST, None,
                        "request_header_fields_too_large")


def bad_request(detail: str) -> GatewayError:
    return GatewayError(400, f"Malformed HTTP request: {_short(detail)}", INVALID_REQUEST, None, "bad_request")


def switched_off(model: str) -> GatewayError:
    # 503 without Retry-After: retrying does not help until someone scales it up.
    return GatewayError(503, f"The model `{_short(model)}` is switched off (replicas: 0 without autoscaling); "
                             "it wakes on no request. Scale it up to use it.",
                        SERVER_ERROR, None, "model_unavailable")


def model_failed(model: str, reason: str) -> GatewayError:
    detail = f": {_short(reason, 300)}" if reason else ""
    return GatewayError(503, f"The model `{_short(model)}` cannot serve: its ModelEndpoint is Failed{detail}.",
                        SERVER_ERROR, None, "model_unavailable")


def _retry(retry_after: int) -> tuple[tuple[str, str], ...]:
    return (("Retry-After", str(retry_after)),)


def hold_timeout(model: str, waited_s: float, retry_after: int) -> GatewayError:
    return GatewayError(503, f"The model `{_short(model)}` had no ready replica after {waited_s:.0f} s of waiting; "
                             "retry after the time given in Retry-After.",
                        SERVER_ERROR, None, "model_not_ready", _retry(retry_after))


def too_many_held(model: str, limit: int, retry_after: int) -> GatewayError:
    return GatewayError(503, f"The model `{_short(model)}` has no ready replica and the gateway already holds "
                             f"{limit} requests; retry after the time given in Retry-After.",
                        SERVER_ERROR, None, "overloaded", _retry(retry_after))


def keys_unavailable(model: str, retry_after: int) -> GatewayError:
    return GatewayError(503, f"The API keys of model `{_short(model)}` cannot be read right now; "
                             "retry after the time given in Retry-After.",
                        SERVER_ERROR, None, "keys_unavailable", _retry(retry_after))


def upstream_unreachable(model: str, attempts: int, retry_after: int) -> GatewayError:
    return GatewayError(502, f"No replica of model `{_short(model)}` could be reached ({attempts} attempts).",
                        SERVER_ERROR, None, "upstream_unreachable", _retry(retry_after))


def upstream_broken() -> GatewayError:
    """A replica's connection broke after its answer had started (sent as a mid-stream error)."""
    return GatewayError(502, "The connection to the model's replica broke during the response.", SERVER_ERROR, None,
                        "upstream_broken")


def shutting_down(retry_after: int) -> GatewayError:
    return GatewayError(503, "The gateway is shutting down; retry (another gateway replica takes the request).",
                        SERVER_ERROR, None, "shutting_down", _retry(retry_after))


def not_ready(retry_after: int) -> GatewayError:
    return GatewayError(503, "The gateway has not yet read the ModelEndpoints of its namespaces; retry shortly.",
                        SERVER_ERROR, None, "gateway_not_ready", _retry(retry_after))


def internal_error() -> GatewayError:
    return GatewayError(500, "The gateway had an error while processing your request. Sorry about that!",
                        SERVER_ERROR, None, "internal_error")


def upstream_error_as_event(status: int, body: bytes, dialect: str = OPENAI) -> bytes:
    """A replica's error answer as a mid-stream SSE error (for a held stream whose headers were sent).

    A replica's error body (OpenAI's or Anthropic's shape: both carry an
    ``error`` object) passes through unchanged inside the dialect's error
    frame; anything else is wrapped in our shape with its status.
    """
    try:
        parsed = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        parsed = None
    if isinstance(parsed, dict) and isinstance(parsed.get("error"), dict):
        return _sse_error_frame(json.dumps(parsed, separators=(",", ":")).encode(), dialect)
    return GatewayError(status if status >= 400 else 502, f"The model's replica answered HTTP {status}.",
                        SERVER_ERROR if status >= 500 else INVALID_REQUEST, None,
                        "upstream_error").sse_event(dialect)
