"""End-to-end fixtures: a dedicated control plane with the real node (containerd,
kubelet, kube-proxy, the images built from the repository's Dockerfiles), the local
ingress and the chart installed, as `make dev` runs them.

The e2e tier gets its own control plane (about ten seconds to start) so that no
operator started by the integration tier can touch its objects.
"""

from __future__ import annotations

from pathlib import Path

import pytest

import dev
import embedded_model


@pytest.fixture(scope="session")
def e2e_cluster(testbed_bin: Path, embedded_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    state = tmp_path_factory.mktemp("e2e")
    stack = dev.start_local_stack(state, embedded_model.hf_home(), bin_dir=testbed_bin)
    try:
        stack.wait_listening()
        dev.helm_install(stack.cp, check_alive=stack.check_alive)
        yield stack.cp, stack
    finally:
        stack.stop()
