"""The OpenAI error shape, and the mapping of every failure onto it.

Every error the runtime returns is ``{"error": {"message", "type", "param",
"code"}}`` the way OpenAI's API shapes them: ``type`` is a string such as
``invalid_request_error``, ``code`` a string (or null), never the integer
status vLLM puts there. Pure functions only: the app turns their result into a
response.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

INVALID_REQUEST = "invalid_request_error"
AUTHENTICATION = "authentication_error"  # reserved; OpenAI uses invalid_request_error for bad keys
SERVER_ERROR = "server_error"
RATE_LIMIT = "rate_limit_error"

# Shown instead of any internal detail on a 500.
INTERNAL_MESSAGE = "The server had an error while processing your request. Sorry about that!"

_CONTEXT_RE = re.compile(r"maximum context length|exceeds (the )?model's maximum", re.IGNORECASE)


@dataclass(frozen=True)
class APIError(Exception):
    """An error response: status, body fields, and headers (Retry-After)."""

    status: int
    message: str
    type: str = INVALID_REQUEST
    param: str | None = None
    code: str | None = None
    headers: dict[str, str] = field(default_factory=dict)

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# Client text echoed in messages and log fields (a model name, a path) is
# clipped: a 1 MB "model" must not come back as a 1 MB error or log line.
ECHO_LIMIT = 256


def clip(text: str, limit: int = ECHO_LIMIT) -> str:
    return text if len(text) <= limit else text[:limit] + "...(truncated)"


def invalid_request(message: str, param: str | None = None, code: str | None = "invalid_value") -> APIError:
    return APIError(400, message, INVALID_REQUEST, param, code)


def model_not_found(model: str) -> APIError:
    return APIError(
        404,
        f"The model `{clip(model)}` does not exist or you do not have access to it.",
        INVALID_REQUEST,
        "model",
        "model_not_found",
    )


def invalid_api_key(present: bool) -> APIError:
    message = (
        "Incorrect API key provided."
        if present
        else "You didn't provide an API key. Provide it in the Authorization header (Bearer <key>)."
    )
    return APIError(401, message, INVALID_REQUEST, None, "invalid_api_key", {"WWW-Authenticate": "Bearer"})


def body_too_large(limit: int) -> APIError:
    # Connection: close: the rest of the body is not worth reading.
    return APIError(413, f"The request body exceeds the limit of {limit} bytes.", INVALID_REQUEST, None,
                    "request_too_large", {"Connection": "close"})  # fmt: skip


def request_timeout(seconds: float) -> APIError:
    """The body did not arrive within READ_TIMEOUT_SECONDS; the connection is closed after the answer."""
    return APIError(408, f"The request was not received within {seconds:g} seconds.", INVALID_REQUEST, None,
                    "request_timeout", {"Connection": "close"})  # fmt: skip


def headers_too_large(limit: int) -> APIError:
    return APIError(431, f"The request's headers exceed the limit of {limit} bytes.", INVALID_REQUEST, None,
                    "request_header_fields_too_large", {"Connection": "close"})  # fmt: skip


def too_many_connections(retry_after: int) -> APIError:
    return APIError(503, "The server has too many open connections; retry after the time given in Retry-After.",
                    SERVER_ERROR, None, "too_many_connections",
                    {"Retry-After": str(retry_after), "Connection": "close"})  # fmt: skip


def keys_unavailable(retry_after: int) -> APIError:
    """API_KEY_FILE turned unusable while serving: fail closed, every request refused."""
    return APIError(503, "The server cannot check API keys right now; the request was refused.", SERVER_ERROR,
                    None, "api_keys_unavailable", {"Retry-After": str(retry_after)})  # fmt: skip


def overloaded(retry_after: int) -> APIError:
    return APIError(
        503,
        "The server is at capacity; retry after the time given in Retry-After.",
        SERVER_ERROR,
        None,
        "overloaded",
        {"Retry-After": str(retry_after)},
    )


def draining(retry_after: int) -> APIError:
    return APIError(
        503,
        "The server is shutting down and accepts no new requests; retry on another replica.",
        SERVER_ERROR,
        None,
        "shutting_down",
        {"Retry-After": str(retry_after), "Connection": "close"},
    )


def not_ready(retry_after: int) -> APIError:
    return APIError(
        503, "The model is still loading.", SERVER_ERROR, None, "model_loading", {"Retry-After": str(retry_after)}
    )


def internal_error() -> APIError:
    return APIError(500, INTERNAL_MESSAGE, SERVER_ERROR, None, "internal_error")


def route_not_found(method: str, path: str) -> APIError:
    return APIError(404, f"Invalid URL ({method} {clip(path)})", INVALID_REQUEST, None, "unknown_url")


def method_not_allowed(method: str, path: str) -> APIError:
    return APIError(405, f"Method {clip(method, 32)} is not allowed on {clip(path)}", INVALID_REQUEST, None,
                    "method_not_allowed")  # fmt: skip


def param_from_loc(loc: tuple[Any, ...] | list[Any]) -> str | None:
    """A pydantic error location as OpenAI names a parameter: ``messages[0].content``."""
    parts: list[str] = []
    for item in loc:
        if isinstance(item, int):
            if parts:
                parts[-1] += f"[{item}]"
            else:
                parts.append(f"[{item}]")
        else:
            text = str(item)
            # pydantic adds the union member or validator kind to the path
            # ("str", "list[str]", "function-after[...]"): not a parameter.
            if "[" in text or text in {"str", "int", "float", "bool", "list", "dict", "none", "literal"}:
                continue
            parts.append(text)
    return ".".join(parts) or None


def from_validation_errors(errors: list[dict[str, Any]]) -> APIError:
    """A request-schema violation (pydantic ``errors()``) as a 400 naming the field."""
    if not errors:
        return invalid_request("Invalid request body.")
    first = errors[0]
    loc = tuple(first.get("loc") or ())
    # vLLM's request models validate with "wrap"/"before" model validators
    # whose errors have no location; their message then carries the detail.
    param = param_from_loc(loc)
    msg = str(first.get("msg", "invalid value"))
    msg = msg.removeprefix("Value error, ").removeprefix("Assertion failed, ")
    message = f"Invalid value for '{param}': {msg}" if param else msg
    if first.get("type") == "missing" and param:
        message = f"Missing required parameter: '{param}'."
    code = "missing_required_parameter" if first.get("type") == "missing" else "invalid_value"
    return APIError(400, message, INVALID_REQUEST, param, code)


def engine_unavailable(retry_after: int) -> APIError:
    """vLLM refused a request as retryable (its 503): like our other 503s, with RETRY_AFTER_SECONDS."""
    return APIError(
        503,
        "The engine cannot take this request now; retry later.",
        SERVER_ERROR,
        None,
        "engine_unavailable",
        {"Retry-After": str(retry_after)},
    )


def from_engine_error(
    status: int, message: str, param: str | None, prompt_param: str, retry_after: int = 1
) -> APIError:
    """An error vLLM's serving layer returned (its ErrorResponse) in our shape.

    ``prompt_param`` is the field holding the input (``messages`` or
    ``prompt``): a context overflow is reported against it, as OpenAI does.
    ``retry_after`` is RETRY_AFTER_SECONDS, for vLLM's retryable 503.
    """
    if status >= 500 and status not in (501, 503):
        return internal_error()
    if status == 503:
        return engine_unavailable(retry_after)
    if status == 404:
        if param == "model" or "model" in message.lower():
            return APIError(404, message, INVALID_REQUEST, "model", "model_not_found")
        return APIError(404, message, INVALID_REQUEST, param, "not_found")
    if _CONTEXT_RE.search(message):
        return APIError(400, message, INVALID_REQUEST, prompt_param, "context_length_exceeded")
    # vLLM's internal parameter names for the prompt are not request fields.
    if param in {"input_tokens", "input_text", "prompt_embeds"}:
        param = prompt_param
    # vLLM returns 422 for a few semantic checks and 501 for features the model
    # lacks; both are the caller's request, which OpenAI answers with 400.
    return APIError(400, message, INVALID_REQUEST, param, "invalid_value")


def engine_error_from_body(status: int, body: dict[str, Any], prompt_param: str, retry_after: int = 1) -> APIError:
    """Like :func:`from_engine_error`, from vLLM's ``ErrorResponse.model_dump()``."""
    err = body.get("error") if isinstance(body, dict) else None
    if not isinstance(err, dict):
        return internal_error() if status >= 500 else invalid_request("Invalid request.", None)
    return from_engine_error(status, str(err.get("message", "")), err.get("param"), prompt_param, retry_after)


