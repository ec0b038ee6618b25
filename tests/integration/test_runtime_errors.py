"""Every error case, through raw HTTP and through the OpenAI SDK's exception classes.

Each error body is ``{"error": {"message", "type", "param", "code"}}``; a
schema violation is 400 (never FastAPI's 422) naming the field.
"""

from __future__ import annotations

import httpx
import openai
import pytest

from conformance import HTTP, NA, PY, Row

H = "POST /chat/completions"
C = "POST /completions"
M = "GET /models"


def assert_openai_error(r: httpx.Response, status: int, code=..., param=...) -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert set(body) == {"error"}, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"]
    assert isinstance(err["type"], str)
    if code is not ...:
        assert err["code"] == code, err
    if param is not ...:
        assert err["param"] == param, err
    return err


@pytest.fixture(scope="module")
def http(runtime_server):
    with httpx.Client(base_url=runtime_server.base_url, headers=runtime_server.headers, timeout=120) as client:
        yield client


def chat_body(server, **kw):
    return {"model": server.model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, **kw}


# auth -----------------------------------------------------------------------


@pytest.mark.conformance(
    Row(H, "401 without or with a wrong key", HTTP, NA),
    Row(M, "401 without a key", HTTP, NA),
)
def test_missing_and_wrong_key_are_401(runtime_server):
    url = runtime_server.base_url + "/models"
    assert_openai_error(httpx.get(url), 401, "invalid_api_key")
    assert_openai_error(httpx.get(url, headers={"Authorization": "Bearer nope"}), 401, "invalid_api_key")
    assert_openai_error(httpx.get(url, headers={"Authorization": runtime_server.api_key}), 401, "invalid_api_key")
    # Every route needs the key, also the others and unknown paths.
    for path in ("/openai/v1/models", "/v1/models", "/metrics", "/openapi.json", "/no/such/path"):
        assert_openai_error(httpx.get(runtime_server.root_url + path), 401, "invalid_api_key")
    r = httpx.post(runtime_server.base_url + "/chat/completions", json=chat_body(runtime_server))
    assert_openai_error(r, 401, "invalid_api_key")


@pytest.mark.conformance(
    Row(M, "401: AuthenticationError", PY, NA),
)
def test_sdk_authentication_error(runtime_server):
    client = openai.OpenAI(api_key="wrong", base_url=runtime_server.base_url, max_retries=0)
    with pytest.raises(openai.AuthenticationError) as exc:
        client.models.list()
    assert exc.value.status_code == 401 and exc.value.code == "invalid_api_key"


def test_rotated_keys_both_work_and_probes_need_none(runtime_server):
    for key in runtime_server.api_keys:
        r = httpx.get(runtime_server.base_url + "/models", headers={"Authorization": f"Bearer {key}"})
        assert r.status_code == 200
    assert httpx.get(runtime_server.root_url + "/health").status_code == 200
    assert httpx.get(runtime_server.root_url + "/ready").status_code == 200


def test_keys_never_appear_in_logs(runtime_server):
    log = runtime_server.log_text()
    for key in runtime_server.api_keys:
        assert key not in log


# routing and model ----------------------------------------------------------


@pytest.mark.conformance(
    Row(H, "under /openai/v1, /v1 and /v2/{endpoint_id}/openai/v1", HTTP, NA),
)
def test_all_route_prefixes_behave_the_same(runtime_server):
    h = runtime_server.headers
    for prefix in ("/openai/v1", "/v1", f"/v2/{runtime_server.endpoint_id}/openai/v1"):
        r = httpx.get(runtime_server.root_url + prefix + "/models", headers=h)
        assert r.status_code == 200
        assert [m["id"] for m in r.json()["data"]] == [runtime_server.model]
        r = httpx.post(runtime_server.root_url + prefix + "/completions", headers=h, timeout=60,
                       json={"model": runtime_server.model, "prompt": "Hi", "max_tokens": 1})  # fmt: skip
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 1


@pytest.mark.conformance(
    Row(M, "the list's shape (one model, owned_by)", HTTP, NA),
)
def test_models_list_shape(http, runtime_server):
    body = http.get("/models").json()
    assert body["object"] == "list"
    (card,) = body["data"]
    assert card["id"] == runtime_server.model and card["object"] == "model"
    assert isinstance(card["created"], int) and card["owned_by"]
    assert http.get(f"/models/{runtime_server.model}").json()["id"] == runtime_server.model
    assert_openai_error(http.get("/models/gpt-4"), 404, "model_not_found")


