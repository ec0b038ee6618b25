"""Configurations other than the shared server's, without ever running two engines.

* The served name defaulting to MODEL_NAME, a non-default OPENAI_RESPONSE_ROLE,
  RAW_OPENAI_OUTPUT=0 (NDJSON by default), no API_KEY/API_KEY_FILE (no auth), no
  ENDPOINT_ID (any id), a reasoning parser (REASONING_PARSER) and a LoRA
  adapter already listed in ADAPTERS_FILE when it starts (a replica that
  starts after spec.adapters was set): a second server, started only after
  the shared one has exited (``runtime_after_drain``).
  No small reasoning model is available offline, so the test makes the
  embedded model emit the ``granite`` parser's plain-text markers ("Here is
  my thought process:" ... "Here is my response:") with a regex structured
  output, which needs the grammar applied inside the reasoning section
  (STRUCTURED_OUTPUTS_CONFIG ``enable_in_reasoning``). That shows the
  parser reaches vLLM and its split reaches the client (``reasoning`` and
  ``reasoning_content``, whole and as streamed deltas); not that a real
  reasoning model reasons.
* A setting vLLM itself rejects (MAX_MODEL_LEN beyond the model's) stops the
  process with one line naming the variable; no engine is started for it.
* SIGTERM while the model is still loading stops the process at once (exit
  0), without waiting for the load; its engine process goes too. Also after
  the shared server has exited.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from conformance import HTTP, NA, NO, PY, YES, Row
from fixtures_runtime import RUNTIME_TEST_ENV, free_port, make_lora_adapter, start_runtime, stop_shared_runtime
from processes import running
from waiting import wait_for

# The granite parser's markers, forced by a regex: reasoning, then the answer.
REASONING_RE = r"Here is my thought process: [a-z]+( [a-z]+){2,5}\. Here is my response: [A-Z][a-z]+( [a-z]+){0,4}\."


@pytest.mark.runtime_after_drain
@pytest.mark.conformance(
    Row("POST /chat/completions", "REASONING_PARSER: reasoning and reasoning_content", PY, NO),
    Row("POST /chat/completions", "REASONING_PARSER: reasoning and reasoning_content", HTTP, YES),
    Row("POST /chat/completions", "structured_outputs: regex", PY, NO),
    Row("ADAPTERS_FILE", "a replica starting later serves the listed adapters from its first request", HTTP, NA),
)
def test_served_name_default_role_ndjson_no_auth_and_a_reasoning_parser(runtime_server, embedded_model_dir,
                                                                        tmp_path):
    # The shared server is done (the drain test SIGTERMed it); make sure
    # before starting this one.
    runtime_server.stop()
    assert not runtime_server.alive()
    adapter = make_lora_adapter(embedded_model_dir, tmp_path / "smol-lora-late", seed=4)
    server = start_runtime(
        embedded_model_dir,
        tmp_path / "runtime-2.log",
        {"OPENAI_SERVED_MODEL_NAME_OVERRIDE": "", "OPENAI_RESPONSE_ROLE": "narrator", "RAW_OPENAI_OUTPUT": "0",
         "API_KEY_FILE": None, "ENDPOINT_ID": "", "REASONING_PARSER": "granite",
         "STRUCTURED_OUTPUTS_CONFIG": json.dumps({"enable_in_reasoning": True})},  # fmt: skip
        adapters=[{"name": "smol-lora-late", "source": str(adapter)}],
    )
    try:
        name = str(embedded_model_dir)
        base = f"{server.root_url}/v2/any-endpoint/openai/v1"  # no ENDPOINT_ID: any id, no key needed
        models = httpx.get(base + "/models").json()
        # Ready means the adapters listed at start are served too.
        assert [(m["id"], m.get("parent")) for m in models["data"]] == [(name, None), ("smol-lora-late", name)]
        late = httpx.post(base + "/completions", json={"model": "smol-lora-late", "prompt": "Hi", "max_tokens": 2},
                          timeout=60)
        assert late.status_code == 200 and late.json()["model"] == "smol-lora-late"

        body = {"model": name, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3, "temperature": 0}
        r = httpx.post(base + "/chat/completions", json=body, timeout=60)
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["role"] == "narrator"

        # With the official SDK too (non-streaming).
        from openai import OpenAI

        client = OpenAI(api_key="unused", base_url=base, max_retries=0)
        resp = client.chat.completions.create(model=name, messages=body["messages"], max_tokens=2)
        assert resp.choices[0].message.role == "narrator"

        r = httpx.post(base + "/chat/completions", json=body | {"stream": True}, timeout=60)
        assert r.headers["content-type"].startswith("application/x-ndjson")
        chunks = [json.loads(line) for line in r.text.splitlines()]
        assert chunks[0]["choices"][0]["delta"]["role"] == "narrator"
        assert "[DONE]" not in r.text and chunks[-1]["choices"][0]["finish_reason"] == "length"

        assert httpx.post(base + "/chat/completions", json=body | {"model": "smollm2-135m-instruct"}).status_code == 404

        # The reasoning parser's split, whole...
        ask = {"messages": [{"role": "user", "content": "Think, then answer."}], "max_tokens": 48, "temperature": 0}
        forced = {"structured_outputs": {"regex": REASONING_RE}}
        whole = client.chat.completions.create(model=name, extra_body=forced, **ask)
        message = whole.choices[0].message.model_dump()
        reasoning, content = message["reasoning"], message["content"]
        assert re.fullmatch(r" ?[a-z]+( [a-z]+){2,5}\. ?", reasoning), message
        assert re.fullmatch(r" ?[A-Z][a-z]+( [a-z]+){0,4}\.", content), message
        assert message["reasoning_content"] == reasoning  # the older field name too
        # ...and streamed: reasoning deltas first, then content deltas, adding up to the same.
        r = httpx.post(base + "/chat/completions", json={"model": name, "stream": True, **ask, **forced}, timeout=120)
        deltas = [json.loads(line)["choices"][0]["delta"] for line in r.text.splitlines() if '"choices":[{' in line]
        streamed_reasoning = "".join(d.get("reasoning") or "" for d in deltas)
        assert streamed_reasoning == reasoning
        assert "".join(d.get("content") or "" for d in deltas) == content
        assert all(d.get("reasoning_content") == d["reasoning"] for d in deltas if d.get("reasoning"))
        first_content = next(i for i, d in enumerate(deltas) if d.get("content"))
        assert not any(d.get("reasoning") for d in deltas[first_content:])
    finally:
        assert server.stop() == 0


def test_setting_rejected_by_vllm_exits_with_one_line(embedded_model_dir):
    env = {**os.environ, **RUNTIME_TEST_ENV, "MODEL_NAME": str(embedded_model_dir), "MAX_MODEL_LEN": "999999",
           "HOST": "127.0.0.1", "PORT": str(free_port())}  # fmt: skip
    proc = subprocess.run([sys.executable, "-m", "modelendpoint_runtime"], env=env, capture_output=True, text=True,
                          timeout=180)  # fmt: skip
    assert proc.returncode == 1
    lines = [line for line in proc.stderr.splitlines() if line.startswith("modelendpoint-runtime:")]
    assert len(lines) == 1, proc.stderr[-2000:]
    assert lines[0].startswith("modelendpoint-runtime: invalid MAX_MODEL_LEN:")
    assert "Traceback" not in proc.stderr


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return found


def _health(port: int) -> str | None:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).json().get("status")
    except (httpx.HTTPError, ValueError):
        return None


@pytest.mark.runtime_after_drain
def test_sigterm_while_loading_stops_at_once(embedded_model_dir, tmp_path):
    stop_shared_runtime()  # one engine at a time
    port = free_port()
    env = {**os.environ, **RUNTIME_TEST_ENV, "MODEL_NAME": str(embedded_model_dir), "HOST": "127.0.0.1",
           "PORT": str(port)}  # fmt: skip
    log_path = tmp_path / "loading.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "modelendpoint_runtime"], env=env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    try:
        # Mid-load: the server answers (/health "loading") and vLLM's engine
        # process is running (the load itself takes a minute or more here).
        wait_for(lambda: _health(port) == "loading" and _children(proc.pid), timeout=120, interval=0.2,
                 what="the engine load to be under way")  # fmt: skip
        children = _children(proc.pid)
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(60)  # the load alone takes 60-130 s here
        text = log_path.read_text(errors="replace")
        assert code == 0, text[-3000:]
        # It did not wait for the load: the model never became ready; the load was cancelled.
        assert '"msg":"ready"' not in text and '"msg":"load cancelled"' in text, text[-3000:]
        wait_for(lambda: not any(running(c) for c in children), timeout=15, interval=0.2,
                 what="the engine process to be gone")  # fmt: skip
    finally:
        if proc.poll() is None:
            # Its own session: the engine process goes with it, not orphaned.
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)
