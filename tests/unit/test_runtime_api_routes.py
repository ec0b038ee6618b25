"""Issue 14's APIs in the runtime's own code, with stand-ins at our seam (``Engine.state``).

The routes' table, caps and weights, the strict-tools default, the
Anthropic error shape (and the x-api-key header), the 400 for a route the
model does not serve, LoRA adapters from ADAPTERS_FILE (parsing, the
reconcile against a stand-in for vLLM's ``OpenAIServingModels``, the 503
and 404 of adapters loading and failed), ``reasoning_content`` beside
``reasoning``, the typed event streams (Responses, Messages) and their
error frames, the test server's tools chat template against the model's
own, and the conformance matrix's plugin. No engine: httpx's ASGI transport
over the real app.
"""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
from prometheus_client import CollectorRegistry

from modelendpoint_runtime import apis, errors
from modelendpoint_runtime.adapters import FAILED, LOADED, LOADING, Adapters, parse_adapters
from modelendpoint_runtime.apis import APIS
from modelendpoint_runtime.app import Runtime, create_app
from modelendpoint_runtime.limits import Limits
from modelendpoint_runtime.metrics import Metrics
from modelendpoint_runtime.settings import ConfigError, load_settings
from modelendpoint_runtime.streaming import EventStream, Reframer, mirror_reasoning

SECRET = "Traceback at /usr/lib/python3.11/secret_module.py"


def run(coro):
    return asyncio.run(coro)


async def call(app, method, path, key="key", **kw):
    headers = kw.pop("headers", {})
    if key:
        headers["Authorization"] = f"Bearer {key}"
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        return await client.request(method, path, headers=headers, **kw)


# -- stand-ins for vLLM's serving objects ------------------------------------------------


class Recorder:
    """Plays a serving object: records what it was given, answers ``answer(req)``, optionally holds."""

    def __init__(self, answer, hold: bool = False) -> None:
        self.answer = answer
        self.seen: list = []
        self.hold = hold
        self.release = asyncio.Event() if hold else None
        self.running = 0

    async def __call__(self, req, raw=None):
        self.seen.append(req)
        if self.release is not None:
            self.running += 1
            await self.release.wait()
            self.running -= 1
        result = self.answer(req)
        if isinstance(result, Exception):
            raise result
        return result

    create_chat_completion = create_completion = create_responses = create_messages = count_tokens = __call__
    create_tokenize = create_detokenize = __call__


class Models:
    def __init__(self, loras=()) -> None:
        self.lora_requests = {name: object() for name in loras}

    async def show_available_models(self):
        cards = [{"id": "m", "object": "model", "created": 1, "owned_by": "vllm", "root": "/models/m", "parent": None}]
        cards += [{"id": n, "object": "model", "created": 1, "owned_by": "vllm", "root": "/x", "parent": "m"}
                  for n in self.lora_requests]  # fmt: skip
        return SimpleNamespace(data=[SimpleNamespace(model_dump=lambda c=c: dict(c)) for c in cards])


def make(state: dict, tasks=("generate",), loras=(), **env):
    settings = load_settings({"MODEL_NAME": "m", "API_KEY": "key", "MAX_CONCURRENT_REQUESTS": "4", **env})
    runtime = Runtime(settings, Metrics(CollectorRegistry()))

    async def never():
        raise AssertionError("not started in unit tests")

    app = create_app(runtime, never)
    names = {api.state for api in APIS.values()}
    full = {name: None for name in names} | {"openai_serving_models": Models(loras)} | state
    runtime.engine = SimpleNamespace(state=SimpleNamespace(**full), dead=False, shutdown=lambda: None, tasks=tasks)
    return runtime, app


def dumpable(body: dict):
    return SimpleNamespace(model_dump=lambda **kw: dict(body))


MESSAGES = {"model": "m", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]}


# -- the table and the pure checks ---------------------------------------------------------


def test_every_api_has_a_route_under_every_prefix_and_a_route_label():
    from modelendpoint_runtime.app import PREFIXES, route_label

    _, app = make({})
    paths = {r.path for r in app.routes}
    for api in APIS.values():
        for prefix in PREFIXES:
            assert prefix + api.suffix in paths
            assert route_label(prefix.replace("{endpoint_id}", "ep-1") + api.suffix) == prefix + api.suffix
    assert apis.dialect_of("/v2/x/openai/v1/messages") == "anthropic"
    assert apis.dialect_of("/v1/messages/count_tokens") == "anthropic"
    assert apis.dialect_of("/v1/chat/completions") == "openai"


