"""A control plane with the real node and the project's images: what `make dev` and
the end-to-end tests start (one call instead of five).

``start(state_dir)`` prepares the host, starts the control plane bound to the node
address, the node, builds (or finds cached) and loads the operator and runtime
images, and provisions the embedded model's cache volume (claim
``models.CLAIM_NAME`` in ``model_namespace``). ``Stack.stop()`` stops the node,
then the control plane.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

HACK = Path(__file__).resolve().parent.parent
if str(HACK) not in sys.path:
    sys.path.insert(0, str(HACK))

import localcluster  # noqa: E402
from node import config, models, run  # noqa: E402


@dataclass
class Stack:
    cp: localcluster.ControlPlane
    node: run.Node
    images: dict[str, str] = field(default_factory=dict)

    def check_alive(self) -> None:
        """Raise, with the end of its log, if a process of the node has exited."""
        self.node.check_alive()

    def stop(self) -> None:
        try:
            self.node.stop()
        finally:
            self.cp.stop()


def model_cache_dir() -> Path:
    """The node's model-cache folder: the hostPath of the local-model-cache volume."""
    return localcluster.default_cache_dir() / "node" / "model-cache"


def start(state_dir: Path, *, hf_home: Path, bin_dir: Path | None = None, outlive_starter: bool = False,
          model_namespace: str = "default", step=lambda message: None) -> Stack:
    from images import build as images

    run.host_setup()
    step("starting the control plane (etcd, kube-apiserver, controller-manager, scheduler, kwok)")
    cp = localcluster.start(state_dir / "cluster", bin_dir, node_ip=config.NODE_IP,
                            outlive_starter=outlive_starter)
    node = None
    try:
        step(f"starting the node {config.NODE_NAME} (containerd, kubelet, kube-proxy)")
        node = run.start(cp, state_dir / "node", outlive_starter=outlive_starter, setup=False)
        started = time.monotonic()
        step("building and loading the images (cached by content; cold: about 10 minutes)")
        names = images.ensure_project_images(node)
        step(f"images ready in {time.monotonic() - started:.0f}s")
        cache = models.prepare(hf_home, model_cache_dir())
        cp.kubectl("create", "namespace", model_namespace, check=False)
        for obj in models.volume_manifests(cache, model_namespace):
            cp.kubectl("apply", "-f", "-", input=json.dumps(obj))
        return Stack(cp, node, names)
    except BaseException:
        if node:
            node.stop()
        cp.stop()
        raise
