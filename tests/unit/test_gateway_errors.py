"""Every error the gateway makes is OpenAI-shaped; mid-stream errors match the runtime's."""

from __future__ import annotations

import inspect
import json

import pytest

from modelendpoint_gateway import errors


def all_errors() -> list[errors.GatewayError]:
    out = []
    for name, fn in inspect.getmembers(errors, inspect.isfunction):
        if fn.__module__ != errors.__name__ or name.startswith("_") or name == "upstream_error_as_event":
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