@pytest.mark.conformance(
    Row(M, "another endpoint id: 404 endpoint_not_found", HTTP, NA),
)
def test_other_endpoint_id_is_404(runtime_server):
    r = httpx.get(runtime_server.root_url + "/v2/another-endpoint/openai/v1/models", headers=runtime_server.headers)
    assert_openai_error(r, 404, "endpoint_not_found")


@pytest.mark.conformance(
    Row(H, "404 for an unknown model", HTTP, NA),
    Row(C, "404 for an unknown model", HTTP, NA),
)
def test_unknown_model_is_404(http, runtime_server):
    for path, body in (("/chat/completions", chat_body(runtime_server, model="gpt-4")),
                       ("/completions", {"model": "gpt-4", "prompt": "x"})):  # fmt: skip
        assert_openai_error(http.post(path, json=body), 404, "model_not_found", "model")


@pytest.mark.conformance(
    Row(H, "404: NotFoundError", PY, NA),
)
def test_sdk_not_found_error(openai_client):
    with pytest.raises(openai.NotFoundError) as exc:
        openai_client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "x"}])
    assert exc.value.code == "model_not_found" and exc.value.param == "model"


def test_unknown_path_and_method(runtime_server):
    h = runtime_server.headers
    assert_openai_error(httpx.get(runtime_server.root_url + "/v1/audio/speech", headers=h), 404, "unknown_url")
    assert_openai_error(httpx.get(runtime_server.base_url + "/completions", headers=h), 405)
    assert_openai_error(httpx.get(runtime_server.base_url + "/embeddings", headers=h), 405)


# validation -----------------------------------------------------------------


@pytest.mark.conformance(
    Row(H, "schema violations: 400 naming the field", HTTP, NA),
    Row(C, "schema violations: 400 naming the field", HTTP, NA),
)
@pytest.mark.parametrize(
    ("path", "patch", "param"),
    [
        ("/chat/completions", {"temperature": "hot"}, "temperature"),
        ("/chat/completions", {"messages": "not a list"}, "messages"),
        ("/chat/completions", {"messages": None}, "messages"),
        ("/chat/completions", {"n": "two"}, "n"),
        ("/chat/completions", {"stop": 5}, "stop"),
        ("/chat/completions", {"top_p": 7}, "top_p"),
        ("/completions", {"max_tokens": "many"}, "max_tokens"),
        ("/completions", {"logprobs": "yes"}, "logprobs"),
        ("/completions", {"stop_token_ids": ["a"]}, "stop_token_ids[0]"),
        ("/completions", {"seed": 2**70}, "seed"),
    ],
)
def test_schema_violation_is_400_naming_the_field(http, runtime_server, path, patch, param):
    text_body = {"model": runtime_server.model, "prompt": "x", "max_tokens": 1}
    body = chat_body(runtime_server) if path == "/chat/completions" else text_body
    body.update(patch)
    assert_openai_error(http.post(path, json=body), 400, param=param)


