"""End-to-end fixtures: a dedicated control plane with the real node (containerd,
kubelet, kube-proxy, the images built from the repository's Dockerfiles), the local
ingress and the chart installed (operator and gateway in real containers under their
own ServiceAccounts), as `make dev` runs them; then the tier's two ModelEndpoints,
created together at the start so that their engines load in parallel.

The e2e tier gets its own control plane (about ten seconds to start) so that no
operator started by the integration tier can touch its objects.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import e2e_lib as e2e
import pytest

import dev
import embedded_model

# Chart values for the tests: answers name the replica that served them, and the
# autoscaler samples every 2 s rather than 5 (its scale-down delay is what takes time).
HELM_VALUES = (
    "--set", "gateway.extraEnv[0].name=MEP_GATEWAY_REPLICA_HEADER",
    "--set-string", "gateway.extraEnv[0].value=true",
    "--set", "autoscaling.intervalSeconds=2",
)


@pytest.fixture(scope="session")
def e2e_cluster(testbed_bin: Path, embedded_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    state = tmp_path_factory.mktemp("e2e")
    stack = dev.start_local_stack(state, embedded_model.hf_home(), bin_dir=testbed_bin)
    try:
        stack.wait_listening()
        dev.helm_install(stack.cp, *HELM_VALUES, check_alive=stack.check_alive)
        yield stack.cp, stack
    finally:
        stack.stop()


@dataclass
class System:
    cp: object
    stack: dev.LocalStack
    old_key: str  # in the keyed model's Secret at the start, rotated out by a test
    key: str      # the keyed model's key throughout
    created: float  # when the ModelEndpoints were applied (monotonic)

    @property
    def gateway_url(self) -> str:
        """The gateway's OpenAI base URL through the local ingress (its Ingress, its Service)."""
        return dev.gateway_url(self.stack)


@pytest.fixture(scope="session")
def system(e2e_cluster) -> System:
    """Both ModelEndpoints, applied at once; the open one scaled to two with `kubectl scale`."""
    cp, stack = e2e_cluster
    old, new = e2e.new_key("old"), e2e.new_key("new")
    e2e.apply(cp, e2e.key_secret(f"{old},{new}"))
    e2e.apply(cp, e2e.open_endpoint())
    e2e.apply(cp, e2e.keyed_endpoint())
    cp.kubectl("scale", f"modelendpoint/{e2e.OPEN}", "-n", e2e.NS, "--replicas=2")
    return System(cp, stack, old, new, time.monotonic())
