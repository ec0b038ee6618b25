"""Runtime fixtures: ONE real runtime server (one vLLM engine) per test session.

``runtime_server`` starts ``python -m modelendpoint_runtime`` on a free
loopback port with the embedded SmolLM2 model, waits for ``/ready`` (failing
loudly with the log tail if the process dies or the wait times out), and stops
it at the end of the session (SIGTERM, then kill). ``openai_client`` is the
official ``openai`` SDK pointed at it the way the guide says:
``http://127.0.0.1:<port>/v2/<ENDPOINT_ID>/openai/v1``.

The server runs with deliberately small limits (body size, caps, admission,
timeouts) so the error tests are cheap; see ``RUNTIME_TEST_ENV``. Its keys
come from a key file (``API_KEY_FILE``, as the operator sets it), re-read
every second, and it serves ``/metrics`` without a key on ``METRICS_PORT``.

Tests marked ``runtime_drain`` SIGTERM the shared server; they are moved to
the end of the session so every other test has used the server first. Tests
marked ``runtime_after_drain`` come after those: they may start their own
server (another configuration) once the shared one has exited, so two
engines never run at once.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

import conformance
from conformance import (  # noqa: F401 - the conformance matrix's hooks, active through this plugin
    pytest_addoption,
    pytest_collection_finish,
    pytest_deselected,
    pytest_runtest_logreport,
    pytest_sessionfinish,
)
from localcluster import free_port, free_ports  # noqa: F401 - free_port: re-exported for the tests

ENDPOINT_ID = "ep-test-1"
# Two keys: rotation. Tests use the new one; the old one must still work.
API_KEYS = ("sk-test-old-0123456789", "sk-test-new-9876543210")
SERVED_NAME = "smollm2-135m-instruct"
READY_TIMEOUT_S = 300.0

# The embedded model's chat template, plus tools in the Hermes layout the
# `hermes` tool-call parser reads (<tools> in the system message, <tool_call>
# for calls, <tool_response> for results): what `engine.chatTemplate` is for.
# Without tools it renders exactly what the model's own template renders, so
# every other test sees the same prompts (tests/unit/test_runtime_api_routes.py checks).
TOOLS_CHAT_TEMPLATE = (
    "{%- set default_system = 'You are a helpful AI assistant named SmolLM, trained by Hugging Face' -%}"
    "{%- if tools -%}"
    "{{ '<|im_start|>system\n' }}"
    "{{ messages[0]['content'] if messages[0]['role'] == 'system' else default_system }}"
    "{{ '\n\n# Tools\n\nYou may call the functions below. Their signatures are within <tools></tools> '"
    " 'XML tags:\n<tools>' }}"
    "{%- for tool in tools %}{{ '\n' }}{{ tool | tojson }}{% endfor -%}"
    "{{ '\n</tools>\n\nFor a function call, return a JSON object with the function name and arguments within '"
    " '<tool_call></tool_call> XML tags:\n<tool_call>\n'"
    " '{\"name\": <function-name>, \"arguments\": <args-json-object>}\n'"
    " '</tool_call><|im_end|>\n' }}"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{%- if loop.first and message['role'] != 'system' and not tools -%}"
    "{{ '<|im_start|>system\n' + default_system + '<|im_end|>\n' }}"
    "{%- endif -%}"
    "{%- if loop.first and message['role'] == 'system' and tools -%}"
    "{%- elif message['role'] == 'assistant' and message.get('tool_calls') -%}"
    "{{ '<|im_start|>assistant\n' + (message['content'] or '') }}"
    "{%- for call in message['tool_calls'] -%}"
    "{%- set arguments = call['function']['arguments'] -%}"
    "{{ '<tool_call>\n{\"name\": \"' + call['function']['name'] + '\", \"arguments\": ' }}"
    "{{ arguments | tojson if arguments is mapping else arguments }}{{ '}\n</tool_call>' }}"
    "{%- endfor -%}"
    "{{ '<|im_end|>\n' }}"
    "{%- elif message['role'] == 'tool' -%}"
    "{{ '<|im_start|>user\n<tool_response>\n' + message['content'] + '\n</tool_response><|im_end|>\n' }}"
    "{%- else -%}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\n' }}{%- endif -%}"
)


# The shared server's configuration (besides MODEL_NAME, PORT, METRICS_PORT and
# API_KEY_FILE, set by start_runtime): small limits make the 413/400/503/408
# cases cheap to provoke.
RUNTIME_TEST_ENV = {
    "ENDPOINT_ID": ENDPOINT_ID,
    "OPENAI_SERVED_MODEL_NAME_OVERRIDE": SERVED_NAME,
    # vLLM options by the worker rule (no table in the runtime behind them);
    # test_runtime_hardening.py checks that the last two reached the engine.
    "MAX_MODEL_LEN": "2048",
    "MAX_NUM_SEQS": "8",
    "ENFORCE_EAGER": "0",
    "DTYPE": "float32",
    "ENABLE_PREFIX_CACHING": "false",
    "MAX_NUM_BATCHED_TOKENS": "3072",
    "LIMIT_N": "4",
    "LIMIT_BEST_OF": "4",
    "LIMIT_MAX_TOKENS": "1024",
    "LIMIT_LOGPROBS": "5",
    "MAX_REQUEST_BODY_BYTES": str(256 * 1024),
    "MAX_CONCURRENT_REQUESTS": "3",
    "READ_TIMEOUT_SECONDS": "5",
    "WRITE_TIMEOUT_SECONDS": "5",
    "API_KEY_FILE_POLL_SECONDS": "1",
    "RETRY_AFTER_SECONDS": "2",
    "DRAIN_TIMEOUT_SECONDS": "300",  # room for the drain test's long stream on a slow machine
    "LOG_LEVEL": "info",
    # Issue 14's features on the same engine: tool calling with auto choice
    # (the hermes parser, the template above inline as the operator passes
    # engine.chatTemplate.inline), LoRA adapters from ADAPTERS_FILE (set by
    # start_runtime), re-read every second.
    "TOOL_CALL_PARSER": "hermes",
    "ENABLE_AUTO_TOOL_CHOICE": "true",
    "CHAT_TEMPLATE": TOOLS_CHAT_TEMPLATE,
    "ENABLE_LORA": "true",
    "MAX_LORA_RANK": "8",
    "MAX_LORAS": "2",
    "ADAPTERS_POLL_SECONDS": "1",
    # vLLM on the CPU: a small KV cache; no usage reporting from tests.
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


@dataclass
class RuntimeServer:
    """A running runtime process."""

    process: subprocess.Popen
    port: int
    log_path: Path
    metrics_port: int | None = None
    key_file: Path | None = None
    model: str = SERVED_NAME
    endpoint_id: str = ENDPOINT_ID
    api_key: str = API_KEYS[1]
    api_keys: tuple[str, ...] = API_KEYS
    env: dict[str, str] = field(default_factory=dict)
    log_file: Any = None
    adapters_file: Path | None = None

    @property
    def root_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        """The guide's base URL pattern, on loopback."""
        return f"{self.root_url}/v2/{self.endpoint_id}/openai/v1"

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"}

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def alive(self) -> bool:
        return self.process.poll() is None

    def metrics_text(self) -> str:
        """One scrape, from METRICS_PORT (no key) when the server has one."""
        if self.metrics_port is not None:
            r = httpx.get(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10)
        else:
            r = httpx.get(f"{self.root_url}/metrics", headers=self.headers, timeout=10)
        r.raise_for_status()
        return r.text

    def write_adapters(self, adapters: list[dict[str, str]]) -> None:
        """Replace ADAPTERS_FILE's list the way the kubelet updates a ConfigMap volume (atomically)."""
        assert self.adapters_file is not None
        new = self.adapters_file.with_name(self.adapters_file.name + ".new")
        new.write_text(json.dumps(adapters))
        new.replace(self.adapters_file)

    def adapters(self) -> dict[str, dict[str, Any]]:
        """GET /adapters on METRICS_PORT (no key), by adapter name."""
        r = httpx.get(f"http://127.0.0.1:{self.metrics_port}/adapters", timeout=10)
        r.raise_for_status()
        return {entry["name"]: entry for entry in r.json()["adapters"]}

    def settled_adapters(self, names: set[str]) -> dict[str, dict[str, Any]]:
        """GET /adapters once it lists exactly ``names``, none of them still loading."""
        from waiting import wait_for

        seen: dict[str, dict[str, Any]] = {}

        def done() -> bool:
            seen.clear()
            seen.update(self.adapters())
            return set(seen) == names and all(a["state"] != "loading" for a in seen.values())

        wait_for(done, timeout=60, interval=0.2, what=f"GET /adapters to settle on {sorted(names)}")
        return seen

    def write_keys(self, content: str) -> None:
        """Replace the key file's content the way the kubelet updates a Secret volume (atomically)."""
        assert self.key_file is not None
        new = self.key_file.with_name(self.key_file.name + ".new")
        new.write_text(content)
        new.replace(self.key_file)

    def stop(self, timeout: float = 90) -> int | None:
        """SIGTERM (drain), then kill if it does not exit in time; the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(30)
        if self.log_file is not None:
            self.log_file.close()
        return self.process.returncode


def start_runtime(
    model_dir: Path, log_path: Path, extra_env: dict[str, str | None] | None = None,
    adapters: list[dict[str, str]] | None = None,
) -> RuntimeServer:
    """Start a runtime process and wait until /ready answers 200.

    Keys come from a key file beside the log (both of API_KEYS), LoRA
    adapters from an adapters file beside it (``adapters``, empty by default,
    as the operator writes spec.adapters); an ``extra_env`` value of None
    removes that variable (``API_KEY_FILE: None``: no auth).
    """
    port, metrics_port = free_ports(2)
    key_file = log_path.with_name("api-keys")
    key_file.write_text(",".join(API_KEYS) + "\n")
    adapters_file = log_path.with_name("adapters.json")
    adapters_file.write_text(json.dumps(adapters or []))
    env = dict(os.environ)
    env.update(RUNTIME_TEST_ENV)
    env.update({"MODEL_NAME": str(model_dir), "HOST": "127.0.0.1", "PORT": str(port),
                "METRICS_PORT": str(metrics_port), "API_KEY_FILE": str(key_file),
                "ADAPTERS_FILE": str(adapters_file)})  # fmt: skip
    for name, value in (extra_env or {}).items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    log_file = open(log_path, "wb")  # noqa: SIM115 - closed with the process
    process = subprocess.Popen(
        [sys.executable, "-m", "modelendpoint_runtime"],
        env=env,
        stdout=log_file,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # our SIGTERM reaches only the server, not pytest
    )
    server = RuntimeServer(process=process, port=port, log_path=log_path, env=env, log_file=log_file,
                           metrics_port=int(env["METRICS_PORT"]) if env.get("METRICS_PORT") else None,
                           key_file=key_file if env.get("API_KEY_FILE") else None,
                           adapters_file=adapters_file if env.get("ADAPTERS_FILE") else None)  # fmt: skip
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(
                f"the runtime exited with code {process.returncode} before becoming ready; log tail:\n"
                + server.log_tail()
            )
        try:
            if httpx.get(f"{server.root_url}/ready", timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    server.stop(timeout=20)
    raise RuntimeError(f"the runtime was not ready after {READY_TIMEOUT_S:.0f}s; log tail:\n" + server.log_tail())


_start_failure: list[str] = []
_shared: list[RuntimeServer] = []


def stop_shared_runtime() -> None:
    """Stop the shared server if this session started it (before a test runs an engine of its own)."""
    for server in _shared:
        server.stop()


@pytest.fixture(scope="session")
def runtime_server(embedded_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RuntimeServer]:
    """The shared runtime server (the only engine of the session)."""
    # pytest retries a failed session fixture for every test that uses it;
    # one failed start (up to READY_TIMEOUT_S) is enough.
    if _start_failure:
        pytest.fail(f"(the runtime already failed to start in this session)\n{_start_failure[0]}", pytrace=False)
    log_path = tmp_path_factory.mktemp("runtime") / "runtime.log"
    try:
        # ADAPTERS_FILE starts empty (spec.adapters: []): the LoRA tests add theirs while it serves.
        server = start_runtime(embedded_model_dir, log_path)
    except RuntimeError as exc:
        _start_failure.append(str(exc))
        pytest.fail(str(exc), pytrace=False)
    _shared.append(server)
    try:
        yield server
    finally:
        server.stop()


def make_lora_adapter(model_dir: Path, out: Path, seed: int, rank: int = 8) -> Path:
    """A LoRA adapter for the embedded model, made with PEFT: random non-zero weights (so greedy
    output differs from the base model's), rank ``rank`` on the attention's q and v projections.

    Only the base model's shapes matter, so it is built from its config
    without reading its weights.
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(model_dir)), dtype=torch.float32)
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["q_proj", "v_proj"], lora_dropout=0.0,
                        init_lora_weights=False)  # fmt: skip (False: random B as well as A, not zeros)
    get_peft_model(model, config).save_pretrained(str(out))
    return out


