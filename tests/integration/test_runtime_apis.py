"""The Responses API, the Anthropic Messages API and the tokenizer routes, on the real engine.

The official ``openai`` SDK's ``client.responses.create`` and the
``anthropic`` SDK (unchanged but for ``base_url``: it sends its key as
``x-api-key``) against the shared server, streaming and not, with their
error classes; then every route of the issue under every prefix: 401
without a key, 404 for an unknown model, 400 for a bad body (in Anthropic's
shape on the Messages routes), 400 ``unsupported_task`` for the pooling
routes on this generative model, metrics and the request log line.
"""

from __future__ import annotations

import json
import re

import anthropic
import httpx
import openai
import pytest

from conformance import ANTHROPIC, HTTP, NA, NO, PY, YES, Row
from waiting import wait_for

PREFIXES = ("/openai/v1", "/v1", "/v2/{id}/openai/v1")
SAY = "Say hello."
RESPONSES = "POST /responses"
MESSAGES = "POST /v1/messages"


@pytest.fixture(scope="module")
def http(runtime_server):
    with httpx.Client(headers=runtime_server.headers, timeout=120) as client:
        yield client


@pytest.fixture(scope="module")
def claude(runtime_server):
    """The anthropic SDK, pointed at the runtime's root: it posts to /v1/messages."""
    client = anthropic.Anthropic(api_key=runtime_server.api_key, base_url=runtime_server.root_url, max_retries=0,
                                 timeout=120)  # fmt: skip
    yield client
    client.close()


# -- Responses ---------------------------------------------------------------------


@pytest.mark.conformance(Row(RESPONSES, "input (text), max_output_tokens, temperature", PY, NO))
def test_responses_create_answers(openai_client, runtime_server):
    r = openai_client.responses.create(model=runtime_server.model, input=SAY, max_output_tokens=8, temperature=0)
    assert r.object == "response" and r.model == runtime_server.model and r.id.startswith("resp")
    assert r.output_text and r.output[0].type == "message" and r.output[0].role == "assistant"
    assert r.usage.output_tokens == 8 and r.usage.input_tokens > 0
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"


@pytest.mark.conformance(Row(RESPONSES, "input (messages), instructions, max_output_tokens", PY, YES))
def test_responses_stream_events_add_up_to_the_final_response(openai_client, runtime_server):
    stream = openai_client.responses.create(
        model=runtime_server.model, instructions="Answer briefly.", max_output_tokens=8, temperature=0,
        input=[{"role": "user", "content": SAY}], stream=True,
    )  # fmt: skip
    events = list(stream)
    kinds = [e.type for e in events]
    assert kinds[0] == "response.created" and kinds[-1] in ("response.completed", "response.incomplete")
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    final = events[-1].response
    assert deltas and deltas == final.output_text
    assert final.usage.output_tokens == 8
    # Sequence numbers are the SDK's way to order events; they must be increasing.
    numbers = [e.sequence_number for e in events]
    assert numbers == sorted(numbers) and len(set(numbers)) == len(numbers)


@pytest.mark.conformance(Row(RESPONSES, "errors: unknown model 404, bad input 400, background 400", PY, NA))
def test_responses_errors_are_openai_shaped(openai_client, runtime_server):
    with pytest.raises(openai.NotFoundError) as missing:
        openai_client.responses.create(model="no-such-model", input=SAY)
    assert missing.value.body["code"] == "model_not_found" and missing.value.body["param"] == "model"
    with pytest.raises(openai.BadRequestError) as bad:
        openai_client.responses.create(model=runtime_server.model, input=SAY, max_output_tokens=10**9)
    assert bad.value.body["param"] == "max_output_tokens"
    with pytest.raises(openai.BadRequestError) as bad:
        openai_client.responses.create(model=runtime_server.model, input=SAY, background=True)
    assert bad.value.body["param"] == "background"
    with pytest.raises(openai.BadRequestError) as bad:
        openai_client.responses.create(model=runtime_server.model, input=12)  # type: ignore[arg-type]
    assert bad.value.body["param"] == "input"


# -- Anthropic Messages ---------------------------------------------------------------


@pytest.mark.conformance(Row(MESSAGES, "messages, system, max_tokens, stop_reason, usage", ANTHROPIC, NO))
def test_anthropic_sdk_messages_create(claude, runtime_server):
    # Greedy, and an answer longer than max_tokens: sampled, the model sometimes ended within 8.
    m = claude.messages.create(model=runtime_server.model, max_tokens=8, system="You are terse.",
                               extra_body={"temperature": 0},
                               messages=[{"role": "user", "content": "Count from 1 to 50."}])  # fmt: skip
    assert m.type == "message" and m.role == "assistant" and m.model == runtime_server.model
    assert m.content[0].type == "text" and m.content[0].text
    assert m.stop_reason == "max_tokens" and m.usage.output_tokens == 8 and m.usage.input_tokens > 0


