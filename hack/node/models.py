"""The embedded model on the real node, as a pre-provisioned PersistentVolume.

`make embedded-model` lays the model out as an offline Hugging Face cache whose
files are symlinks into the model's folder (absolute host paths, which a
container does not see). ``prepare(...)`` makes a node-local copy a container
can use: the same Hub cache layout with real files (hard links, so no second
copy of the weights), folders owned by the runtime's uid so the Hub library
can add its lock and ref files, files read-only. ``volume_manifests(...)``
exposes that folder as a hostPath PersistentVolume with a bound claim, which a
ModelEndpoint names in ``spec.modelCache.claimName``, as a cluster with a
pre-filled model cache volume would; the pod spec the operator writes is
unchanged.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

CLAIM_NAME = "local-model-cache"
RUNTIME_UID = 10001  # the runtime image's user (Dockerfile.runtime, the operator's pod spec)


def prepare(hf_home: Path, dest: Path, uid: int = RUNTIME_UID, gid: int = RUNTIME_UID) -> Path:
    """Copy the Hub cache at ``hf_home`` to ``dest`` with links resolved; idempotent."""
    for src_dir, _dirs, files in os.walk(hf_home):
        rel = Path(src_dir).relative_to(hf_home)
        target_dir = dest / rel
        target_dir.mkdir(parents=True, exist_ok=True)
        os.chown(target_dir, uid, gid)
        target_dir.chmod(0o775)
        for name in files:
            src = Path(src_dir) / name
            target = target_dir / name
            real = src.resolve()
            if target.exists() and target.stat().st_ino == real.stat().st_ino:
                continue
            target.unlink(missing_ok=True)
            try:
                os.link(real, target)
            except OSError:  # another filesystem: copy
                shutil.copy2(real, target)
            target.chmod(0o644)
    return dest


def volume_manifests(path: Path, namespace: str, claim: str = CLAIM_NAME, size: str = "10Gi") -> list[dict]:
    """A hostPath PersistentVolume at ``path`` pre-bound to claim ``namespace/claim``."""
    pv_name = f"{claim}-{namespace}"
    return [
        {
            "apiVersion": "v1",
            "kind": "PersistentVolume",
            "metadata": {"name": pv_name, "labels": {"modelendpoint.dev/local-model-cache": "true"}},
            "spec": {
                "capacity": {"storage": size},
                # Replicas of a ModelEndpoint share it, as they would a ReadWriteMany volume.
                "accessModes": ["ReadWriteMany"],
                "persistentVolumeReclaimPolicy": "Retain",
                "storageClassName": "",
                "hostPath": {"path": str(path), "type": "Directory"},
                "claimRef": {"namespace": namespace, "name": claim},
            },
        },
        {
            "apiVersion": "v1",
            "kind": "PersistentVolumeClaim",
            "metadata": {"name": claim, "namespace": namespace},
            "spec": {
                "accessModes": ["ReadWriteMany"],
                "storageClassName": "",
                "volumeName": pv_name,
                "resources": {"requests": {"storage": size}},
            },
        },
    ]