JS_DIR = Path(__file__).resolve().parent / "js"


def run_node(script: str, server: RuntimeServer, extra_env: dict[str, str] | None = None) -> dict:
    """Run a tests/js script with the official openai npm package against ``server``; its last JSON line."""
    import shutil

    node = shutil.which("node")
    if node is None:
        pytest.fail("node is not installed; the JavaScript client tests need Node.js 20")
    if not (JS_DIR / "node_modules" / "openai").is_dir():
        pytest.fail("the openai npm package is missing; run `make node-deps`")
    env = dict(os.environ, RUNTIME_BASE_URL=server.base_url, RUNTIME_API_KEY=server.api_key, RUNTIME_MODEL=server.model)
    env.update(extra_env or {})
    proc = subprocess.run([node, str(JS_DIR / script)], capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="session")
def openai_client(runtime_server: RuntimeServer):
    """The official OpenAI Python SDK, aimed at the runtime like the guide says."""
    from openai import OpenAI

    client = OpenAI(api_key=runtime_server.api_key, base_url=runtime_server.base_url, timeout=120, max_retries=0)
    yield client
    client.close()


def pytest_configure(config: pytest.Config) -> None:
    conformance.configure(config)
    config.addinivalue_line(
        "markers", "runtime_drain: SIGTERMs the shared runtime server; runs after every other test"
    )
    config.addinivalue_line(
        "markers", "runtime_after_drain: runs after the runtime_drain tests (may start its own server)"
    )


def _phase(item: pytest.Item) -> int:
    if item.get_closest_marker("runtime_after_drain"):
        return 2
    if item.get_closest_marker("runtime_drain"):
        return 1
    return 0


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list[pytest.Item]) -> None:
    # Stable sort: everything else in its usual order, then drain tests, then
    # the tests that need the shared server gone.
    items.sort(key=_phase)
