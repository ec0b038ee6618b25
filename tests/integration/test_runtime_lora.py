"""LoRA adapters from ADAPTERS_FILE on the running shared server: served by name, added and removed live.

The shared server runs with LoRA enabled and an empty adapters file (as a
ModelEndpoint with ``spec.adapters: []``). Here the file changes the way
the kubelet updates the operator's ConfigMap (an atomic swap): adapters
made with PEFT (random non-zero weights, so their greedy output differs
from the base model's) appear and disappear in-process, the server's
process id never changes, one that fails to load (a rank above
MAX_LORA_RANK, a missing path) shows its reason on ``GET /adapters`` and
leaves the others serving. The module leaves the file empty again. That a
replica starting later serves the current list is shown by the second
server of test_runtime_config.py, which starts with an adapter listed.
"""

from __future__ import annotations

import httpx
import pytest

from conformance import HTTP, NA, NO, PY, YES, Row
from fixtures_runtime import make_lora_adapter
from waiting import wait_for

PROMPT = [{"role": "user", "content": "Say hello."}]
START_ADAPTER = "smol-lora-a"
CHAT = "POST /chat/completions"


def greedy(client, model: str) -> str:
    r = client.chat.completions.create(model=model, messages=PROMPT, max_tokens=8, temperature=0)
    assert r.model == model
    return r.choices[0].message.content


@pytest.fixture(scope="module")
def base_text(openai_client, runtime_server) -> str:
    return greedy(openai_client, runtime_server.model)


@pytest.fixture(scope="module", autouse=True)
def first_adapter(runtime_server, embedded_model_dir, tmp_path_factory):
    """One adapter added to the running server for this module; the file is empty again afterwards."""
    source = make_lora_adapter(embedded_model_dir, tmp_path_factory.mktemp("lora") / START_ADAPTER, seed=1)
    runtime_server.write_adapters([{"name": START_ADAPTER, "source": str(source)}])
    try:
        runtime_server.settled_adapters({START_ADAPTER})
        yield source
    finally:
        runtime_server.write_adapters([])
        runtime_server.settled_adapters(set())


@pytest.mark.conformance(
    Row("GET /models", "LoRA adapters listed with parent = the served model", PY, NA),
    Row(CHAT, "model: a LoRA adapter's name", PY, NO),
    Row("POST /completions", "model: a LoRA adapter's name", PY, YES),
    Row("GET /adapters (metrics port)", "state per adapter", HTTP, NA),
)
def test_the_start_adapter_is_served_under_its_name(openai_client, runtime_server, base_text):
    cards = {m.id: m for m in openai_client.models.list()}
    assert set(cards) == {runtime_server.model, START_ADAPTER}
    assert cards[START_ADAPTER].parent == runtime_server.model and cards[START_ADAPTER].owned_by == "modelendpoint"
    assert getattr(cards[runtime_server.model], "parent", None) is None
    assert openai_client.models.retrieve(START_ADAPTER).id == START_ADAPTER
    assert "root" not in cards[START_ADAPTER].model_dump()  # no path inside the pod

    assert runtime_server.adapters()[START_ADAPTER] | {"source": None} == {
        "name": START_ADAPTER, "source": None, "state": "loaded", "error": None}  # fmt: skip
    adapted = greedy(openai_client, START_ADAPTER)
    assert adapted and adapted != base_text  # the adapter's weights were used

    stream = openai_client.completions.create(model=START_ADAPTER, prompt="Hello", max_tokens=6, temperature=0,
                                              stream=True)  # fmt: skip
    chunks = list(stream)
    assert chunks and all(c.model == START_ADAPTER for c in chunks)
    plain = openai_client.completions.create(model=runtime_server.model, prompt="Hello", max_tokens=6, temperature=0)
    assert "".join(c.choices[0].text for c in chunks if c.choices) != plain.choices[0].text