# -- the route's kind of model ------------------------------------------------


def unsupported_task(model: str, route: str, serves: str) -> APIError:
    """A route the loaded model does not serve (a generation route on an embedding model, or the reverse)."""
    return APIError(400, f"The model `{clip(model)}` {serves}; it does not serve {route}.", INVALID_REQUEST, None,
                    "unsupported_task")  # fmt: skip


def adapter_loading(name: str, retry_after: int) -> APIError:
    """A LoRA adapter listed in ADAPTERS_FILE that is still being loaded: retryable."""
    return APIError(503, f"The adapter `{clip(name)}` is still loading; retry after the time given in Retry-After.",
                    SERVER_ERROR, "model", "model_loading", {"Retry-After": str(retry_after)})  # fmt: skip


def adapter_failed(name: str) -> APIError:
    """A LoRA adapter listed in ADAPTERS_FILE that failed to load (the reason is on GET /adapters)."""
    return APIError(404, f"The adapter `{clip(name)}` failed to load on this replica (see GET /adapters).",
                    INVALID_REQUEST, "model", "model_not_found")  # fmt: skip


# -- Anthropic's shape, for the Messages API -------------------------------------
#
# Anthropic's errors are {"type": "error", "error": {"type", "message"}}, the
# type chosen by status (https://docs.anthropic.com/en/api/errors); the
# anthropic SDK picks its exception class by status, so the statuses stay ours.

_ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    408: "invalid_request_error",
    413: "request_too_large",
    429: "rate_limit_error",
}
_ANTHROPIC_OVERLOADED = frozenset({"overloaded", "too_many_connections", "shutting_down", "model_loading"})


def anthropic_type(err: APIError) -> str:
    if err.status in _ANTHROPIC_TYPES:
        return _ANTHROPIC_TYPES[err.status]
    if err.status == 503 and err.code in _ANTHROPIC_OVERLOADED:
        return "overloaded_error"
    return "invalid_request_error" if err.status < 500 else "api_error"


def anthropic_body(err: APIError) -> dict[str, Any]:
    return {"type": "error", "error": {"type": anthropic_type(err), "message": err.message}}


def dialect_body(err: APIError, dialect: str) -> dict[str, Any]:
    """The error body in the route's dialect: ``openai`` (default) or ``anthropic``."""
    return anthropic_body(err) if dialect == ANTHROPIC else err.body()


OPENAI = "openai"
ANTHROPIC = "anthropic"