@pytest.mark.conformance(Row(MESSAGES, "messages, max_tokens (text stream, final message)", ANTHROPIC, YES))
def test_anthropic_sdk_messages_stream(claude, runtime_server):
    with claude.messages.stream(model=runtime_server.model, max_tokens=8,
                                messages=[{"role": "user", "content": SAY}]) as stream:  # fmt: skip
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text and final.content[0].text == text
    assert final.stop_reason == "max_tokens" and final.usage.output_tokens == 8


@pytest.mark.conformance(
    Row("POST /v1/messages/count_tokens", "messages", ANTHROPIC, NA),
    Row(MESSAGES, "under /openai/v1 and /v2/{endpoint_id}/openai/v1 too", ANTHROPIC, NO),
)
def test_anthropic_count_tokens_and_other_prefixes(claude, runtime_server, http):
    messages = [{"role": "user", "content": SAY}]
    counted = claude.messages.count_tokens(model=runtime_server.model, messages=messages)
    tokenized = http.post(runtime_server.base_url + "/tokenize", json={"model": runtime_server.model,
                                                                       "messages": messages})  # fmt: skip
    assert counted.input_tokens == tokenized.json()["count"] > 0
    root = runtime_server.root_url
    for base in (root + "/openai", f"{root}/v2/{runtime_server.endpoint_id}/openai"):
        client = anthropic.Anthropic(api_key=runtime_server.api_key, base_url=base, max_retries=0, timeout=120)
        assert client.messages.create(model=runtime_server.model, max_tokens=2, messages=messages).content


@pytest.mark.conformance(Row(MESSAGES, "errors in Anthropic's shape: 401, 404, 400 (SDK classes)", ANTHROPIC, NA))
def test_anthropic_errors_have_anthropics_shape(claude, runtime_server):
    messages = [{"role": "user", "content": SAY}]
    wrong = anthropic.Anthropic(api_key="sk-wrong", base_url=runtime_server.root_url, max_retries=0)
    with pytest.raises(anthropic.AuthenticationError) as auth:
        wrong.messages.create(model=runtime_server.model, max_tokens=2, messages=messages)
    assert auth.value.body == {"type": "error", "error": {"type": "authentication_error",
                                                          "message": "Incorrect API key provided."}}  # fmt: skip
    with pytest.raises(anthropic.NotFoundError) as missing:
        claude.messages.create(model="no-such-model", max_tokens=2, messages=messages)
    assert missing.value.body["type"] == "error" and missing.value.body["error"]["type"] == "not_found_error"
    with pytest.raises(anthropic.BadRequestError) as bad:
        claude.messages.create(model=runtime_server.model, max_tokens=10**9, messages=messages)
    assert bad.value.body["error"]["type"] == "invalid_request_error" and "max_tokens" in bad.value.message
    with pytest.raises(anthropic.BadRequestError):
        claude.messages.create(model=runtime_server.model, max_tokens=2, messages=[{"role": "robot", "content": "x"}])


# -- tokenizer ------------------------------------------------------------------------


@pytest.mark.conformance(
    Row("POST /tokenize", "prompt, add_special_tokens", HTTP, NA),
    Row("POST /detokenize", "tokens", HTTP, NA),
)
def test_tokenize_and_detokenize_round_trip(http, runtime_server, embedded_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(embedded_model_dir))
    text = "The capital of France is Paris."
    for prefix in PREFIXES:
        base = runtime_server.root_url + prefix.replace("{id}", runtime_server.endpoint_id)
        r = http.post(base + "/tokenize", json={"model": runtime_server.model, "prompt": text,
                                                "add_special_tokens": False})  # fmt: skip
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["tokens"] == tok.encode(text, add_special_tokens=False) and body["count"] == len(body["tokens"])
        assert body["max_model_len"] == 2048
        back = http.post(base + "/detokenize", json={"model": runtime_server.model, "tokens": body["tokens"]})
        assert back.json()["prompt"] == text
    # `model` may be left out on vLLM's extension routes: the served model.
    assert http.post(runtime_server.base_url + "/tokenize", json={"prompt": text}).json()["tokens"] == body["tokens"]


# -- every route: auth, model, body, task -------------------------------------------------

NEW_ROUTES = {
    "/responses": {"input": SAY, "max_output_tokens": 2},
    "/messages": {"messages": [{"role": "user", "content": SAY}], "max_tokens": 2},
    "/messages/count_tokens": {"messages": [{"role": "user", "content": SAY}]},
    "/tokenize": {"prompt": SAY},
    "/detokenize": {"tokens": [1, 2]},
    "/embeddings": {"input": SAY},
    "/score": {"queries": SAY, "documents": [SAY]},
    "/rerank": {"query": SAY, "documents": [SAY]},
    "/classify": {"input": SAY},
}
POOLING = ("/embeddings", "/score", "/rerank", "/classify")


