"""Every code example of the guide runs unchanged against the runtime.

The Python examples run through the official ``openai`` package, the
JavaScript one through the official ``openai`` npm package under Node.js.
Only the base URL (``http://127.0.0.1:<port>/v2/<id>/openai/v1``), the key and
the model name are replaced, textually, exactly where the guide says "Replace".

The examples are read from the guide itself, kept verbatim in the repository
as ``docs/openai-compatibility.md`` (a copy of the guide this project started
from), so no copy of them can drift from it.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from conformance import BOTH, JS, NA, NO, PY, YES, Row

REPO = Path(__file__).resolve().parents[2]
GUIDE = REPO / "docs" / "openai-compatibility.md"
GUIDE_URL = "https://api.runpod.ai/v2/ENDPOINT_ID/openai/v1"


def _code_blocks(language: str) -> tuple[str, ...]:
    return tuple(re.findall(rf"```{language}[^\n]*\n(.*?)```", GUIDE.read_text(), re.S))


GUIDE_PYTHON_BLOCKS = _code_blocks("python")
GUIDE_JAVASCRIPT_BLOCKS = _code_blocks("javascript")


def _replace(code: str, server) -> str:
    """The guide's placeholders -> this runtime; nothing else changes."""
    out = code.replace(GUIDE_URL, server.base_url)
    out = out.replace('"RUNPOD_API_KEY"', json.dumps(server.api_key))
    out = out.replace('"mistralai/Mistral-7B-Instruct-v0.2"', json.dumps(server.model))
    out = out.replace('"YOUR_MODEL_NAME"', json.dumps(server.model))
    out = out.replace('"MODEL_NAME"', json.dumps(server.model))  # the JavaScript example
    return out


def _assert_only_placeholders_replaced(block: str, code: str, server) -> None:
    """The code runs as the guide wrote it: only placeholder lines differ."""
    for before, after in zip(block.splitlines(), code.splitlines(), strict=True):
        if before != after:
            assert any(p in before for p in (GUIDE_URL, "RUNPOD_API_KEY", "MODEL_NAME", "Mistral")), before
    # No call still aims at the placeholder service (comments may name it).
    for line in code.splitlines():
        if not line.strip().startswith(("#", "//")):
            assert "api.runpod.ai" not in line and '"RUNPOD_API_KEY"' not in line, line


def test_the_guide_yields_every_example():
    # Seven Python blocks (client setup, chat, streaming chat, completion,
    # streaming completion, models, client libraries) and one JavaScript block:
    # a change in the guide's layout must not make the tests below run fewer.
    assert len(GUIDE_PYTHON_BLOCKS) == 7 and len(GUIDE_JAVASCRIPT_BLOCKS) == 1
    assert all(GUIDE_URL in block for block in (GUIDE_PYTHON_BLOCKS[0], GUIDE_PYTHON_BLOCKS[1],
                                                GUIDE_PYTHON_BLOCKS[6], GUIDE_JAVASCRIPT_BLOCKS[0]))


