"""Tool calling and structured outputs through the chat and completions routes, on the real engine.

The shared server runs the way a ModelEndpoint with ``engine.toolCallParser:
hermes``, ``engine.enableAutoToolChoice: true`` and an inline
``engine.chatTemplate`` runs (tests/fixtures_runtime.py). Tools are sent as
users send them, without ``strict``: the runtime treats them as strict
(TOOL_STRICT_DEFAULT), so a forced call's arguments follow the schema.
Arguments are checked with jsonschema against the tool's own schema.
Greedy decoding; each forced call costs ~45 generated tokens, so each
combination runs once.
"""

from __future__ import annotations

import json

import httpx
import jsonschema
import openai
import pytest

from conformance import BOTH, HTTP, JS, NA, NO, PY, YES, Row
from fixtures_runtime import run_node

WEATHER_SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"],
    "additionalProperties": False,
}
WEATHER = {
    "type": "function",
    "function": {"name": "get_weather", "description": "Get the current weather in a city.",
                 "parameters": WEATHER_SCHEMA},
}  # fmt: skip
TIME = {
    "type": "function",
    "function": {"name": "get_time", "description": "Get the local time in a city.",
                 "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}},
}  # fmt: skip
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
NAMED = {"type": "function", "function": {"name": "get_weather"}}
CHAT = "POST /chat/completions"


def assert_weather_call(name: str | None, arguments: str) -> dict:
    assert name == "get_weather"
    args = json.loads(arguments)
    jsonschema.validate(args, WEATHER_SCHEMA)
    return args


def streamed_call(stream) -> tuple[str | None, str, str | None, int]:
    """Reassemble a streamed tool call from its deltas: (name, arguments, finish_reason, calls)."""
    name, arguments, finish, ids = None, "", None, set()
    for chunk in stream:
        if not chunk.choices:
            continue
        choice = chunk.choices[0]
        for delta in choice.delta.tool_calls or []:
            assert delta.index == 0
            if delta.id:
                ids.add(delta.id)
            if delta.function and delta.function.name:
                name = delta.function.name
            if delta.function and delta.function.arguments:
                arguments += delta.function.arguments
        finish = choice.finish_reason or finish
    return name, arguments, finish, len(ids)


@pytest.mark.conformance(
    Row(CHAT, "tools; tool_choice: named function", PY, NO),
    Row(CHAT, "tools: strict by default (omitted strict)", PY, NO),
)
def test_named_tool_choice_gives_a_call_valid_against_the_schema(openai_client, runtime_server):
    r = openai_client.chat.completions.create(model=runtime_server.model, messages=ASK, tools=[WEATHER, TIME],
                                              tool_choice=NAMED, max_tokens=120, temperature=0)  # fmt: skip
    message = r.choices[0].message
    assert len(message.tool_calls) == 1 and message.tool_calls[0].type == "function"
    assert_weather_call(message.tool_calls[0].function.name, message.tool_calls[0].function.arguments)
    assert message.tool_calls[0].id
    assert r.usage.completion_tokens > 0


@pytest.mark.conformance(Row(CHAT, "tools; tool_choice: named function", PY, YES))
def test_named_tool_choice_streams_deltas_that_reassemble(openai_client, runtime_server):
    stream = openai_client.chat.completions.create(model=runtime_server.model, messages=ASK, tools=[WEATHER],
                                                   tool_choice=NAMED, max_tokens=120, temperature=0,
                                                   stream=True)  # fmt: skip
    name, arguments, finish, calls = streamed_call(stream)
    assert calls == 1 and finish in ("stop", "tool_calls")
    assert_weather_call(name, arguments)


@pytest.mark.conformance(Row(CHAT, "tools; tool_choice: required", PY, YES))
def test_required_tool_choice_streams_a_valid_call(openai_client, runtime_server):
    stream = openai_client.chat.completions.create(model=runtime_server.model, messages=ASK, tools=[WEATHER],
                                                   tool_choice="required", max_tokens=120, temperature=0,
                                                   stream=True)  # fmt: skip
    name, arguments, finish, calls = streamed_call(stream)
    assert calls == 1 and finish == "tool_calls"
    assert_weather_call(name, arguments)


@pytest.mark.conformance(
    Row(CHAT, "tools; tool_choice: required", PY, NO),
    Row(CHAT, "tool round trip: call, tool message, answer", PY, NO),
    Row(CHAT, "tools; tool_choice: auto, the model answers in text", PY, NO),
)
def test_required_call_then_tool_message_then_an_answer(openai_client, runtime_server):
    model = runtime_server.model
    r = openai_client.chat.completions.create(model=model, messages=ASK, tools=[WEATHER], tool_choice="required",
                                              max_tokens=120, temperature=0)  # fmt: skip
    assert r.choices[0].finish_reason == "tool_calls"
    (call,) = r.choices[0].message.tool_calls
    args = assert_weather_call(call.function.name, call.function.arguments)

    # The call goes back as the assistant's message, its result as a `tool` message; with
    # tool_choice auto (the parser's) the model answers in text.
    conversation = [
        *ASK,
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": call.id, "type": "function",
             "function": {"name": call.function.name, "arguments": call.function.arguments}}]},
        {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"city": args["city"], "temperature": 21})},
    ]  # fmt: skip
    answer = openai_client.chat.completions.create(model=model, messages=conversation, tools=[WEATHER],
                                                   tool_choice="auto", max_tokens=16, temperature=0)  # fmt: skip
    message = answer.choices[0].message
    assert message.content and not message.tool_calls
    # The template put the call and its result in the prompt: far longer than the question alone.
    assert answer.usage.prompt_tokens > r.usage.prompt_tokens + 20