@pytest.mark.parametrize(
    "name, body, expected",
    [
        ("embeddings", {"input": "a"}, 1),
        ("embeddings", {"input": ["a", "b", "c"]}, 3),
        ("embeddings", {"input": [1, 2, 3]}, 1),  # one prompt as token ids
        ("embeddings", {"input": [[1, 2], [3]]}, 2),
        ("embeddings", {"messages": [{"role": "user", "content": "x"}]}, 1),
        ("embeddings", {"messages": [[{"role": "user", "content": "x"}]] * 2}, 2),
        ("score", {"queries": "q", "documents": ["a", "b"]}, 2),
        ("score", {"text_1": ["a", "b", "c"], "text_2": ["x", "y", "z"]}, 3),
        ("rerank", {"query": "q", "documents": ["a", "b", "c", "d"]}, 4),
        ("classify", {"input": ["a", "b"]}, 2),
        ("responses", {"input": "x"}, 1),
        ("messages", MESSAGES, 1),
        ("tokenize", {"prompt": "x"}, 1),
    ],
)
def test_admission_weight_is_the_engine_sequences(name, body, expected):
    assert apis.weight(APIS[name], body) == expected


@pytest.mark.parametrize(
    "name, body, param",
    [
        ("responses", {"input": [{"role": "user", "content": "x"}] * 3}, "input"),
        ("responses", {"input": "x", "max_output_tokens": 101}, "max_output_tokens"),
        ("responses", {"input": "x", "max_output_tokens": 0}, "max_output_tokens"),
        ("responses", {"input": "x", "background": True}, "background"),
        ("messages", {**MESSAGES, "max_tokens": 101}, "max_tokens"),
        ("messages", {**MESSAGES, "messages": [{"role": "user", "content": "x"}] * 3}, "messages"),
        ("messages", {**MESSAGES, "stop_sequences": ["a", "b", "c"]}, "stop_sequences"),
        ("embeddings", {"input": ["a"] * 5}, "input"),
        ("embeddings", {"messages": [[{"role": "user", "content": "x"}]] * 5}, "messages"),
        ("score", {"queries": "q", "documents": ["a"] * 5}, "documents"),
        ("rerank", {"query": "q", "documents": ["a"] * 5}, "documents"),
        ("tokenize", {"messages": [{"role": "user", "content": "x"}] * 3}, "messages"),
    ],
)
def test_caps_on_the_new_apis_name_the_parameter(name, body, param):
    limits = Limits(max_tokens=100, messages=2, stop=2, prompts=4)
    err = apis.check_api_shape(APIS[name], body, limits)
    assert err is not None and err.status == 400 and err.param == param


def test_within_the_caps_nothing_is_refused():
    limits = Limits(max_tokens=100, messages=2, stop=2, prompts=4)
    for name, body in (("responses", {"input": "x", "max_output_tokens": 100}), ("messages", MESSAGES),
                       ("embeddings", {"input": ["a"] * 4}), ("rerank", {"query": "q", "documents": ["a"] * 4})):
        assert apis.check_api_shape(APIS[name], body, limits) is None, name


def test_tools_are_strict_unless_the_client_says_otherwise():
    chat = {"tools": [{"type": "function", "function": {"name": "a"}},
                      {"type": "function", "function": {"name": "b", "strict": False}},
                      {"type": "function", "function": {"name": "c", "strict": None}}]}  # fmt: skip
    assert apis.default_strict_tools("chat", chat) == 2
    assert [t["function"]["strict"] for t in chat["tools"]] == [True, False, True]
    responses = {"tools": [{"type": "function", "name": "a"}, {"type": "web_search"}]}
    assert apis.default_strict_tools("responses", responses) == 1
    assert responses["tools"][0]["strict"] is True and "strict" not in responses["tools"][1]
    messages = {"tools": [{"name": "a", "input_schema": {}}, {"type": "web_search_20250305", "name": "w"}]}
    assert apis.default_strict_tools("messages", messages) == 1 and "strict" not in messages["tools"][1]
    assert apis.default_strict_tools("chat", {"tools": "nonsense"}) == 0


