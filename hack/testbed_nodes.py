"""Simulated (kwok) CPU nodes for clusters whose pods need not really run.

The test bed's GPU nodes are tainted (``nvidia.com/gpu``, as GPU node pools are), so a
pod without GPUs lands on none of them. The integration tier and the operator
benchmark add these untainted CPU nodes for their CPU ModelEndpoints; `make dev` and
the end-to-end tier don't, so their CPU pods go to the real node.
"""

from __future__ import annotations

import localcluster


def cpu_node_manifest(name: str) -> dict:
    """A kwok node like the GPU ones (32 CPUs, 110 pods), without GPUs or taints."""
    node = localcluster.gpu_node_manifest(name, 0)
    node["spec"] = {}
    node["metadata"]["labels"].pop("nvidia.com/gpu.present", None)
    for part in ("allocatable", "capacity"):
        node["status"][part].pop("nvidia.com/gpu", None)
    return node