def _earlier_call(index: int, city: str) -> dict:
    arguments = json.dumps({"city": city, "unit": "celsius"})
    return {"role": "assistant", "content": None, "tool_calls": [
        {"id": f"call_{index}", "type": "function", "function": {"name": "get_weather", "arguments": arguments}}]}


# Two earlier questions the assistant answered with a call: SmolLM2-135M writes the
# <tool_call> format itself only after examples (asked once, it answers in prose).
FEW_SHOT_CALLS = [
    {"role": "user", "content": "What is the weather in London?"}, _earlier_call(0, "London"),
    {"role": "user", "content": "What is the weather in Berlin?"}, _earlier_call(1, "Berlin"),
    {"role": "user", "content": "What is the weather in Paris?"},
]  # fmt: skip


@pytest.mark.conformance(Row(CHAT, "tools; tool_choice: auto, the model calls a tool (hermes parser)", PY, BOTH))
def test_auto_tool_choice_turns_the_models_own_call_into_tool_calls(openai_client, runtime_server):
    """Under ``auto`` nothing constrains the output: the model writes <tool_call>...</tool_call>
    as text and the hermes parser turns it into ``tool_calls``, whole and as streamed deltas."""
    request = {"model": runtime_server.model, "messages": FEW_SHOT_CALLS, "tools": [WEATHER], "tool_choice": "auto",
               "max_tokens": 60, "temperature": 0}  # fmt: skip
    r = openai_client.chat.completions.create(**request)
    message = r.choices[0].message
    assert r.choices[0].finish_reason == "tool_calls" and not message.content
    (call,) = message.tool_calls
    assert assert_weather_call(call.function.name, call.function.arguments)["city"] == "Paris"

    name, arguments, finish, calls = streamed_call(openai_client.chat.completions.create(**request, stream=True))
    assert calls == 1 and finish == "tool_calls"
    assert json.loads(arguments) == json.loads(call.function.arguments)
    assert_weather_call(name, arguments)


@pytest.mark.conformance(
    Row(CHAT, "tools; tool_choice: none", PY, NO),
    Row("POST /tokenize", "messages with tools (the chat template renders them)", HTTP, NA),
)
def test_tool_choice_none_answers_in_text_and_the_template_renders_the_tools(openai_client, runtime_server, http):
    r = openai_client.chat.completions.create(model=runtime_server.model, messages=ASK, tools=[WEATHER],
                                              tool_choice="none", max_tokens=6, temperature=0)  # fmt: skip
    assert r.choices[0].message.content and not r.choices[0].message.tool_calls
    # What the model was shown: the tools in Hermes' <tools> block.
    body = {"model": runtime_server.model, "messages": ASK, "tools": [WEATHER], "add_generation_prompt": True}
    tokenized = http.post(runtime_server.base_url + "/tokenize", json=body)
    assert tokenized.status_code == 200, tokenized.text
    detokenized = http.post(runtime_server.base_url + "/detokenize",
                            json={"model": runtime_server.model, "tokens": tokenized.json()["tokens"]})  # fmt: skip
    text = detokenized.json()["prompt"]
    assert "<tools>" in text and '"get_weather"' in text and text.endswith("<|im_start|>assistant\n")
    plain = http.post(runtime_server.base_url + "/tokenize", json={"model": runtime_server.model, "messages": ASK})
    assert plain.json()["count"] < tokenized.json()["count"]