@pytest.mark.conformance(
    Row("ADAPTERS_FILE", "adapter added: served without a restart", PY, NO),
    Row("ADAPTERS_FILE", "adapter removed: 404 without a restart", PY, NO),
    Row("ADAPTERS_FILE", "adapter failing to load: vLLM's reason, the others keep working", HTTP, NA),
)
def test_adapters_come_and_go_without_a_restart(openai_client, runtime_server, base_text, embedded_model_dir,
                                                tmp_path):
    pid = runtime_server.process.pid
    start = runtime_server.adapters()[START_ADAPTER]
    added = make_lora_adapter(embedded_model_dir, tmp_path / "smol-lora-b", seed=2)
    too_big = make_lora_adapter(embedded_model_dir, tmp_path / "smol-lora-r16", seed=3, rank=16)
    runtime_server.write_adapters([
        {"name": START_ADAPTER, "source": start["source"]},
        {"name": "smol-lora-b", "source": str(added)},
        {"name": "smol-lora-r16", "source": str(too_big)},
        {"name": "smol-lora-missing", "source": str(tmp_path / "not-there")},
    ])  # fmt: skip
    try:
        report = runtime_server.settled_adapters({START_ADAPTER, "smol-lora-b", "smol-lora-r16", "smol-lora-missing"})
        assert report["smol-lora-b"]["state"] == "loaded" and report[START_ADAPTER]["state"] == "loaded"
        assert report["smol-lora-r16"]["state"] == "failed" and "max_lora_rank" in report["smol-lora-r16"]["error"]
        assert report["smol-lora-missing"]["state"] == "failed" and report["smol-lora-missing"]["error"]

        new_text = greedy(openai_client, "smol-lora-b")
        assert new_text and new_text != base_text
        assert greedy(openai_client, START_ADAPTER)  # the others keep working
        assert greedy(openai_client, runtime_server.model) == base_text
        names = {m.id for m in openai_client.models.list()}
        assert names == {runtime_server.model, START_ADAPTER, "smol-lora-b"}  # failed ones are not served
        r = httpx.post(runtime_server.base_url + "/chat/completions", headers=runtime_server.headers, timeout=60,
                       json={"model": "smol-lora-r16", "messages": PROMPT, "max_tokens": 2})  # fmt: skip
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
        assert "failed to load" in r.json()["error"]["message"]

        # Removed: no longer listed nor served; the one left still is.
        runtime_server.write_adapters([{"name": "smol-lora-b", "source": str(added)}])
        runtime_server.settled_adapters({"smol-lora-b"})
        assert {m.id for m in openai_client.models.list()} == {runtime_server.model, "smol-lora-b"}
        r = httpx.post(runtime_server.base_url + "/chat/completions", headers=runtime_server.headers, timeout=60,
                       json={"model": START_ADAPTER, "messages": PROMPT, "max_tokens": 2})  # fmt: skip
        assert r.status_code == 404 and r.json()["error"]["param"] == "model"
        assert greedy(openai_client, "smol-lora-b") == new_text
        assert runtime_server.process.pid == pid and runtime_server.alive()
    finally:
        runtime_server.write_adapters([{"name": START_ADAPTER, "source": start["source"]}])
        runtime_server.settled_adapters({START_ADAPTER})


@pytest.mark.conformance(Row("ADAPTERS_FILE", "a file turned unusable keeps the current adapters", HTTP, NA))
def test_an_unusable_adapters_file_changes_nothing(openai_client, runtime_server):
    assert runtime_server.adapters_file is not None
    good = runtime_server.adapters_file.read_text()
    new = runtime_server.adapters_file.with_name("adapters.json.new")
    new.write_text('[{"name": "x"}]')  # no source
    new.replace(runtime_server.adapters_file)
    try:
        wait_for(lambda: "file_error" in _report(runtime_server), timeout=10, interval=0.2,
                 what="GET /adapters to report the unusable file")  # fmt: skip
        assert "no source" in _report(runtime_server)["file_error"]
        assert runtime_server.adapters()[START_ADAPTER]["state"] == "loaded"
        assert greedy(openai_client, START_ADAPTER)
    finally:
        new.write_text(good)
        new.replace(runtime_server.adapters_file)
    wait_for(lambda: "file_error" not in _report(runtime_server), timeout=10, interval=0.2,
             what="the file error to clear")  # fmt: skip


def _report(server) -> dict:
    return httpx.get(f"http://127.0.0.1:{server.metrics_port}/adapters", timeout=10).json()