@pytest.mark.conformance(
    Row("POST /chat/completions", "the guide's examples: messages, model (its response format)", PY, BOTH),
    Row("POST /completions", "the guide's examples: prompt, model, max_tokens", PY, BOTH),
    Row("GET /models", "the guide's example: models.list()", PY, NA),
)
def test_python_examples_run_unchanged(runtime_server):
    # The examples build on each other (later ones reuse `client` and
    # `MODEL_NAME`), as a reader running them in order would.
    namespace: dict = {"__name__": "guide"}
    outputs = []
    for block in GUIDE_PYTHON_BLOCKS:
        code = _replace(block, runtime_server)
        _assert_only_placeholders_replaced(block, code, runtime_server)
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            exec(compile(code, "<guide>", "exec"), namespace)  # noqa: S102 - the guide's own code
        outputs.append(buf.getvalue())

    # 1: client setup; 2: chat (prints content); 3: streaming chat; 4: text
    # completion; 5: streaming completion; 6: models list; 7: client libraries.
    assert outputs[1].strip(), "the chat example printed nothing"
    assert outputs[2].startswith("Response: ") and len(outputs[2].strip()) > len("Response:")
    assert outputs[3].strip() and outputs[4].strip()
    assert outputs[5].strip() == repr([runtime_server.model])
    assert namespace["list_of_models"] == [runtime_server.model]

    # The documented response shape, on the last chat response (example 7).
    r = namespace["response"]
    assert r.object == "chat.completion" and r.id and isinstance(r.created, int)
    assert r.model == runtime_server.model
    choice = r.choices[0]
    assert choice.index == 0 and choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    u = r.usage
    assert u.prompt_tokens > 0 and u.completion_tokens > 0
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens

    # The documented shapes of the text-completion and models responses.
    client = namespace["client"]
    c = client.completions.create(model=runtime_server.model, prompt="Hello", max_tokens=3)
    assert c.object == "text_completion" and c.choices[0].logprobs is None and c.choices[0].index == 0
    assert c.usage.total_tokens == c.usage.prompt_tokens + c.usage.completion_tokens
    m = namespace["models_response"].data[0]
    assert (m.id, m.object, m.owned_by) == (runtime_server.model, "model", "modelendpoint")
    assert isinstance(m.created, int)


def _node() -> str:
    node = shutil.which("node")
    if node is None:
        pytest.fail("node is not installed; the JavaScript client tests need Node.js 20")
    if not (REPO / "tests" / "js" / "node_modules" / "openai").is_dir():
        pytest.fail("the openai npm package is missing; run `make node-deps`")
    return node


def _run_node(script: Path, server, extra_env: dict | None = None) -> dict:
    env = dict(os.environ, RUNTIME_BASE_URL=server.base_url, RUNTIME_API_KEY=server.api_key, RUNTIME_MODEL=server.model)
    env.update(extra_env or {})
    proc = subprocess.run([_node(), str(script)], capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.conformance(Row("POST /chat/completions", "the guide's example: messages, model", JS, NO))
def test_javascript_example_runs_unchanged(runtime_server, tmp_path):
    (block,) = GUIDE_JAVASCRIPT_BLOCKS
    code = _replace(block, runtime_server)
    _assert_only_placeholders_replaced(block, code, runtime_server)
    # Print what the example got, so its shape can be checked.
    script = tmp_path / "guide.mjs"
    script.write_text(code + "\nconsole.log(JSON.stringify(response));\n")
    # ESM resolves `openai` by walking up to a node_modules folder.
    (tmp_path / "node_modules").symlink_to(REPO / "tests" / "js" / "node_modules")
    r = _run_node(script, runtime_server)
    assert r["object"] == "chat.completion" and r["model"] == runtime_server.model
    assert r["choices"][0]["message"]["role"] == "assistant" and r["choices"][0]["message"]["content"]
    assert r["usage"]["total_tokens"] == r["usage"]["prompt_tokens"] + r["usage"]["completion_tokens"]


@pytest.mark.conformance(
    Row("POST /chat/completions", "stream, stream_options.include_usage", JS, YES),
    Row("GET /models", "401: AuthenticationError", JS, NA),
    Row("POST /chat/completions", "404: NotFoundError", JS, NA),
)
def test_javascript_sdk_streams_and_raises_its_error_classes(runtime_server):
    out = _run_node(REPO / "tests" / "js" / "errors_and_stream.mjs", runtime_server)
    assert out["text"] and out["roles"] == ["assistant"]
    assert 0 < out["usage"]["completion_tokens"] <= 8
    assert out["auth"] == {"cls": "AuthenticationError", "isAuth": True, "status": 401, "code": "invalid_api_key"}
    assert out["notFound"] == {"isNotFound": True, "status": 404, "code": "model_not_found", "param": "model"}