@pytest.mark.conformance(Row(CHAT, "tools: invalid definitions and choices are 400 naming the field", HTTP, NA))
@pytest.mark.parametrize(
    "patch, param",
    [
        ({"tools": [{"type": "function", "function": {"description": "no name"}}]}, "tools[0].function.name"),
        ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, None),
        ({"tools": "get_weather"}, "tools"),
    ],
)
def test_bad_tools_are_400(http, runtime_server, patch, param):
    body = {"model": runtime_server.model, "messages": ASK, "max_tokens": 4, **patch}
    r = http.post(runtime_server.base_url + "/chat/completions", json=body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["message"]
    if param is not None:
        assert error["param"] == param


PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
    "required": ["name", "age"],
    "additionalProperties": False,
}
JSON_SCHEMA = {"type": "json_schema", "json_schema": {"name": "person", "strict": True, "schema": PERSON}}


@pytest.mark.conformance(Row(CHAT, "response_format: json_schema (strict)", PY, NO))
def test_chat_json_schema_output_is_valid_against_the_schema(openai_client, runtime_server):
    r = openai_client.chat.completions.create(
        model=runtime_server.model, messages=[{"role": "user", "content": "Describe a person as JSON."}],
        response_format=JSON_SCHEMA, max_tokens=60, temperature=0,
    )  # fmt: skip
    assert r.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(r.choices[0].message.content), PERSON)


@pytest.mark.conformance(
    Row(CHAT, "response_format: json_schema (strict)", PY, YES),
    Row(CHAT, "response_format: json_object", PY, NO),
)
def test_chat_json_schema_streams_and_json_object_gives_an_object(openai_client, runtime_server):
    stream = openai_client.chat.completions.create(
        model=runtime_server.model, messages=[{"role": "user", "content": "Describe a person as JSON."}],
        response_format=JSON_SCHEMA, max_tokens=60, temperature=0, stream=True,
    )  # fmt: skip
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    jsonschema.validate(json.loads(text), PERSON)
    r = openai_client.chat.completions.create(
        # One example turn first: json_object constrains the syntax, not the length, and the
        # 135M model alone may describe a whole person before it closes the object.
        model=runtime_server.model, messages=[
            {"role": "user", "content": 'Reply with the JSON {"answer": 1}.'},
            {"role": "assistant", "content": '{"answer": 1}'},
            {"role": "user", "content": 'Reply with the JSON {"answer": 42}.'}],
        response_format={"type": "json_object"}, max_tokens=100, temperature=0,
    )  # fmt: skip
    assert r.choices[0].finish_reason == "stop", r.choices[0].message.content
    assert isinstance(json.loads(r.choices[0].message.content), dict)


@pytest.mark.conformance(Row("POST /completions", "response_format: json_schema (strict)", PY, NO))
def test_completions_json_schema_output_is_valid_against_the_schema(openai_client, runtime_server):
    r = openai_client.completions.create(model=runtime_server.model, prompt="A person, as JSON:", max_tokens=60,
                                         temperature=0, extra_body={"response_format": JSON_SCHEMA})  # fmt: skip
    jsonschema.validate(json.loads(r.choices[0].text), PERSON)


@pytest.mark.conformance(Row(CHAT, "response_format: invalid json_schema is 400", PY, NA))
def test_a_bad_response_format_is_400(openai_client, runtime_server):
    with pytest.raises(openai.BadRequestError) as exc:
        openai_client.chat.completions.create(model=runtime_server.model, messages=ASK, max_tokens=4,
                                              response_format={"type": "json_schema"})  # fmt: skip
    assert exc.value.status_code == 400 and exc.value.body["type"] == "invalid_request_error"


@pytest.fixture(scope="module")
def http(runtime_server):
    with httpx.Client(headers=runtime_server.headers, timeout=120) as client:
        yield client



@pytest.mark.conformance(
    Row(CHAT, "tools; tool_choice: named function", JS, YES),
    Row(CHAT, "tools; tool_choice: required", JS, NO),
    Row("POST /responses", "input (text), max_output_tokens", JS, NO),
    Row("POST /responses", "input (text), max_output_tokens", JS, YES),
)
def test_javascript_sdk_tool_calls_and_responses(runtime_server):
    out = run_node("apis.mjs", runtime_server, {"MODE": "generate", "RUNTIME_TOOL": json.dumps(WEATHER)})
    assert len(set(out["named"]["ids"])) == 1
    assert_weather_call(out["named"]["name"], out["named"]["arguments"])
    assert out["required"]["finish"] == "tool_calls"
    assert_weather_call(out["required"]["name"], out["required"]["arguments"])
    assert out["responses"]["object"] == "response" and out["responses"]["text"]
    assert out["responses"]["outputTokens"] == 6
    stream = out["responsesStream"]
    assert stream["text"] and stream["first"] == "response.created"
    assert stream["last"] in ("response.completed", "response.incomplete")
