"""Pure runtime logic: error mapping, request caps, auth, stream framing, admission, log fields."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

import pytest

from modelendpoint_runtime import errors
from modelendpoint_runtime.admission import Admission
from modelendpoint_runtime.app import route_label
from modelendpoint_runtime.auth import bearer_token, encode_keys, key_matches
from modelendpoint_runtime.limits import (
    Limits,
    Plan,
    check_caps,
    check_model,
    logprobs_for_ranking,
    rank_choices,
    trim_choices,
)
from modelendpoint_runtime.logs import request_fields
from modelendpoint_runtime.streaming import NDJSON, SSE, Reframer, choose_format, is_token_frame


def _shape(err: errors.APIError) -> dict:
    body = err.body()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    assert isinstance(body["error"]["type"], str)
    assert body["error"]["code"] is None or isinstance(body["error"]["code"], str)
    return body["error"]


# errors ---------------------------------------------------------------------


def test_model_not_found_shape():
    e = _shape(errors.model_not_found("gpt-4"))
    assert errors.model_not_found("x").status == 404
    assert e["code"] == "model_not_found" and e["param"] == "model" and "gpt-4" in e["message"]


def test_invalid_api_key_shape():
    err = errors.invalid_api_key(present=True)
    assert err.status == 401 and _shape(err)["code"] == "invalid_api_key"
    assert err.headers["WWW-Authenticate"] == "Bearer"


def test_overload_has_retry_after():
    err = errors.overloaded(3)
    assert err.status == 503 and err.headers["Retry-After"] == "3"
    assert _shape(err)["type"] == "server_error"


@pytest.mark.parametrize("status", [500, 502, 504])
def test_engine_5xx_hides_internals(status):
    err = errors.from_engine_error(status, "CUDA error at /usr/lib/x.py line 3: secret", None, "prompt")
    assert err.status == 500
    e = _shape(err)
    assert e["message"] == errors.INTERNAL_MESSAGE and "secret" not in json.dumps(e)


def test_engine_context_length_maps_to_openai_code():
    msg = "This model's maximum context length is 2048 tokens. However, your prompt contains 3000 input tokens"
    err = errors.from_engine_error(400, msg, "input_tokens", "messages")
    assert err.status == 400
    e = _shape(err)
    assert e["code"] == "context_length_exceeded" and e["param"] == "messages"


def test_engine_422_and_501_become_400():
    assert errors.from_engine_error(422, "bad", "x", "prompt").status == 400
    assert errors.from_engine_error(501, "not supported", None, "prompt").status == 400


def test_engine_404_is_model_not_found():
    e = _shape(errors.from_engine_error(404, "The model `x` does not exist.", "model", "prompt"))
    assert e["code"] == "model_not_found"


def test_engine_error_from_vllm_body():
    body = {"error": {"message": "top_p must be in (0, 1]", "type": "BadRequestError", "param": "top_p", "code": 400}}
    err = errors.engine_error_from_body(400, body, "prompt")
    assert err.status == 400 and _shape(err)["param"] == "top_p"
    assert errors.engine_error_from_body(500, {"nonsense": 1}, "prompt").status == 500


def test_validation_errors_name_the_field():
    err = errors.from_validation_errors(
        [{"type": "float_parsing", "loc": ("temperature",), "msg": "Input should be a valid number"}]
    )
    assert err.status == 400 and _shape(err)["param"] == "temperature"
    err = errors.from_validation_errors([{"type": "missing", "loc": ("messages",), "msg": "Field required"}])
    assert _shape(err)["param"] == "messages" and "messages" in err.message
    nested = errors.from_validation_errors(
        [{"type": "string_type", "loc": ("messages", 0, "content", "str"), "msg": "Input should be a valid string"}]
    )
    assert nested.param == "messages[0].content"
    none = errors.from_validation_errors([{"type": "value_error", "loc": (), "msg": "Value error, bad combo"}])
    assert none.param is None and none.message == "bad combo"


# limits ---------------------------------------------------------------------

LIM = Limits(n=4, best_of=4, max_tokens=100, logprobs=5)


def req(**kw):
    base = dict(n=1, max_tokens=None, max_completion_tokens=None, logprobs=None, top_logprobs=None,
                prompt_logprobs=None, use_beam_search=False, stream=False, model_extra={})  # fmt: skip
    base.update(kw)
    return SimpleNamespace(**base)


def test_check_model():
    assert check_model("served", "served") is None
    assert check_model("other", "served").status == 404


@pytest.mark.parametrize(("value", "code"), [(None, "missing_required_parameter"), (5, "invalid_value")])
def test_model_is_required(value, code):
    # The guide marks `model` required: missing or not a string is a 400 naming it.
    err = _shape(check_model(value, "served"))
    assert (check_model(value, "served").status, err["param"], err["code"], err["type"]) == (
        400, "model", code, "invalid_request_error"
    )


def test_engine_503_retry_after_is_the_setting():
    err = errors.from_engine_error(503, "busy", None, "prompt", retry_after=7)
    assert err.status == 503 and err.code == "engine_unavailable" and err.headers["Retry-After"] == "7"
    body = {"error": {"message": "busy", "type": "ServiceUnavailableError", "param": None, "code": 503}}
    assert errors.engine_error_from_body(503, body, "prompt", 9).headers["Retry-After"] == "9"
    # ...and in a stream's error frame the Reframer is given the setting too.
    frame = 'data: {"error": {"message": "busy", "type": "x", "param": null, "code": 503}}\n\n'
    reframer = Reframer(SSE, "prompt", retry_after=4)
    assert json.loads(reframer.feed(frame)[6:])["error"]["code"] == "engine_unavailable"
    assert reframer.error_status == 503


@pytest.mark.parametrize(
    ("kind", "kw", "param"),
    [
        ("chat", {"n": 5}, "n"),
        ("chat", {"n": 0}, "n"),
        ("chat", {"max_tokens": 101}, "max_tokens"),
        ("chat", {"max_completion_tokens": 101}, "max_completion_tokens"),
        ("completion", {"max_tokens": 0}, "max_tokens"),
        ("chat", {"top_logprobs": 6}, "top_logprobs"),
        ("completion", {"logprobs": 6}, "logprobs"),
        ("completion", {"prompt_logprobs": 6}, "prompt_logprobs"),
        # Issue 13.4: negatives (vLLM: "the whole vocabulary") are refused naming what was sent.
        ("chat", {"top_logprobs": -1}, "top_logprobs"),
        ("completion", {"logprobs": -1}, "logprobs"),
        ("completion", {"prompt_logprobs": -1}, "prompt_logprobs"),
        ("chat", {"prompt_logprobs": -5}, "prompt_logprobs"),
        ("completion", {"model_extra": {"best_of": 5}}, "best_of"),
        ("completion", {"model_extra": {"best_of": "two"}}, "best_of"),
        ("completion", {"n": 3, "model_extra": {"best_of": 2}}, "best_of"),
        ("completion", {"use_beam_search": True, "stream": True, "model_extra": {"best_of": 3}}, "best_of"),
        ("completion", {"stream": True, "model_extra": {"best_of": 3}}, "best_of"),  # ranking needs every sample
        ("chat", {"stream": True, "model_extra": {"best_of": 2}}, "best_of"),
    ],
)
def test_caps_refuse_with_400_naming_param(kind, kw, param):
    result = check_caps(req(**kw), LIM, kind)
    assert isinstance(result, errors.APIError), result
    assert result.status == 400 and result.param == param


def test_caps_accept_values_at_the_limit():
    assert check_caps(req(n=4, max_tokens=100, top_logprobs=5), LIM, "chat") == Plan()
    assert check_caps(req(logprobs=5, model_extra={"best_of": 1}), LIM, "completion") == Plan()


def test_best_of_with_beam_search_is_the_beam_width():
    plan = check_caps(req(n=1, use_beam_search=True, model_extra={"best_of": 3}), LIM, "completion")
    assert plan == Plan(engine_n=3, keep_n=1)


def test_best_of_without_beam_search_samples_and_ranks():
    plan = check_caps(req(n=2, model_extra={"best_of": 4}), LIM, "completion")
    assert plan == Plan(engine_n=4, keep_n=2, rank=True)
    assert check_caps(req(n=2, stream=True, model_extra={"best_of": 2}), LIM, "chat") == Plan()  # == n streams


def test_logprobs_for_ranking_only_adds_what_the_client_left_unset():
    assert logprobs_for_ranking(req(logprobs=None), "completion") == {"logprobs": 0}
    assert logprobs_for_ranking(req(logprobs=2), "completion") == {}
    assert logprobs_for_ranking(req(logprobs=False, top_logprobs=0), "chat") == {"logprobs": True, "top_logprobs": 0}
    assert logprobs_for_ranking(req(logprobs=True, top_logprobs=3), "chat") == {}


def test_rank_choices_keeps_the_highest_cumulative_logprob():
    def text_choice(i, lps):
        return {"index": i, "text": f"t{i}", "logprobs": {"tokens": ["a"] * len(lps), "token_logprobs": lps}}

    body = {
        "choices": [text_choice(0, [-1.0, -2.0]), text_choice(1, [None, -0.5, -0.25]),  # echo: prompt token None
                    text_choice(2, [-0.25, -0.25]), text_choice(3, [-1.0, -0.5])],
        "usage": {"completion_tokens": 8},
    }  # fmt: skip
    out = rank_choices(body, 2, "completion", keep_logprobs=False)
    assert [c["text"] for c in out["choices"]] == ["t2", "t1"]  # sums -0.5 and -0.75, best first
    assert [c["index"] for c in out["choices"]] == [0, 1]
    assert all(c["logprobs"] is None for c in out["choices"])
    assert out["usage"] == {"completion_tokens": 8}  # every sample generated is counted

    def chat_choice(i, lps):
        content = [{"token": "x", "logprob": lp, "top_logprobs": []} for lp in lps]
        return {"index": i, "message": {"content": f"m{i}"}, "logprobs": {"content": content}}

    body = {"choices": [chat_choice(0, [-3.0]), chat_choice(1, [-0.5, -0.5]), chat_choice(2, [-0.2])]}
    out = rank_choices(body, 1, "chat", keep_logprobs=True)
    assert [c["message"]["content"] for c in out["choices"]] == ["m2"] and out["choices"][0]["logprobs"]
    # Ties go to the lower index.
    body = {"choices": [chat_choice(0, [-1.0]), chat_choice(1, [-1.0])]}
    assert rank_choices(body, 1, "chat", keep_logprobs=False)["choices"][0]["message"]["content"] == "m0"


def test_rank_choices_ranks_each_prompt_of_a_batch_apart():
    # Two prompts, best_of=2, n=1: the engine returns prompt 0's samples at
    # indexes 0-1 and prompt 1's at 2-3; each prompt keeps its own best.
    def text_choice(i, lp):
        return {"index": i, "text": f"t{i}", "logprobs": {"token_logprobs": [lp]}}

    body = {"choices": [text_choice(3, -0.1), text_choice(0, -2.0), text_choice(1, -1.0), text_choice(2, -0.5)]}
    out = rank_choices(body, 1, "completion", keep_logprobs=False, group=2)
    assert [(c["index"], c["text"]) for c in out["choices"]] == [(0, "t1"), (1, "t3")]


def test_trim_choices_keeps_best_first_and_reindexes():
    body = {"choices": [{"index": 0, "text": "a"}, {"index": 1, "text": "b"}, {"index": 2, "text": "c"}]}
    assert trim_choices(body, 2)["choices"] == [{"index": 0, "text": "a"}, {"index": 1, "text": "b"}]
    # Per prompt of a batch: beams 0-2 of prompt 0, 3-5 of prompt 1.
    body = {"choices": [{"index": i, "text": f"b{i}"} for i in range(6)]}
    assert [(c["index"], c["text"]) for c in trim_choices(body, 2, group=3)["choices"]] == [
        (0, "b0"), (1, "b1"), (2, "b3"), (3, "b4")]


# auth -----------------------------------------------------------------------


def test_bearer_token_parsing():
    assert bearer_token("Bearer abc") == "abc"
    assert bearer_token("bearer  abc ") == "abc"
    assert bearer_token("Basic abc") is None
    assert bearer_token("Bearer ") is None
    assert bearer_token(None) is None


def test_key_rotation_accepts_every_configured_key():
    keys = encode_keys(["old", "new"])
    assert key_matches("old", keys) and key_matches("new", keys)
    assert not key_matches("older", keys)
    assert not key_matches("", keys)
    assert not key_matches(None, keys)
    assert not key_matches("ünïcode", keys)


# streaming ------------------------------------------------------------------


def test_choose_format():
    assert choose_format(True, None) == SSE
    assert choose_format(False, None) == NDJSON
    assert choose_format(False, "application/json") == NDJSON
    assert choose_format(True, "application/x-ndjson") == NDJSON
    assert choose_format(False, "text/event-stream") == SSE


CHUNK = 'data: {"id":"c1","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":"Hi"}}]}\n\n'
ROLE = (
    'data: {"id":"c1","object":"chat.completion.chunk",'
    '"choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}\n\n'
)
ERR = (
    'data: {"error": {"message": "boom at /usr/lib/python3/x.py", "type": "InternalServerError", '
    '"param": null, "code": 500}}\n\n'
)
DONE = "data: [DONE]\n\n"


def test_sse_passes_frames_through():
    r = Reframer(SSE, "messages")
    assert [r.feed(x) for x in (ROLE, CHUNK, DONE)] == [ROLE, CHUNK, DONE]


def test_ndjson_is_one_json_object_per_line_without_done():
    r = Reframer(NDJSON, "messages")
    out = "".join(r.feed(x) for x in (ROLE, CHUNK, DONE))
    lines = out.splitlines()
    assert len(lines) == 2 and out.endswith("\n")
    assert json.loads(lines[1])["choices"][0]["delta"]["content"] == "Hi"


@pytest.mark.parametrize("fmt", [SSE, NDJSON])
def test_error_frame_is_rewritten_to_our_shape_and_hides_internals(fmt):
    r = Reframer(fmt, "messages")
    out = r.feed(ERR)
    payload = json.loads(out.removeprefix("data: ").strip())
    assert payload["error"]["code"] == "internal_error"
    assert "/usr/lib" not in out
    assert r.error_status == 500


def test_multiple_frames_in_one_piece():
    r = Reframer(NDJSON, "prompt")
    assert len(r.feed(CHUNK + CHUNK).splitlines()) == 2


def test_token_frame_detection():
    assert not is_token_frame(ROLE, "chat")
    assert is_token_frame(CHUNK, "chat")
    assert not is_token_frame(DONE, "chat")
    assert is_token_frame('data: {"choices":[{"text":" x"}]}\n\n', "completion")


# admission ------------------------------------------------------------------


def test_admission_is_weighted_by_sequences():
    async def scenario():
        a = Admission(4)
        assert a.try_acquire(3)
        assert not a.try_acquire(2)  # 3 + 2 > 4
        assert a.try_acquire(1)
        assert (a.in_flight, a.requests) == (4, 2)
        a.release(3)
        a.release(1)
        assert a.in_flight == 0 and await a.wait_idle(0.01)
        # Heavier than the whole limit: only alone.
        assert a.try_acquire(10) and a.in_flight == 4
        assert not a.try_acquire(1)
        a.release(10)
        assert a.try_acquire(1) and not a.try_acquire(10)

    asyncio.run(scenario())


@pytest.mark.parametrize(
    ("kind", "request_fields", "plan", "weight"),
    [
        ("chat", {"n": 1}, Plan(), 1),
        ("chat", {"n": 3}, Plan(), 3),
        ("chat", {"n": 2}, Plan(engine_n=4, keep_n=2, rank=True), 4),  # best_of=4
        ("completion", {"n": 2, "prompt": ["a", "b", "c"]}, Plan(), 6),
        ("completion", {"n": 1, "prompt": [[1, 2], [3]]}, Plan(engine_n=3, keep_n=1), 6),
        ("completion", {"n": 1, "prompt": [1, 2, 3]}, Plan(), 1),  # one tokenized prompt
        ("completion", {"n": 1, "prompt": "text"}, Plan(), 1),
    ],
)
def test_sequences_weigh_prompts_times_max_n_best_of(kind, request_fields, plan, weight):
    from modelendpoint_runtime.limits import sequences

    assert sequences(SimpleNamespace(**request_fields), kind, plan) == weight


@pytest.mark.parametrize(
    ("kind", "body", "param"),
    [
        ("completion", {"prompt": ["a"] * 3}, "prompt"),
        ("chat", {"messages": [{"role": "user", "content": "x"}] * 3}, "messages"),
        ("chat", {"messages": [{"role": "user", "content": "x"}], "stop": ["a", "b", "c"]}, "stop"),
    ],
)
def test_shape_counts_before_anything_walks_the_body(kind, body, param):
    from modelendpoint_runtime.limits import check_shape

    limits = Limits(prompts=2, messages=2, stop=2)
    err = check_shape(body, kind, limits)
    assert err is not None and err.status == 400 and err.param == param


def test_clip_keeps_echoes_short():
    assert errors.clip("x" * 10) == "x" * 10
    assert len(errors.clip("x" * 10_000)) < 300
    assert len(errors.model_not_found("y" * 10_000).message) < 400
    assert len(errors.route_not_found("GET", "/" + "z" * 10_000).message) < 400


def test_key_ring_and_key_file(tmp_path):
    from modelendpoint_runtime.auth import KeyRing, read_key_file

    ring = KeyRing(["a", "b"], required=True)
    assert ring.usable and key_matches("a", ring.keys)
    assert ring.fail("the file is empty") and not ring.usable and not key_matches("a", ring.keys)
    assert not ring.fail("the file is empty")  # no news: logged once
    assert ring.replace(["c"]) and ring.usable and key_matches("c", ring.keys) and not key_matches("a", ring.keys)
    assert not ring.replace(["c"])
    assert KeyRing().usable and not KeyRing().required  # no key configured: no auth
    path = tmp_path / "keys"
    path.write_text("k1,k2\n")
    assert read_key_file(str(path)) == ("k1", "k2")
    for content, reason in (("", "the file is empty"), ("k1\n\nk2", "the file holds an empty key in the list")):
        path.write_text(content)
        with pytest.raises(ValueError, match=reason):
            read_key_file(str(path))
    with pytest.raises(ValueError, match="cannot read it"):
        read_key_file(str(tmp_path / "missing"))


def test_admission_limit_and_drain():
    async def scenario():
        a = Admission(2)
        assert a.try_acquire() and a.try_acquire()
        assert not a.try_acquire()  # full: immediate refusal, no queue
        a.release()
        assert a.try_acquire()
        a.start_drain()
        assert not a.try_acquire()  # draining refuses even with room
        assert not await a.wait_idle(0.05)
        a.release()
        a.release()
        assert await a.wait_idle(1)

    asyncio.run(scenario())


# logs and routes ------------------------------------------------------------


def test_request_fields_carry_no_text_unless_asked():
    fields = request_fields(method="POST", route="/v1/completions", status=200, latency_s=0.5, model="m",
                            prompt_tokens=3, completion_tokens=4)  # fmt: skip
    assert fields == {"method": "POST", "route": "/v1/completions", "status": 200, "latency_ms": 500.0,
                      "model": "m", "prompt_tokens": 3, "completion_tokens": 4}  # fmt: skip


@pytest.mark.parametrize(
    ("path", "label"),
    [
        ("/v2/abc/openai/v1/chat/completions", "/v2/{endpoint_id}/openai/v1/chat/completions"),
        ("/openai/v1/models", "/openai/v1/models"),
        ("/v1/models/some/model", "/v1/models/{model}"),
        ("/wp-admin.php", "other"),
        ("/v2/x/y", "other"),
    ],
)
def test_route_label_has_low_cardinality(path, label):
    assert route_label(path) == label


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({}, "messages"),
        ({"messages": None}, "messages"),
        ({"messages": "hi"}, "messages"),
        ({"messages": []}, "messages"),
        ({"messages": ["hi"]}, "messages[0]"),
        ({"messages": [{"role": "user", "content": "x"}, {"content": "x"}]}, "messages[1].role"),
    ],
)
def test_chat_shape_errors_name_the_param(body, param):
    from modelendpoint_runtime.limits import check_shape

    err = check_shape(body, "chat")
    assert err is not None and err.status == 400 and err.param == param
    assert check_shape({"messages": [{"role": "user", "content": "x"}]}, "chat") is None
    assert check_shape({}, "completion") is None
