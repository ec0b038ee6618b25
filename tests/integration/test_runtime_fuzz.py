"""Property-based run: malformed and extreme bodies never give a 5xx nor a non-OpenAI error.

Hypothesis generates two kinds of request bodies for chat and text
completions: junk (wrong types, extreme numbers such as NaN, infinities and
2**64, unknown keys, nested junk) and well-typed bodies with edge values
that reach vLLM's range checks and the engine. ``max_tokens`` is always
present and tiny-or-invalid, so a request that does reach the engine stays cheap.
The run is bounded and derandomized (same examples every run).
"""

from __future__ import annotations

import json
import math

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
)
junk = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=10,
)  # fmt: skip
numbers = st.one_of(
    st.sampled_from([0, -1, 1, 2, 0.5, 1e-9, 2**31, 2**63, 2**64, -(2**63), math.inf, -math.inf, math.nan]), junk
)
messages = st.one_of(
    st.lists(
        st.fixed_dictionaries(
            {"role": st.sampled_from(["user", "system", "assistant", "tool", "", "robot"]) | junk,
             "content": st.text(max_size=40) | junk},  # fmt: skip
        ),
        max_size=3,
    ),
    junk,
)
OPTIONAL = {
    "temperature": numbers, "top_p": numbers, "n": st.sampled_from([1, 2, 0, -1, 5, 10**9]) | junk,
    "seed": numbers, "stop": st.text(max_size=5) | st.lists(st.text(max_size=5), max_size=5) | junk,
    "presence_penalty": numbers, "frequency_penalty": numbers, "logit_bias": junk, "user": junk,
    "best_of": numbers, "top_k": numbers, "ignore_eos": st.booleans() | junk, "use_beam_search": st.booleans(),
    "stop_token_ids": st.lists(st.integers(-5, 10**6), max_size=3) | junk, "skip_special_tokens": junk,
    "spaces_between_special_tokens": junk, "add_generation_prompt": junk, "echo": st.booleans() | junk,
    "repetition_penalty": numbers, "min_p": numbers, "length_penalty": numbers,
    "include_stop_str_in_output": junk, "logprobs": numbers | st.booleans(), "top_logprobs": numbers,
    "stream": st.booleans(), "stream_options": junk | st.fixed_dictionaries({"include_usage": st.booleans()}),
    "unknown_field": junk,
}  # fmt: skip
MAX_TOKENS = st.sampled_from([1, 2, 0, -3, 10**6, 2**64, "2", 1.5, [], {}])


def junk_bodies(kind: str, model: str):
    """Anything goes: wrong types and extreme values in every field."""
    required = {"max_tokens": MAX_TOKENS, "model": st.sampled_from([model, model, "other-model", 7, ""])}
    if kind == "chat":
        required["messages"] = messages
    else:
        required["prompt"] = st.text(max_size=40) | st.lists(st.text(max_size=10), max_size=3) | \
            st.lists(st.integers(-2, 60000), max_size=5) | junk  # fmt: skip
    return st.fixed_dictionaries(required, optional=OPTIONAL)


def _floats(lo, hi):
    return st.floats(lo, hi, allow_nan=False) | st.sampled_from([lo, hi])


# Well-typed values at and around the edges of what is valid: these reach
# the engine (or vLLM's own range checks) instead of failing on types.
TYPED = {
    "temperature": _floats(0.0, 3.0), "top_p": _floats(0.0, 1.0), "n": st.integers(1, 4),
    "seed": st.integers(-(2**63), 2**63 - 1), "stop": st.text(max_size=3) | st.lists(st.text(max_size=3), max_size=4),
    "presence_penalty": _floats(-2.5, 2.5), "frequency_penalty": _floats(-2.5, 2.5),
    "logit_bias": st.dictionaries(st.integers(-1, 50000).map(str), _floats(-150.0, 150.0), max_size=3),
    "user": st.text(max_size=10), "top_k": st.integers(-2, 100), "ignore_eos": st.booleans(),
    "use_beam_search": st.booleans(), "stop_token_ids": st.lists(st.integers(0, 49151), max_size=3),
    "skip_special_tokens": st.booleans(), "spaces_between_special_tokens": st.booleans(),
    "echo": st.booleans(), "repetition_penalty": _floats(0.0, 3.0), "min_p": _floats(0.0, 1.0),
    "length_penalty": _floats(-3.0, 3.0), "include_stop_str_in_output": st.booleans(),
    "stream": st.booleans(), "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
}  # fmt: skip
CHAT_TYPED = TYPED | {"logprobs": st.booleans(), "top_logprobs": st.integers(0, 6),
                      "add_generation_prompt": st.booleans()}  # fmt: skip
COMPLETION_TYPED = TYPED | {"logprobs": st.integers(0, 6)}


def typed_bodies(kind: str, model: str):
    """Schema-valid shapes with edge values; max_tokens tiny so generation stays cheap."""
    required = {"model": st.just(model), "max_tokens": st.integers(1, 3)}
    if kind == "chat":
        required["messages"] = st.lists(
            st.fixed_dictionaries({"role": st.sampled_from(["user", "system"]), "content": st.text(max_size=40)}),
            min_size=1, max_size=3,
        ).map(lambda ms: [*ms, {"role": "user", "content": "hi"}])  # fmt: skip
        optional = CHAT_TYPED
    else:
        texts = st.lists(st.text(min_size=1, max_size=10), min_size=1, max_size=2)
        required["prompt"] = st.text(min_size=1, max_size=40) | texts
        optional = COMPLETION_TYPED
    return st.fixed_dictionaries(required, optional=optional)


def bodies(kind: str, model: str):
    return st.one_of(typed_bodies(kind, model), junk_bodies(kind, model))