def test_the_strict_default_reaches_vllms_request_and_can_be_turned_off():
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    body = {"model": "m", "messages": [{"role": "user", "content": "x"}], "tools": [tool], "tool_choice": "required"}

    def answer(req):
        return dumpable({"choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 1}})

    for env, strict in (({}, True), ({"TOOL_STRICT_DEFAULT": "false"}, None)):
        chat = Recorder(answer)
        _, app = make({"openai_serving_chat": chat}, **env)
        r = run(call(app, "POST", "/v1/chat/completions", json=json.loads(json.dumps(body))))
        assert r.status_code == 200, r.text
        assert chat.seen[0].tools[0].function.strict is strict


def test_vllms_request_models_validate_each_api():
    from pydantic import ValidationError

    req = apis.validate(APIS["embeddings"], {"model": "m", "input": ["a", "b"], "encoding_format": "base64"})
    assert req.encoding_format == "base64"
    assert type(apis.validate(APIS["score"], {"queries": "q", "documents": ["d"]})).__name__ == \
        "ScoreQueriesDocumentsRequest"
    assert type(apis.validate(APIS["tokenize"], {"messages": [{"role": "user", "content": "x"}]})).__name__ == \
        "TokenizeChatRequest"
    with pytest.raises(ValidationError) as exc:
        apis.validate(APIS["embeddings"], {"model": "m", "input": 12})
    # The plain member's error, not a union's five: it names `input`.
    assert errors.from_validation_errors([dict(e) for e in exc.value.errors()]).param == "input"


# -- errors: the route's model, task and dialect ------------------------------------------------


def test_a_route_the_model_does_not_serve_is_400_saying_what_the_model_is():
    _, app = make({}, tasks=("embed",))
    r = run(call(app, "POST", "/v1/chat/completions", json={"model": "m", "messages": [{"role": "user",
                                                                                        "content": "x"}]}))
    err = r.json()["error"]
    assert r.status_code == 400 and err["code"] == "unsupported_task"
    assert err["message"] == ("The model `m` is an embedding model (task: embed); it does not serve "
                              "POST /chat/completions.")
    r = run(call(app, "POST", "/v1/messages", json=MESSAGES))
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error" and r.json()["type"] == "error"
    _, app = make({})
    r = run(call(app, "POST", "/v1/embeddings", json={"model": "m", "input": "x"}))
    assert r.status_code == 400 and "text-generation model" in r.json()["error"]["message"]


def test_messages_errors_are_anthropic_shaped_and_take_x_api_key():
    _, app = make({"anthropic_serving_messages": Recorder(lambda req: dumpable({"type": "message"}))})
    r = run(call(app, "POST", "/v1/messages", key=None, json=MESSAGES))
    assert r.status_code == 401 and r.json() == {"type": "error", "error": {
        "type": "authentication_error", "message": errors.invalid_api_key(False).message}}  # fmt: skip
    assert r.headers["www-authenticate"] == "Bearer"
    r = run(call(app, "POST", "/v1/messages", key=None, headers={"x-api-key": "key"}, json=MESSAGES))
    assert r.status_code == 200 and r.json() == {"type": "message"}
    r = run(call(app, "POST", "/v1/messages", key=None, headers={"x-api-key": "wrong"}, json=MESSAGES))
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    r = run(call(app, "POST", "/v1/messages", json=MESSAGES | {"model": "other"}))
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
    r = run(call(app, "POST", "/v1/messages", content=b"{", headers={"content-type": "application/json"}))
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    r = run(call(app, "POST", "/v1/messages", json={"model": "m", "messages": [], "max_tokens": "many"}))
    assert r.status_code == 400 and "max_tokens" in r.json()["error"]["message"]
    # x-api-key works on the OpenAI routes too (a key is a key); the error shape there stays OpenAI's.
    r = run(call(app, "GET", "/v1/models", key=None, headers={"x-api-key": "key"}))
    assert r.status_code == 200
    assert run(call(app, "GET", "/v1/models", key=None)).json()["error"]["code"] == "invalid_api_key"


@pytest.mark.parametrize(
    "err, kind",
    [
        (errors.invalid_request("x"), "invalid_request_error"),
        (errors.invalid_api_key(True), "authentication_error"),
        (errors.model_not_found("x"), "not_found_error"),
        (errors.body_too_large(1), "request_too_large"),
        (errors.request_timeout(1), "invalid_request_error"),
        (errors.overloaded(1), "overloaded_error"),
        (errors.draining(1), "overloaded_error"),
        (errors.not_ready(1), "overloaded_error"),
        (errors.internal_error(), "api_error"),
        (errors.keys_unavailable(1), "api_error"),
    ],
)
def test_anthropic_error_types_follow_the_status(err, kind):
    assert errors.anthropic_body(err) == {"type": "error", "error": {"type": kind, "message": err.message}}


def test_model_is_optional_on_vllms_extensions_only():
    tokenize = Recorder(lambda req: dumpable({"count": 1, "tokens": [1]}))
    _, app = make({"serving_tokenization": tokenize, "openai_serving_responses": Recorder(lambda r: None)})
    assert run(call(app, "POST", "/v1/tokenize", json={"prompt": "x"})).status_code == 200
    r = run(call(app, "POST", "/v1/responses", json={"input": "x"}))
    assert r.status_code == 400 and r.json()["error"]["code"] == "missing_required_parameter"


# -- pooling answers ---------------------------------------------------------------------------


def test_pooling_answers_pass_through_with_their_usage_logged(caplog):
    from fastapi.responses import JSONResponse

    body = {"object": "list", "data": [{"index": 0, "embedding": [0.5]}], "usage": {"prompt_tokens": 7,
                                                                                 "total_tokens": 7}}  # fmt: skip
    runtime, app = make({"serving_embedding": Recorder(lambda req: JSONResponse(body))}, tasks=("embed",))
    with caplog.at_level(logging.INFO, logger="modelendpoint_runtime"):
        r = run(call(app, "POST", "/v1/embeddings", json={"model": "m", "input": ["a", "b"]}))
    assert r.status_code == 200 and r.json() == body
    (line,) = [rec.fields for rec in caplog.records if rec.getMessage() == "request"]
    assert line["prompt_tokens"] == 7 and line["route"] == "/v1/embeddings" and line["model"] == "m"
    assert runtime.admission.in_flight == 0


def test_pooling_errors_raised_by_vllm_are_400s():
    boom = Recorder(lambda req: ValueError("This model's maximum context length is 512 tokens. However, you "
                                           "requested 900 tokens in the input."))  # fmt: skip
    _, app = make({"serving_embedding": boom}, tasks=("embed",))
    r = run(call(app, "POST", "/v1/embeddings", json={"model": "m", "input": "x"}))
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    assert r.json()["error"]["param"] == "input"
    crash = Recorder(lambda req: RuntimeError(SECRET))
    _, app = make({"serving_scores": crash}, tasks=("embed",))
    r = run(call(app, "POST", "/v1/rerank", json={"query": "q", "documents": ["d"]}))
    assert r.status_code == 500 and "secret" not in r.text


def test_embedding_inputs_weigh_on_admission():
    from fastapi.responses import JSONResponse

    embed = Recorder(lambda req: JSONResponse({"usage": {}}), hold=True)
    runtime, app = make({"serving_embedding": embed}, tasks=("embed",))  # MAX_CONCURRENT_REQUESTS=4

    async def scenario():
        first = asyncio.ensure_future(call(app, "POST", "/v1/embeddings", json={"model": "m", "input": ["a"] * 3}))
        while embed.running < 1:
            await asyncio.sleep(0.01)
        assert runtime.admission.in_flight == 3
        refused = await call(app, "POST", "/v1/embeddings", json={"model": "m", "input": ["a", "b"]})
        fits = asyncio.ensure_future(call(app, "POST", "/v1/embeddings", json={"model": "m", "input": "a"}))
        while embed.running < 2:
            await asyncio.sleep(0.01)
        embed.release.set()
        return refused, await first, await fits

    refused, first, fits = run(scenario())
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "overloaded"
    assert first.status_code == 200 and fits.status_code == 200 and runtime.admission.in_flight == 0


# -- LoRA adapters ---------------------------------------------------------------------------------


def test_parse_adapters():
    text = '[{"name": "a", "source": "org/a"}, {"name": "b", "source": " /models/b ", "extra": 1}]'
    assert [(a.name, a.source) for a in parse_adapters(text, "m")] == [("a", "org/a"), ("b", "/models/b")]
    assert parse_adapters("[]", "m") == ()
    for bad, reason in (("{", "not JSON"), ('{"name": "a"}', "not a JSON list"), ("[1]", "not an object"),
                        ('[{"source": "s"}]', "no name"), ('[{"name": "a"}]', "no source"),
                        ('[{"name": "a", "source": "s"}, {"name": "a", "source": "t"}]', "twice"),
                        ('[{"name": "m", "source": "s"}]', "served model")):  # fmt: skip
        with pytest.raises(ValueError, match=reason):
            parse_adapters(bad, "m")


def test_a_bad_adapters_file_at_start_is_a_one_line_config_error(tmp_path):
    path = tmp_path / "adapters.json"
    path.write_text("[{")
    with pytest.raises(ConfigError, match=r"^invalid ADAPTERS_FILE='.*': not JSON"):
        Adapters(str(path), "m").read_at_start()
    with pytest.raises(ConfigError, match="cannot read it"):
        Adapters(str(tmp_path / "missing.json"), "m").read_at_start()


def test_adapters_need_enable_lora():
    from modelendpoint_runtime.engine import engine_args

    env = {"MODEL_NAME": "m", "ADAPTERS_FILE": "/etc/modelendpoint/adapters/adapters.json"}
    with pytest.raises(ConfigError, match="^invalid ADAPTERS_FILE=.*ENABLE_LORA=true"):
        engine_args(env, load_settings(env))
    args = engine_args(env | {"ENABLE_LORA": "true"}, load_settings(env)).args
    assert args.enable_lora is True


class FakeServingModels:
    """vLLM's OpenAIServingModels at our seam: load/unload by name; some sources fail."""

    def __init__(self, failing=()) -> None:
        self.lora_requests: dict[str, str] = {}
        self.failing = set(failing)
        self.calls: list[tuple[str, str]] = []

    async def load_lora_adapter(self, request):
        from http import HTTPStatus

        from vllm.entrypoints.serve import create_error_response

        self.calls.append(("load", request.lora_name))
        if request.lora_path in self.failing:
            return create_error_response(message=f"No adapter found for {request.lora_path}",
                                         err_type="NotFoundError", status_code=HTTPStatus.NOT_FOUND)  # fmt: skip
        self.lora_requests[request.lora_name] = request.lora_path
        return "Success"

    async def unload_lora_adapter(self, request):
        self.calls.append(("unload", request.lora_name))
        del self.lora_requests[request.lora_name]
        return "Success"


def write(path: Path, entries) -> None:
    path.write_text(json.dumps([{"name": n, "source": s} for n, s in entries]))


def test_reconcile_loads_added_unloads_removed_and_reloads_a_changed_source(tmp_path, monkeypatch):
    path = tmp_path / "adapters.json"
    write(path, [("a", "/a"), ("bad", "/missing")])
    models = FakeServingModels(failing={"/missing"})
    adapters = Adapters(str(path), "m")
    adapters.read_at_start()
    assert {n: s.state for n, s in adapters.status.items()} == {"a": LOADING, "bad": LOADING}
    run(adapters.reconcile(models))
    report = adapters.report()["adapters"]
    assert [(e["name"], e["state"]) for e in report] == [("a", LOADED), ("bad", FAILED)]
    assert report[1]["error"] == "No adapter found for /missing" and report[0]["error"] is None

    # A failed adapter waits for its retry time; a loaded one is left alone.
    models.calls.clear()
    run(adapters.reconcile(models))
    assert models.calls == []
    adapters.status["bad"].retry_at = 0
    run(adapters.reconcile(models))
    assert models.calls == [("load", "bad")]

    write(path, [("a", "/a2"), ("b", "/b")])
    assert adapters.reread()
    models.calls.clear()
    run(adapters.reconcile(models))
    assert models.calls == [("unload", "a"), ("load", "a"), ("load", "b")]
    assert models.lora_requests == {"a": "/a2", "b": "/b"}
    assert [e["name"] for e in adapters.report()["adapters"]] == ["a", "b"]

    path.write_text("not json")
    assert not adapters.reread()
    run(adapters.reconcile(models))
    assert models.lora_requests == {"a": "/a2", "b": "/b"} and "not JSON" in adapters.report()["file_error"]
    write(path, [])
    assert adapters.reread()
    run(adapters.reconcile(models))
    assert models.lora_requests == {} and adapters.report() == {"adapters": []}


def test_an_adapter_name_is_served_once_loaded_503_while_loading_404_once_failed():
    def answer(req):
        return dumpable({"model": req.model, "choices": [], "usage": {}})

    runtime, app = make({"openai_serving_chat": Recorder(answer)}, loras=("ready",))
    runtime.adapters.status = {
        "slow": SimpleNamespace(state=LOADING), "broken": SimpleNamespace(state=FAILED),
    }  # fmt: skip
    body = {"messages": [{"role": "user", "content": "x"}]}
    assert run(call(app, "POST", "/v1/chat/completions", json=body | {"model": "ready"})).json()["model"] == "ready"
    r = run(call(app, "POST", "/v1/chat/completions", json=body | {"model": "slow"}))
    assert r.status_code == 503 and r.headers["Retry-After"] == "1" and r.json()["error"]["code"] == "model_loading"
    r = run(call(app, "POST", "/v1/chat/completions", json=body | {"model": "broken"}))
    assert r.status_code == 404 and "failed to load" in r.json()["error"]["message"]
    assert run(call(app, "POST", "/v1/chat/completions", json=body | {"model": "nope"})).status_code == 404


def test_models_list_adapters_with_their_parent_and_adapters_on_the_metrics_port():
    runtime, app = make({}, loras=("lora-1",), METRICS_PORT="9400")
    cards = run(call(app, "GET", "/v1/models")).json()["data"]
    assert cards[0]["id"] == "m" and "parent" not in cards[0] and "root" not in cards[0]
    assert cards[1] == {"id": "lora-1", "object": "model", "created": 1, "owned_by": "modelendpoint", "parent": "m"}
    assert run(call(app, "GET", "/v1/models/lora-1")).json()["parent"] == "m"
    assert run(call(app, "GET", "/adapters")).json() == {"adapters": []}  # the API port, with the key


# -- reasoning and the typed event streams -------------------------------------------------------------


def test_reasoning_content_beside_reasoning():
    body = {"choices": [{"message": {"content": "a", "reasoning": "r"}}, {"message": {"content": "b",
                                                                                     "reasoning": None}}]}
    mirror_reasoning(body)
    assert body["choices"][0]["message"]["reasoning_content"] == "r"
    assert "reasoning_content" not in body["choices"][1]["message"]
    frame = 'data: {"choices":[{"index":0,"delta":{"reasoning":"think"}}]}\n\n'
    out = Reframer("sse", "messages", mirror=True).feed(frame)
    assert json.loads(out[6:])["choices"][0]["delta"] == {"reasoning": "think", "reasoning_content": "think"}
    plain = 'data: {"choices":[{"index":0,"delta":{"content":"x"}}]}\n\n'
    assert Reframer("sse", "messages", mirror=True).feed(plain) == plain  # not parsed


def test_a_streamed_reasoning_chat_carries_both_names():
    async def gen():
        yield 'data: {"choices":[{"index":0,"delta":{"reasoning":"hm"}}]}\n\n'
        yield 'data: {"choices":[{"index":0,"delta":{"content":"ok"}}]}\n\n'
        yield "data: [DONE]\n\n"

    _, app = make({"openai_serving_chat": Recorder(lambda req: gen())})
    body = {"model": "m", "messages": [{"role": "user", "content": "x"}], "stream": True}
    frames = [f for f in run(call(app, "POST", "/v1/chat/completions", json=body)).text.split("\n\n") if f]
    assert json.loads(frames[0][6:])["choices"][0]["delta"] == {"reasoning": "hm", "reasoning_content": "hm"}
    assert frames[-1] == "data: [DONE]"


def test_responses_events_are_framed_with_their_type_and_usage_is_read():
    from openai.types.responses import ResponseTextDeltaEvent

    events = EventStream("responses")
    delta = ResponseTextDeltaEvent(type="response.output_text.delta", delta="Hi", item_id="i", output_index=0,
                                   content_index=0, sequence_number=3, logprobs=[])  # fmt: skip
    frame = events.frame(delta)
    assert frame.startswith("event: response.output_text.delta\ndata: {") and frame.endswith("\n\n")
    assert json.loads(frame.split("data: ", 1)[1])["delta"] == "Hi" and events.first_token
    completed = SimpleNamespace(type="response.completed", sequence_number=9,
                                response=SimpleNamespace(usage=SimpleNamespace(input_tokens=5, output_tokens=2)),
                                model_dump_json=lambda **kw: "{}")  # fmt: skip
    events.frame(completed)
    assert (events.prompt_tokens, events.completion_tokens) == (5, 2)
    error = json.loads(events.error_frame().split("data: ", 1)[1])
    assert error["type"] == "error" and error["code"] == "internal_error" and error["sequence_number"] == 10


def test_messages_stream_errors_carry_no_internals_and_usage_is_read():
    events = EventStream("messages")
    start = ('event: message_start\ndata: {"type":"message_start","message":{"usage":{"input_tokens":9,'
             '"output_tokens":0}}}\n\n')
    assert events.frame(start) == start and events.prompt_tokens == 9
    events.frame('event: content_block_delta\ndata: {"type":"content_block_delta"}\n\n')
    assert events.first_token
    events.frame('event: message_delta\ndata: {"type":"message_delta","usage":{"output_tokens":4}}\n\n')
    assert events.completion_tokens == 4
    vllm_error = f'event: error\ndata: {{"type":"error","error":{{"type":"internal_error","message":"{SECRET}"}}}}\n\n'
    out = events.frame(vllm_error)
    assert "secret" not in out and json.loads(out.split("data: ", 1)[1])["error"]["type"] == "api_error"


def test_a_messages_stream_that_fails_ends_with_an_anthropic_error_event():
    async def gen():
        yield 'event: message_start\ndata: {"type":"message_start","message":{"usage":{"input_tokens":3}}}\n\n'
        raise RuntimeError(SECRET)

    runtime, app = make({"anthropic_serving_messages": Recorder(lambda req: gen())})
    r = run(call(app, "POST", "/v1/messages", json=MESSAGES | {"stream": True}))
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    frames = [f for f in r.text.split("\n\n") if f]
    assert frames[-1].startswith("event: error\ndata: ") and "secret" not in r.text
    assert runtime.admission.in_flight == 0


# -- the shared test server's tools template ------------------------------------------------------------


def test_the_tools_template_renders_what_the_models_own_template_renders_without_tools(embedded_model_dir):
    from transformers import AutoTokenizer

    from fixtures_runtime import TOOLS_CHAT_TEMPLATE

    tok = AutoTokenizer.from_pretrained(str(embedded_model_dir))
    conversations = [
        [{"role": "user", "content": "Hi"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
         {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Bye"}],
    ]  # fmt: skip
    for messages in conversations:
        for prompt in (True, False):
            own = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt)
            ours = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt,
                                           chat_template=TOOLS_CHAT_TEMPLATE)  # fmt: skip
            assert ours == own
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    call = {"id": "1", "type": "function", "function": {"name": "f", "arguments": {"a": 1}}}
    text = tok.apply_chat_template(
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "", "tool_calls": [call]},
         {"role": "tool", "tool_call_id": "1", "content": "42"}],
        tools=tools, tokenize=False, add_generation_prompt=True, chat_template=TOOLS_CHAT_TEMPLATE,
    )  # fmt: skip
    assert "<tools>\n" + json.dumps(tools[0]) in text.replace(", ", ", ")
    assert '<tool_call>\n{"name": "f", "arguments": {"a": 1}}\n</tool_call>' in text
    assert "<tool_response>\n42\n</tool_response>" in text and text.endswith("<|im_start|>assistant\n")


# -- the conformance matrix ---------------------------------------------------------------------------------


def test_conformance_modules_are_exactly_the_files_that_claim_rows(repo_dir):
    import re

    import conformance

    claims = re.compile(r"^@pytest\.mark\.conformance\(|marks=pytest\.mark\.conformance\(", re.M)
    claiming = sorted(
        p.relative_to(repo_dir).as_posix() for p in (repo_dir / "tests").rglob("test_*.py")
        if claims.search(p.read_text())  # fmt: skip
    )
    assert sorted(conformance.MODULES) == claiming


def test_conformance_rows_render_sorted_with_the_worst_outcome():
    import conformance
    from conformance import BOTH, PY, Row

    rows = Row("POST /v1/chat/completions", "n", PY, BOTH).expanded()
    assert [r.stream for r in rows] == ["no", "yes"]
    text = conformance.render({rows[1]: ("FAIL", ["test_b"]), rows[0]: ("pass", ["test_a", "test_a"])},
                              {PY: "openai 1.0 (Python)"}, "vLLM 0")  # fmt: skip
    lines = [line for line in text.splitlines() if line.startswith("| `")]
    assert lines == ["| `POST /v1/chat/completions` | n | openai 1.0 (Python) | no | pass | `test_a` |",
                     "| `POST /v1/chat/completions` | n | openai 1.0 (Python) | yes | FAIL | `test_b` |"]  # fmt: skip
    assert "GENERATED" in text and "vLLM 0" in text


def test_conformance_compares_only_after_the_whole_set_ran():
    import conformance

    rec = conformance.Recorder()
    rec.modules = set(conformance.MODULES)
    item = SimpleNamespace(name="t", iter_markers=lambda name: [])
    rec.collected = {"a": item, "b": item}
    rec.finished = {"a"}
    assert rec.whole() == (False, "1 conformance tests did not run")
    rec.finished.add("b")
    assert rec.whole() == (True, "")
    rec.deselected = 1
    assert not rec.whole()[0]
    rec.deselected = 0
    rec.modules.discard(conformance.MODULES[0])
    assert not rec.whole()[0]


# -- prompt log-probabilities with LoRA enabled ----------------------------------------------------------


def test_prompt_logprobs_param_names_what_asks_for_them():
    from modelendpoint_runtime.limits import prompt_logprobs_param

    def req(**kw):
        return SimpleNamespace(**{"prompt_logprobs": None, "echo": False, "logprobs": None, "top_logprobs": 0} | kw)

    assert prompt_logprobs_param(req(), "completion") is None
    assert prompt_logprobs_param(req(prompt_logprobs=0), "completion") == "prompt_logprobs"
    assert prompt_logprobs_param(req(echo=True), "completion") is None
    assert prompt_logprobs_param(req(echo=True, logprobs=1), "completion") == "echo"
    assert prompt_logprobs_param(req(echo=True), "chat") == "echo"  # chat's top_logprobs defaults to 0
    assert prompt_logprobs_param(req(echo=True, top_logprobs=None), "chat") is None


def test_with_lora_enabled_requests_that_need_prompt_logprobs_are_400_and_chat_echo_is_made_safe():
    def answer(req):
        return dumpable({"choices": [], "usage": {}})

    chat, completion = Recorder(answer), Recorder(answer)
    runtime, app = make({"openai_serving_chat": chat, "openai_serving_completion": completion})
    runtime.engine.args = SimpleNamespace(enable_lora=True)
    messages = [{"role": "user", "content": "x"}]
    for path, body, param in (
        ("/v1/completions", {"prompt": "x", "prompt_logprobs": 0}, "prompt_logprobs"),
        ("/v1/completions", {"prompt": "x", "echo": True, "logprobs": 1}, "echo"),
        ("/v1/chat/completions", {"messages": messages, "echo": True, "logprobs": True}, "echo"),
        ("/v1/chat/completions", {"messages": messages, "echo": True, "best_of": 2}, "echo"),
        ("/v1/completions", {"prompt": [1, 2], "echo": True, "best_of": 2}, "echo"),
    ):
        r = run(call(app, "POST", path, json={"model": "m", **body}))
        assert r.status_code == 400 and r.json()["error"]["param"] == param, (body, r.text)
    assert chat.seen == [] and completion.seen == []
    r = run(call(app, "POST", "/v1/chat/completions", json={"model": "m", "messages": messages, "echo": True}))
    assert r.status_code == 200 and chat.seen[0].echo and chat.seen[0].top_logprobs is None
    # Without LoRA nothing is refused.
    runtime.engine.args = SimpleNamespace(enable_lora=False)
    r = run(call(app, "POST", "/v1/completions", json={"model": "m", "prompt": "x", "prompt_logprobs": 0}))
    assert r.status_code == 200


def test_best_of_with_echo_echoes_text_prompts_without_prompt_logprobs():
    def samples(req):
        choices = [{"index": i, "text": f" s{i}", "finish_reason": "length",
                    "logprobs": {"token_logprobs": [-float(i)], "tokens": ["t"], "text_offset": [0],
                                 "top_logprobs": None}} for i in range(req.n * len(req.prompt))]  # fmt: skip
        return dumpable({"choices": choices, "usage": {}})

    completion = Recorder(samples)
    runtime, app = make({"openai_serving_completion": completion})
    runtime.engine.args = SimpleNamespace(enable_lora=True)
    body = {"model": "m", "prompt": ["A", "B"], "echo": True, "best_of": 2, "max_tokens": 1}
    r = run(call(app, "POST", "/v1/completions", json=body))
    assert r.status_code == 200, r.text
    (req,) = completion.seen
    assert req.echo is False and req.n == 2  # the engine was asked for no echo, so no prompt log-probabilities
    assert [(c["index"], c["text"]) for c in r.json()["choices"]] == [(0, "A s0"), (1, "B s2")]