@pytest.mark.conformance(
    Row(H, "model required: 400 missing_required_parameter", PY, NA),
    Row(C, "model required: 400 missing_required_parameter", HTTP, NA),
)
def test_missing_model_is_400(http, openai_client):
    for path, body in (("/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}),
                       ("/completions", {"prompt": "Hi", "max_tokens": 1})):  # fmt: skip
        err = assert_openai_error(http.post(path, json=body), 400, "missing_required_parameter", "model")
        assert err["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError) as exc:  # the SDK leaves an omitted argument out of the body
        openai_client.chat.completions.create(model=openai.omit, messages=[{"role": "user", "content": "x"}])
    assert exc.value.status_code == 400 and exc.value.param == "model"
    assert exc.value.code == "missing_required_parameter"


def test_missing_required_field_is_400(http, runtime_server):
    r = http.post("/chat/completions", json={"model": runtime_server.model})
    err = assert_openai_error(r, 400, param="messages")
    assert "messages" in err["message"]
    assert_openai_error(http.post("/completions", json={"model": runtime_server.model}), 400)


@pytest.mark.conformance(
    Row(C, "400 for a malformed body", HTTP, NA),
)
@pytest.mark.parametrize("raw", [b"", b"{", b"[1,2]", b'"text"', b"\xff\xfe", b"null"])
def test_malformed_json_is_400_never_422(http, raw):
    r = http.post("/completions", content=raw, headers={"content-type": "application/json"})
    assert_openai_error(r, 400)


@pytest.mark.conformance(
    Row(H, "400: BadRequestError", PY, NA),
)
def test_sdk_bad_request_error(openai_client, runtime_server):
    with pytest.raises(openai.BadRequestError) as exc:
        openai_client.chat.completions.create(
            model=runtime_server.model, messages=[{"role": "user", "content": "x"}], temperature=-5, max_tokens=1
        )
    assert exc.value.status_code == 400 and exc.value.param == "temperature"


# limits ---------------------------------------------------------------------


@pytest.mark.conformance(
    Row(H, "LIMIT_* caps: 400 naming the parameter", HTTP, NA),
    Row(C, "LIMIT_* caps: 400 naming the parameter", HTTP, NA),
)
@pytest.mark.parametrize(
    ("path", "patch", "param"),
    [
        ("/chat/completions", {"n": 5}, "n"),
        ("/chat/completions", {"max_tokens": 1025}, "max_tokens"),
        ("/chat/completions", {"max_completion_tokens": 5000}, "max_completion_tokens"),
        ("/chat/completions", {"logprobs": True, "top_logprobs": 6}, "top_logprobs"),
        ("/completions", {"logprobs": 6}, "logprobs"),
        ("/completions", {"best_of": 5}, "best_of"),
        ("/completions", {"best_of": 2, "stream": True}, "best_of"),  # > n cannot stream
        ("/chat/completions", {"best_of": 2, "stream": True}, "best_of"),
    ],
)
def test_caps_are_400(http, runtime_server, path, patch, param):
    text_body = {"model": runtime_server.model, "prompt": "x", "max_tokens": 1}
    body = chat_body(runtime_server) if path == "/chat/completions" else text_body
    body.update(patch)
    assert_openai_error(http.post(path, json=body), 400, param=param)


@pytest.mark.conformance(
    Row(C, "body over MAX_REQUEST_BODY_BYTES: 413 (also chunked)", HTTP, NA),
)
def test_body_over_limit_is_413(http, runtime_server):
    big = "word " * (300 * 1024 // 5)  # > MAX_REQUEST_BODY_BYTES (256 KiB)
    r = http.post("/completions", json={"model": runtime_server.model, "prompt": big, "max_tokens": 1})
    assert_openai_error(r, 413, "request_too_large")

    # Without Content-Length (chunked upload) the limit holds too.
    def chunks():
        yield b'{"model": "m", "prompt": "'
        for _ in range(300):
            yield b"x" * 1024
        yield b'"}'

    r = http.post("/completions", content=chunks(), headers={"content-type": "application/json"})
    assert_openai_error(r, 413, "request_too_large")


def test_sdk_413(openai_client, runtime_server):
    with pytest.raises(openai.APIStatusError) as exc:
        openai_client.completions.create(model=runtime_server.model, prompt="word " * 60000, max_tokens=1)
    assert exc.value.status_code == 413 and exc.value.code == "request_too_large"


@pytest.mark.conformance(
    Row(C, "prompt beyond the context: 400 context_length_exceeded", HTTP, NA),
    Row(H, "prompt beyond the context: 400 context_length_exceeded", PY, NA),
)
def test_prompt_longer_than_context_is_400_context_length_exceeded(http, openai_client, runtime_server):
    long_text = "hello " * 3000  # ~3000 tokens > MAX_MODEL_LEN 2048, < 256 KiB
    r = http.post("/completions", json={"model": runtime_server.model, "prompt": long_text, "max_tokens": 1})
    assert_openai_error(r, 400, "context_length_exceeded", "prompt")
    with pytest.raises(openai.BadRequestError) as exc:
        openai_client.chat.completions.create(
            model=runtime_server.model, messages=[{"role": "user", "content": long_text}], max_tokens=1
        )
    assert exc.value.code == "context_length_exceeded" and exc.value.param == "messages"
