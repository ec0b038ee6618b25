"""End-to-end fixtures: a dedicated control plane with the local node, the local
ingress and the chart installed, as `make dev` runs them.

The e2e tier gets its own control plane (about ten seconds to start) so that no
operator started by the integration tier can touch its objects.
"""

from __future__ import annotations

from pathlib import Path

import pytest

import dev
import embedded_model
import localcluster


@pytest.fixture(scope="module")
def e2e_cluster(testbed_bin: Path, embedded_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    state = tmp_path_factory.mktemp("e2e")
    cp = localcluster.start(state / "cluster", testbed_bin)
    stack = None
    try:
        stack = dev.start_local_stack(cp, state, embedded_model.hf_home())
        stack.wait_listening()
        dev.helm_install(cp, check_alive=stack.check_alive)
        yield cp, stack
    finally:
        if stack:
            stack.stop()
        cp.stop()