def check(r: httpx.Response) -> None:
    assert r.status_code < 500, r.text[:500]
    assert r.status_code != 422
    if r.status_code >= 400:
        body = r.json()
        assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
        assert isinstance(body["error"]["message"], str)
        return
    if r.headers["content-type"].startswith("text/event-stream"):
        frames = [f for f in r.text.split("\n\n") if f]
        assert frames[-1] == "data: [DONE]"
        for frame in frames[:-1]:
            obj = json.loads(frame.removeprefix("data: "))
            if "error" in obj:
                assert set(obj["error"]) == {"message", "type", "param", "code"}
                assert not str(obj["error"]["code"]).startswith("5") and obj["error"]["code"] != "internal_error", obj
    else:
        assert "choices" in r.json()


FUZZ = settings(max_examples=120, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])  # fmt: skip


@pytest.fixture(scope="module")
def http(runtime_server):
    with httpx.Client(base_url=runtime_server.base_url, headers=runtime_server.headers, timeout=120) as client:
        yield client


@pytest.mark.parametrize("kind", ["chat", "completion"])
def test_fuzzed_bodies_never_5xx_and_errors_are_openai_shaped(http, runtime_server, kind):
    path = "/chat/completions" if kind == "chat" else "/completions"
    statuses: list[int] = []

    @FUZZ
    @given(bodies(kind, runtime_server.model))
    def run(body):
        # json.dumps writes NaN/Infinity as bare words: invalid JSON that
        # lenient parsers accept; exactly the kind of input to try.
        r = http.post(path, content=json.dumps(body), headers={"content-type": "application/json"})
        statuses.append(r.status_code)
        check(r)

    run()
    # Not vacuous: both rejected and accepted (engine-reaching) bodies were sent.
    assert statuses.count(400) >= 10 and statuses.count(200) >= 10, sorted(set(statuses))
    # Healthy afterwards: liveness, readiness, and a normal request.
    assert httpx.get(runtime_server.root_url + "/health").status_code == 200
    assert httpx.get(runtime_server.root_url + "/ready").status_code == 200
    r = http.post("/completions", json={"model": runtime_server.model, "prompt": "Hi", "max_tokens": 2})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2


# -- issue 14's routes: junk in the fields each adds -------------------------------------------------

tool_like = st.one_of(
    junk,
    st.lists(st.fixed_dictionaries({"type": st.sampled_from(["function", "custom"]) | junk,
                                    "function": st.fixed_dictionaries(
                                        {"name": st.text(max_size=8) | junk},
                                        optional={"parameters": junk | st.just({"type": "object"}),
                                                  "strict": junk})}), max_size=2),
)  # fmt: skip
NEW = {
    "chat-tools": ("/chat/completions", {
        "messages": st.just([{"role": "user", "content": "hi"}]) | messages, "max_tokens": st.integers(1, 2),
    }, {
        "tools": tool_like, "tool_choice": st.sampled_from(["none", "auto", "required"]) | junk,
        "response_format": junk | st.sampled_from([{"type": "json_object"}, {"type": "json_schema"},
                                                   {"type": "json_schema", "json_schema": {"name": "x"}}]),
        "parallel_tool_calls": junk, "stream": st.booleans(),
    }),
    "responses": ("/responses", {"input": st.text(max_size=20) | junk | messages,
                                 "max_output_tokens": st.integers(1, 2) | junk}, {
        "instructions": junk, "temperature": numbers, "tools": junk, "text": junk, "reasoning": junk,
        "stream": st.booleans(), "store": junk, "previous_response_id": junk,
    }),
    "messages": ("/messages", {"messages": messages, "max_tokens": st.integers(1, 2) | junk}, {
        "system": junk, "stop_sequences": junk, "tools": junk, "tool_choice": junk, "thinking": junk,
        "stream": st.booleans(), "top_k": numbers, "metadata": junk,
    }),
    "tokenize": ("/tokenize", {"prompt": st.text(max_size=20) | junk}, {"messages": messages, "tools": junk,
                                                                      "add_special_tokens": junk}),
    "detokenize": ("/detokenize", {"tokens": st.lists(st.integers(-5, 60000), max_size=4) | junk}, {}),
    "embeddings": ("/embeddings", {"input": junk}, {"dimensions": numbers, "encoding_format": junk}),
}  # fmt: skip


def check_new(r: httpx.Response, path: str) -> None:
    assert r.status_code < 500, r.text[:500]
    assert r.status_code != 422
    if r.status_code >= 400:
        body = r.json()
        if path.startswith("/messages"):
            assert body["type"] == "error" and set(body["error"]) == {"type", "message"}, body
        else:
            assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
        return
    if r.headers["content-type"].startswith("text/event-stream"):
        assert "internal_error" not in r.text and "api_error" not in r.text, r.text[-500:]


@pytest.mark.parametrize("kind", list(NEW))
def test_fuzzed_bodies_on_the_new_routes_never_5xx_and_keep_their_error_shape(http, runtime_server, kind):
    path, required, optional = NEW[kind]
    strategy = st.fixed_dictionaries({"model": st.sampled_from([runtime_server.model] * 3 + ["other", 7]),
                                      **required}, optional=optional)  # fmt: skip
    statuses: list[int] = []

    @settings(max_examples=40, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])  # fmt: skip
    @given(strategy)
    def run(body):
        r = http.post(path, content=json.dumps(body), headers={"content-type": "application/json"})
        statuses.append(r.status_code)
        check_new(r, path)

    run()
    assert statuses.count(400) + statuses.count(404) >= 5, sorted(set(statuses))
    assert httpx.get(runtime_server.root_url + "/ready").status_code == 200
