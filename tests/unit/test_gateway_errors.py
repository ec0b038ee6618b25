"""Every error the gateway makes is OpenAI-shaped; mid-stream errors match the runtime's."""

from __future__ import annotations

import inspect
import json

import pytest

from modelendpoint_gateway import errors


def all_errors() -> list[errors.GatewayError]:
    out = []
    for name, fn in inspect.getmembers(errors, inspect.isfunction):
        not_errors = ("upstream_error_as_event", "dialect_of")
        if fn.__module__ != errors.__name__ or name.startswith("_") or name in not_errors:
            continue
        params = inspect.signature(fn).parameters
        args = [{"int": 5, "float": 1.5, "bool": True}.get(str(p.annotation), "x") for p in params.values()]
        out.append(fn(*args))
    return out


@pytest.mark.parametrize("err", all_errors(), ids=lambda e: e.code or "none")
def test_shape(err):
    body = json.loads(err.body_bytes())
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    assert body["error"]["type"] in ("invalid_request_error", "server_error")
    assert isinstance(body["error"]["code"], str)
    assert 400 <= err.status <= 599
    if err.status == 503 and err.code != "model_unavailable":
        assert dict(err.headers).get("Retry-After")


def test_specific_cases():
    assert errors.model_not_found("x").body()["error"]["param"] == "model"
    assert errors.missing_model().body()["error"] == {
        "message": "Missing required parameter: 'model'.", "type": "invalid_request_error", "param": "model",
        "code": "missing_required_parameter"}
    off = errors.switched_off("m")
    assert (off.status, off.code) == (503, "model_unavailable") and "switched off" in off.message
    assert dict(errors.invalid_api_key(False).headers) == {"WWW-Authenticate": "Bearer"}
    assert len(errors.model_not_found("x" * 10_000).message) < 400      # client input is cut


def test_sse_event_is_the_runtime_mid_stream_shape():
    text = errors.hold_timeout("m", 600, 5).sse_event().decode()
    frames = [f for f in text.split("\n\n") if f]
    assert frames[-1] == "data: [DONE]"
    assert json.loads(frames[0].removeprefix("data: "))["error"]["code"] == "model_not_ready"


def test_upstream_error_as_event_passes_the_replica_error_through():
    upstream = {"error": {"message": "bad temperature", "type": "invalid_request_error", "param": "temperature",
                          "code": "invalid_value"}}
    text = errors.upstream_error_as_event(400, json.dumps(upstream).encode()).decode()
    assert json.loads(text.split("\n\n")[0].removeprefix("data: ")) == upstream
    wrapped = errors.upstream_error_as_event(502, b"<html>bad gateway</html>").decode()
    assert json.loads(wrapped.split("\n\n")[0].removeprefix("data: "))["error"]["code"] == "upstream_error"


@pytest.mark.parametrize("path,dialect", [
    ("/v1/messages", errors.ANTHROPIC), ("/openai/v1/messages/count_tokens", errors.ANTHROPIC),
    ("/v2/claude/openai/v1/messages", errors.ANTHROPIC), ("/v1/chat/completions", errors.OPENAI),
    ("/v1/responses", errors.OPENAI), ("/v1/models", errors.OPENAI),
])
def test_dialect_of_route(path, dialect):
    assert errors.dialect_of(path) == dialect


@pytest.mark.parametrize("err", all_errors(), ids=lambda e: e.code or "none")
def test_anthropic_shape(err):
    body = json.loads(err.body_bytes(errors.ANTHROPIC))
    assert body == {"type": "error", "error": {"type": err.anthropic_type(), "message": err.message}}
    assert body["error"]["type"] in {
        "invalid_request_error", "authentication_error", "permission_error", "not_found_error",
        "request_too_large", "rate_limit_error", "api_error", "overloaded_error"}
    frame = err.sse_event(errors.ANTHROPIC).decode()
    assert frame.startswith("event: error\ndata: ") and frame.endswith("\n\n") and "[DONE]" not in frame
    assert json.loads(frame.removeprefix("event: error\ndata: ")) == body


def test_anthropic_types_by_status_and_code():
    assert errors.model_not_found("x").anthropic_type() == "not_found_error"
    assert errors.invalid_api_key(True).anthropic_type() == "authentication_error"
    assert errors.body_too_large(10).anthropic_type() == "request_too_large"
    assert errors.hold_timeout("m", 1, 5).anthropic_type() == "overloaded_error"   # the SDK retries those
    assert errors.switched_off("m").anthropic_type() == "api_error"                # retrying does not help
    assert errors.upstream_unreachable("m", 3, 5).anthropic_type() == "api_error"


def test_anthropic_table_is_the_runtimes():
    """The gateway cannot import the runtime (no vLLM in its image): the two tables are held equal here."""
    runtime_errors = pytest.importorskip("modelendpoint_runtime.errors")
    assert errors.ANTHROPIC_TYPES == runtime_errors._ANTHROPIC_TYPES
    assert runtime_errors._ANTHROPIC_OVERLOADED <= errors.ANTHROPIC_OVERLOADED
    runtime_apis = pytest.importorskip("modelendpoint_runtime.apis")
    assert set(errors.ANTHROPIC_SUFFIXES) == set(runtime_apis.ANTHROPIC_SUFFIXES)


def test_upstream_error_as_anthropic_event():
    upstream = {"type": "error", "error": {"type": "invalid_request_error", "message": "max_tokens: required"}}
    text = errors.upstream_error_as_event(400, json.dumps(upstream).encode(), errors.ANTHROPIC).decode()
    assert text.startswith("event: error\ndata: ") and "[DONE]" not in text
    assert json.loads(text.removeprefix("event: error\ndata: ")) == upstream
    wrapped = errors.upstream_error_as_event(502, b"<html/>", errors.ANTHROPIC).decode()
    assert json.loads(wrapped.removeprefix("event: error\ndata: "))["error"]["type"] == "api_error"
