"""Shared fixtures and test-tier selection.

Tiers follow folders: tests/unit -> ``unit``, tests/integration ->
``integration``, tests/e2e -> ``e2e``; the marker is applied here, so `pytest -m
unit` selects by folder without decorating every test.

Session fixtures start expensive real parts once: the control plane
(``control_plane``) and, in tests/fixtures_runtime.py, one vLLM engine. A part
that is missing fails loudly with the command that provides it; nothing is
skipped for lack of it.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

REPO_DIR = Path(__file__).resolve().parent.parent

pytest_plugins = ["fixtures_runtime", "fixtures_operator", "fixtures_gateway"]

_TIERS = ("unit", "integration", "e2e")
CPU_NODE = "kwok-cpu-0"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        parts = Path(str(item.fspath)).relative_to(REPO_DIR / "tests").parts
        if parts and parts[0] in _TIERS:
            item.add_marker(getattr(pytest.mark, parts[0]))


@pytest.fixture(scope="session")
def repo_dir() -> Path:
    return REPO_DIR


@pytest.fixture(scope="session")
def testbed_bin() -> Path:
    """The folder holding etcd, kube-*, kubectl, kwok, kwokctl and helm built from Go modules."""
    import localcluster

    try:
        return localcluster.testbed_bin_dir()
    except subprocess.CalledProcessError as exc:
        pytest.fail(f"the test bed binaries could not be built ({exc}); run `make testbed`")


@pytest.fixture(scope="session")
def control_plane(testbed_bin: Path, tmp_path_factory: pytest.TempPathFactory):
    """A real control plane (etcd, API server, controller-manager, scheduler, kwok GPU nodes).

    Every process it starts is stopped at the end of the session, also when
    tests fail; logs stay in the session's temporary folder for debugging.
    """
    import localcluster

    state = tmp_path_factory.mktemp("cluster")
    cp = localcluster.start(state, testbed_bin)
    try:
        # A simulated node without GPUs or taints, for CPU ModelEndpoints (gpus: 0) whose pods
        # need not really run here (the GPU nodes are tainted, as GPU node pools are). Only
        # this tier's cluster has it: on `make dev`'s, CPU pods belong on the real node.
        import testbed_nodes

        cp.kubectl("apply", "-f", "-", input=json.dumps(testbed_nodes.cpu_node_manifest(CPU_NODE)))
        yield cp
    finally:
        cp.stop()


@pytest.fixture(scope="session")
def embedded_model_dir() -> Path:
    """The embedded SmolLM2-135M-Instruct model as a Hugging Face folder."""
    import embedded_model

    folder = embedded_model.model_dir()
    if not (folder / "config.json").exists():
        pytest.fail(f"the embedded model is not prepared at {folder}; run `make embedded-model`")
    return folder


@pytest.fixture(scope="session")
def kube_env(control_plane) -> dict[str, str]:
    """Environment for subprocesses (kubectl, helm, the operator) aimed at the test cluster."""
    return control_plane.env()


def pytest_report_header(config: pytest.Config) -> str:
    return f"MEP_CACHE={os.environ.get('MEP_CACHE', '~/.cache/modelendpoint')}"