def _anthropic(path: str) -> bool:
    return "/messages" in path


def _assert_shape(r: httpx.Response, path: str, status: int, code: str | None = None) -> dict:
    assert r.status_code == status, (path, r.status_code, r.text)
    body = r.json()
    if _anthropic(path):
        assert body["type"] == "error" and set(body["error"]) == {"type", "message"}, body
        return body["error"]
    assert set(body["error"]) == {"message", "type", "param", "code"}, body
    if code is not None:
        assert body["error"]["code"] == code, body
    return body["error"]


@pytest.mark.conformance(
    *(Row(f"POST {path}", "401 without a key, under each prefix", HTTP, NA) for path in NEW_ROUTES),
    *(Row(f"POST {path}", "404 for an unknown model", HTTP, NA) for path in NEW_ROUTES),
    *(Row(f"POST {path}", "400 for a malformed body", HTTP, NA) for path in NEW_ROUTES),
    *(Row(f"POST {path}", "400 unsupported_task on a generative model", HTTP, NA) for path in POOLING),
)
def test_every_new_route_authenticates_checks_the_model_and_the_body(runtime_server, http):
    for prefix in PREFIXES:
        base = runtime_server.root_url + prefix.replace("{id}", runtime_server.endpoint_id)
        for path, body in NEW_ROUTES.items():
            url = base + path
            body = {"model": runtime_server.model, **body}
            error = _assert_shape(httpx.post(url, json=body, timeout=30), path, 401, "invalid_api_key")
            if _anthropic(path):
                assert error["type"] == "authentication_error"
            error = _assert_shape(http.post(url, json=body | {"model": "no-such-model"}), path, 404, "model_not_found")
            if _anthropic(path):
                assert error["type"] == "not_found_error"
            _assert_shape(http.post(url, content=b"{not json", headers={"content-type": "application/json"}),
                          path, 400)  # fmt: skip
            if path in POOLING:
                error = _assert_shape(http.post(url, json=body), path, 400, "unsupported_task")
                assert "text-generation model" in error["message"]
    # Another endpoint id in the guide's URL pattern is not served here.
    r = http.post(f"{runtime_server.root_url}/v2/other-endpoint/openai/v1/responses",
                  json={"model": runtime_server.model, "input": SAY})  # fmt: skip
    _assert_shape(r, "/responses", 404, "endpoint_not_found")


@pytest.mark.conformance(Row(RESPONSES, "body over MAX_REQUEST_BODY_BYTES is 413", HTTP, NA))
def test_new_routes_share_the_body_limit(http, runtime_server):
    big = {"model": runtime_server.model, "input": "x" * (300 * 1024)}
    _assert_shape(http.post(runtime_server.base_url + "/responses", json=big), "/responses", 413, "request_too_large")
    error = _assert_shape(http.post(runtime_server.base_url + "/messages", json=big | {"max_tokens": 1}),
                          "/messages", 413)  # fmt: skip
    assert error["type"] == "request_too_large"


def test_new_routes_have_metrics_and_one_log_line(openai_client, runtime_server, claude):
    route = "/v2/{endpoint_id}/openai/v1/responses"

    def requests_total() -> float:
        pattern = rf'^modelendpoint_requests_total{{method="POST",route="{re.escape(route)}",status="200"}} (\S+)$'
        found = re.search(pattern, runtime_server.metrics_text(), re.M)
        return float(found.group(1)) if found else 0.0

    def logged(path: str) -> list[dict]:
        return [json.loads(line) for line in runtime_server.log_text().splitlines()
                if line.startswith("{") and '"msg":"request"' in line and f'{path}"' in line]  # fmt: skip

    before, lines = requests_total(), len(logged(route))
    r = openai_client.responses.create(model=runtime_server.model, input=SAY, max_output_tokens=3)
    wait_for(lambda: requests_total() == before + 1 and len(logged(route)) == lines + 1, timeout=10, interval=0.1,
             what="the Responses request's counter and log line")  # fmt: skip
    entry = logged(route)[-1]
    assert entry["status"] == 200 and entry["model"] == runtime_server.model and entry["stream"] is False
    assert (entry["prompt_tokens"], entry["completion_tokens"]) == (r.usage.input_tokens, r.usage.output_tokens)

    lines = len(logged("/v1/messages"))
    with claude.messages.stream(model=runtime_server.model, max_tokens=3,
                                messages=[{"role": "user", "content": SAY}]) as stream:  # fmt: skip
        final = stream.get_final_message()
    wait_for(lambda: len(logged("/v1/messages")) == lines + 1, timeout=10, interval=0.1,
             what="the streamed Messages request's log line")  # fmt: skip
    entry = logged("/v1/messages")[-1]
    assert entry["stream"] is True and entry["ttft_ms"] > 0
    assert (entry["prompt_tokens"], entry["completion_tokens"]) == (final.usage.input_tokens, final.usage.output_tokens)
