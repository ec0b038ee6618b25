"""A local node: plays the kubelet for pods scheduled to it, as local processes.

`make dev` and the end-to-end tests need the runtime pods the operator writes to
really run, on a machine without a container engine. This registers a Node
(``local-runner``, outside kwok's selector, no GPUs) with the real scheduler,
and for every pod bound to it:

- starts each container as a local process with exactly the pod's command,
  arguments and environment (``value``, ``secretKeyRef``, ``configMapKeyRef``,
  ``fieldRef`` and ``envFrom`` resolved from the API server);
- gives the pod its own loopback address (127.0.1.N) as its pod IP, and binds the
  process there (``HOST``), so replicas don't collide on a port;
- reports phase, pod IP and readiness to the API server from the pod's own
  readiness probe, so the real endpoint-slice controller fills the Service;
  it compares with the pod's status as the API server has it, not with its own
  last write, so a status changed by someone else (the node controller marking
  the pod NotReady) is put right on the next sync;
- on deletion sends SIGTERM, and removes the pod once the process has exited
  or, after the pod's grace period, been killed; the sync loop doesn't wait for
  it, so several pods stop concurrently and the node's heartbeats go on.

What a container image would provide is mapped to this machine (see README):
an image's entrypoint comes from ``--entrypoint IMAGE=COMMAND``; a volume mount
becomes a per-pod folder, except the Hugging Face cache (the mount HF_HOME
points into), which is the node's shared cache, like a node-local model cache.
"""

from __future__ import annotations

import argparse
import base64
import datetime
import itertools
import json
import logging
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from kubernetes import client, config

from localcluster import die_with_starter
from kubernetes.client.rest import ApiException

log = logging.getLogger("localnode")

NODE_NAME = "local-runner"
NODE_LABEL = ("modelendpoint.dev/local-runner", "true")


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def host_capacity() -> dict[str, str]:
    """This machine's CPUs and memory, so the scheduler packs pods onto the
    local runner as it would onto a real node of that size."""
    mem_kib = next(int(line.split()[1]) for line in open("/proc/meminfo") if line.startswith("MemTotal:"))
    return {"cpu": str(os.cpu_count() or 1), "memory": f"{mem_kib}Ki", "pods": "20"}


def image_repository(image: str) -> str:
    """``repo/name:tag`` or ``repo/name@sha256:...`` → ``repo/name``."""
    image = image.split("@", 1)[0]
    last = image.rsplit("/", 1)[-1]
    if ":" in last:
        image = image[: len(image) - len(last)] + last.split(":", 1)[0]
    return image


_VAR_REF = re.compile(r"\$\((\w+)\)")


def expand(value: str, env: dict[str, str]) -> str:
    """Kubernetes' ``$(VAR)`` expansion in env values, command and args."""
    return _VAR_REF.sub(lambda m: env.get(m.group(1), m.group(0)), value)


def container_argv(container: dict, entrypoints: dict[str, list[str]], env: dict[str, str]) -> list[str]:
    """The argv a container runtime would exec: ``command`` or the image's entrypoint, then args."""
    command = container.get("command")
    if not command:
        repo = image_repository(container["image"])
        if repo not in entrypoints:
            raise LookupError(
                f"no local entrypoint for image {container['image']!r}; "
                f"known: {sorted(entrypoints)} (--entrypoint IMAGE=COMMAND)"
            )
        command = entrypoints[repo]
    return [expand(a, env) for a in [*command, *container.get("args", [])]]


@dataclass
class LocalPod:
    uid: str
    namespace: str
    name: str
    ip: str
    process: subprocess.Popen | None = None
    restarts: int = 0
    ready: bool = False
    started_at: str = field(default_factory=_now)
    next_start: float = 0.0
    # Set once SIGTERM is sent: when SIGKILL follows if the process is still there.
    kill_at: float | None = None

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None


def _condition_states(status: dict) -> dict[str, str]:
    return {c.get("type"): c.get("status") for c in status.get("conditions") or []}


def _container_state(cs: dict) -> tuple:
    state = cs.get("state") or {}
    kind = next((k for k, v in state.items() if v), None)
    reason = (state.get(kind) or {}).get("reason") if kind == "waiting" else None
    return (cs.get("name"), cs.get("ready"), cs.get("started"), cs.get("restartCount"), kind, reason)


def status_differs(desired: dict, current: dict) -> bool:
    """Whether the pod's status on the API server (``current``) says something
    other than what the runner observes (``desired``).

    Only what the runner decides is compared: phase, addresses, condition
    states and the container's readiness, restarts and state; timestamps and
    fields the API server fills in are not.
    """
    if any(desired.get(k) != current.get(k) for k in ("phase", "podIP", "hostIP")):
        return True
    # Only the condition types the runner sets: others (DisruptionTarget, ...) belong
    # to whoever added them, and a merge patch by type leaves them in place anyway.
    now = _condition_states(current)
    if any(now.get(kind) != state for kind, state in _condition_states(desired).items()):
        return True
    return ([_container_state(c) for c in desired.get("containerStatuses", [])]
            != [_container_state(c) for c in current.get("containerStatuses") or []])


def with_transition_times(desired: dict, current: dict, now: str) -> dict:
    """``desired`` with each condition's lastTransitionTime kept from ``current``
    when its status is unchanged, else ``now`` (what the time means in Kubernetes)."""
    before = {c.get("type"): c for c in current.get("conditions") or []}
    for c in desired["conditions"]:
        old = before.get(c["type"])
        c["lastTransitionTime"] = (old.get("lastTransitionTime") if old and old.get("status") == c["status"]
                                   and old.get("lastTransitionTime") else now)
    return desired


class LocalNode:
    def __init__(self, entrypoints: dict[str, list[str]], work_dir: Path, hf_home: Path,
                 extra_env: dict[str, str], core=None, coordination=None, clock=time.monotonic):
        # ``core``, ``coordination`` and ``clock`` are seams for the unit tests.
        self.core = core or client.CoreV1Api()
        self.coordination = coordination or client.CoordinationV1Api()
        self.clock = clock
        self.entrypoints = entrypoints
        self.work_dir = work_dir
        self.hf_home = hf_home
        self.extra_env = extra_env
        self.pods: dict[str, LocalPod] = {}
        # Pods gone from the API server whose processes are still stopping.
        self.orphans: dict[str, LocalPod] = {}
        self._ips = (f"127.0.1.{n}" for n in itertools.count(2))
        self._stop = threading.Event()

    # --- node registration ---------------------------------------------------

    def register(self) -> None:
        node = {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {
                "name": NODE_NAME,
                "labels": {NODE_LABEL[0]: NODE_LABEL[1], "kubernetes.io/hostname": NODE_NAME,
                           "kubernetes.io/os": "linux"},
            },
        }
        try:
            self.core.create_node(node)
        except ApiException as exc:
            if exc.status != 409:
                raise
        self.heartbeat()

    def heartbeat(self) -> None:
        now = _now()
        status = {
            "status": {
                "capacity": host_capacity(),
                "allocatable": host_capacity(),
                "addresses": [{"type": "InternalIP", "address": "127.0.0.1"}],
                "conditions": [{"type": "Ready", "status": "True", "reason": "LocalRunnerReady",
                                "message": "the local runner is up", "lastHeartbeatTime": now,
                                "lastTransitionTime": now}],
                "nodeInfo": {"kubeletVersion": "local-runner", "containerRuntimeVersion": "process://local"},
            }
        }
        self.core.patch_node_status(NODE_NAME, status)
        # The node controller judges liveness by the node's Lease, as with a kubelet.
        renew = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        lease = {"metadata": {"name": NODE_NAME, "namespace": "kube-node-lease"},
                 "spec": {"holderIdentity": NODE_NAME, "leaseDurationSeconds": 40, "renewTime": renew}}
        try:
            self.coordination.patch_namespaced_lease(NODE_NAME, "kube-node-lease", {"spec": lease["spec"]})
        except ApiException as exc:
            if exc.status != 404:
                raise
            self.coordination.create_namespaced_lease("kube-node-lease", lease)

    # --- environment ------------------------------------------------------------

    def _secret_value(self, ns: str, ref: dict) -> str | None:
        try:
            secret = self.core.read_namespaced_secret(ref["name"], ns)
        except ApiException as exc:
            if exc.status == 404 and ref.get("optional"):
                return None
            raise
        data = (secret.data or {}).get(ref["key"])
        if data is None:
            if ref.get("optional"):
                return None
            raise LookupError(f"secret {ns}/{ref['name']} has no key {ref['key']!r}")
        return base64.b64decode(data).decode()

    def _configmap_value(self, ns: str, ref: dict) -> str | None:
        try:
            cm = self.core.read_namespaced_config_map(ref["name"], ns)
        except ApiException as exc:
            if exc.status == 404 and ref.get("optional"):
                return None
            raise
        value = (cm.data or {}).get(ref["key"])
        if value is None and not ref.get("optional"):
            raise LookupError(f"configmap {ns}/{ref['name']} has no key {ref['key']!r}")
        return value

    @staticmethod
    def _optional_read(read, ref: dict, ns: str):
        """``read(name, ns)``, or None for a missing object that ``ref`` marks optional."""
        try:
            return read(ref["name"], ns)
        except ApiException as exc:
            if exc.status == 404 and ref.get("optional"):
                return None
            raise

    def pod_env(self, pod: dict, container: dict, local: LocalPod) -> dict[str, str]:
        ns = pod["metadata"]["namespace"]
        env: dict[str, str] = {}
        for source in container.get("envFrom", []):
            prefix = source.get("prefix", "")
            if "secretRef" in source:
                s = self._optional_read(self.core.read_namespaced_secret, source["secretRef"], ns)
                env.update({prefix + k: base64.b64decode(v).decode() for k, v in (s.data or {}).items()}
                           if s else {})
            if "configMapRef" in source:
                cm = self._optional_read(self.core.read_namespaced_config_map, source["configMapRef"], ns)
                env.update({prefix + k: v for k, v in (cm.data or {}).items()} if cm else {})
        fields = {
            "metadata.name": pod["metadata"]["name"],
            "metadata.namespace": ns,
            "metadata.uid": pod["metadata"]["uid"],
            "spec.nodeName": NODE_NAME,
            "spec.serviceAccountName": pod["spec"].get("serviceAccountName", "default"),
            "status.podIP": local.ip,
            "status.hostIP": "127.0.0.1",
        }
        for var in container.get("env", []):
            if "value" in var:
                env[var["name"]] = expand(var["value"], env)
                continue
            src = var.get("valueFrom", {})
            value: str | None = None
            if "secretKeyRef" in src:
                value = self._secret_value(ns, src["secretKeyRef"])
            elif "configMapKeyRef" in src:
                value = self._configmap_value(ns, src["configMapKeyRef"])
            elif "fieldRef" in src:
                value = fields.get(src["fieldRef"]["fieldPath"])
            if value is not None:
                env[var["name"]] = value
        return env

    def local_paths(self, container: dict, local: LocalPod) -> dict[str, str]:
        """Volume mount path → a per-pod local folder."""
        paths: dict[str, str] = {}
        for mount in container.get("volumeMounts", []):
            path = mount["mountPath"]
            if path == "/dev/shm":
                continue  # the host's /dev/shm is memory-backed already
            folder = self.work_dir / local.uid / mount["name"]
            folder.mkdir(parents=True, exist_ok=True)
            paths[path] = str(folder)
        return paths

    def service_account_kubeconfig(self, pod: dict, local: LocalPod) -> str:
        """A kubeconfig holding a token of the pod's ServiceAccount, bound to the pod.

        A kubelet mounts such a token at /var/run/secrets/kubernetes.io/serviceaccount;
        processes on one machine can't each have their own file there, so the
        same credentials reach the container through KUBECONFIG instead.
        """
        sa = pod["spec"].get("serviceAccountName") or "default"
        request = {"spec": {"expirationSeconds": 86400, "boundObjectRef": {
            "apiVersion": "v1", "kind": "Pod", "name": local.name, "uid": local.uid}}}
        token = self.core.create_namespaced_service_account_token(sa, local.namespace, request)
        cfg = client.Configuration.get_default_copy()
        kubeconfig = {
            "apiVersion": "v1", "kind": "Config", "current-context": "sa",
            "clusters": [{"name": "local", "cluster": {"server": cfg.host,
                                                       "certificate-authority": cfg.ssl_ca_cert}}],
            "users": [{"name": "sa", "user": {"token": token.status.token}}],
            "contexts": [{"name": "sa", "context": {"cluster": "local", "user": "sa",
                                                    "namespace": local.namespace}}],
        }
        path = self.work_dir / local.uid / "kubeconfig"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(kubeconfig))
        path.chmod(0o600)
        return str(path)

    # --- pod lifecycle -------------------------------------------------------------

    def start_container(self, pod: dict, local: LocalPod) -> None:
        container = pod["spec"]["containers"][0]
        env = self.pod_env(pod, container, local)
        paths = self.local_paths(container, local)
        for key, value in list(env.items()):
            for mount, folder in paths.items():
                if value == mount or value.startswith(mount.rstrip("/") + "/"):
                    env[key] = folder + value[len(mount):]
        if pod["spec"].get("automountServiceAccountToken", True):
            env["KUBECONFIG"] = self.service_account_kubeconfig(pod, local)
        if "HF_HOME" in env:
            # The model cache is the node's shared one, like a node-local cache
            # volume: models prepared there (the embedded one) load offline.
            env["HF_HOME"] = str(self.hf_home)
        # The pod's own address: in a real pod 0.0.0.0 is the pod's network
        # namespace; here every pod shares the host's, so bind its loopback IP.
        env["HOST"] = local.ip
        argv = container_argv(container, self.entrypoints, env)
        proc_env = {"PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", "/root"),
                    **self.extra_env, **env}
        log_path = self.work_dir / local.uid / "container.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        out = open(log_path, "ab")
        local.process = subprocess.Popen(argv, env=proc_env, stdout=out, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True,
                                         cwd=str(log_path.parent), preexec_fn=die_with_starter)
        out.close()
        local.started_at = _now()
        log.info("started %s/%s as pid %d on %s: %s (log %s)", local.namespace, local.name,
                 local.process.pid, local.ip, shlex.join(argv), log_path)

    def probe_ready(self, pod: dict, local: LocalPod) -> bool:
        container = pod["spec"]["containers"][0]
        probe = container.get("readinessProbe", {}).get("httpGet")
        if not local.running:
            return False
        if not probe:
            return True
        port = probe["port"]
        if isinstance(port, str):
            port = next(p["containerPort"] for p in container.get("ports", []) if p.get("name") == port)
        try:
            with urllib.request.urlopen(f"http://{local.ip}:{port}{probe.get('path', '/')}", timeout=2) as r:
                return 200 <= r.status < 400
        except Exception:  # noqa: BLE001 - any failure is "not ready"
            return False

    def desired_status(self, pod: dict, local: LocalPod) -> dict:
        """The pod status the runner observes now."""
        running = local.running
        container = pod["spec"]["containers"][0]
        state = ({"running": {"startedAt": local.started_at}} if running else
                 {"waiting": {"reason": "CrashLoopBackOff" if local.restarts else "ContainerCreating"}})
        ready = "True" if local.ready else "False"
        return {
            "phase": "Running" if running else "Pending",
            "hostIP": "127.0.0.1",
            "podIP": local.ip,
            "podIPs": [{"ip": local.ip}],
            "startTime": (pod.get("status") or {}).get("startTime") or _now(),
            "conditions": [
                {"type": "PodScheduled", "status": "True"},
                {"type": "Initialized", "status": "True"},
                {"type": "ContainersReady", "status": ready},
                {"type": "Ready", "status": ready},
            ],
            "containerStatuses": [{
                "name": container["name"], "image": container["image"], "imageID": "",
                "ready": local.ready, "started": running, "restartCount": local.restarts,
                "state": state,
            }],
        }

    def report(self, pod: dict, local: LocalPod) -> None:
        """Patch the pod's status when the API server's copy (``pod``, as just
        listed) differs from what the runner observes. Comparing with the API
        server rather than with the runner's own last write puts right a
        status someone else changed meanwhile."""
        current = pod.get("status") or {}
        desired = self.desired_status(pod, local)
        if not status_differs(desired, current):
            return
        desired = with_transition_times(desired, current, _now())
        self.core.patch_namespaced_pod_status(local.name, local.namespace, {"status": desired})

    def begin_stop(self, local: LocalPod, grace: float) -> None:
        """SIGTERM the pod's process group at once (preStop hooks are not run)
        and note when SIGKILL is due; doesn't wait, so the sync loop goes on."""
        if local.kill_at is not None:
            return
        local.kill_at = self.clock() + grace
        if local.running:
            try:
                os.killpg(local.process.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    def finish_stop(self, local: LocalPod) -> bool:
        """Whether the stopping pod's process is gone; SIGKILLs it once its grace is over."""
        if not local.running:
            return True
        if self.clock() < (local.kill_at or 0):
            return False
        try:
            os.killpg(local.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        local.process.wait()
        return True

    def stop_all(self, grace: float) -> None:
        """Stop every pod's process at once, waiting at most ``grace`` (plus SIGKILL) overall."""
        stopping = list(self.pods.values()) + list(self.orphans.values())
        for local in stopping:
            self.begin_stop(local, grace)
        while not all([self.finish_stop(local) for local in stopping]):
            time.sleep(0.1)

    def sync_once(self) -> None:
        pods = self.core.list_pod_for_all_namespaces(field_selector=f"spec.nodeName={NODE_NAME}")
        seen = set()
        for obj in pods.items:
            pod = client.ApiClient().sanitize_for_serialization(obj)
            uid = pod["metadata"]["uid"]
            seen.add(uid)
            local = self.pods.get(uid)
            if local is None:
                local = self.pods[uid] = LocalPod(uid, pod["metadata"]["namespace"],
                                                  pod["metadata"]["name"], next(self._ips))
            if pod["metadata"].get("deletionTimestamp"):
                self._sync_deleting(pod, local)
                continue
            if not local.running:
                if local.process is not None:
                    local.restarts += 1
                    local.process = None
                    local.next_start = self.clock() + min(5 * local.restarts, 60)
                    log.warning("%s/%s exited; restarting (restart %d)", local.namespace, local.name,
                                local.restarts)
                if self.clock() >= local.next_start:
                    try:
                        self.start_container(pod, local)
                    except Exception as exc:  # noqa: BLE001 - reported, retried with backoff
                        log.error("cannot start %s/%s: %s", local.namespace, local.name, exc)
                        local.restarts += 1
                        local.next_start = self.clock() + min(5 * local.restarts, 60)
            local.ready = self.probe_ready(pod, local)
            self.report(pod, local)
        for uid in set(self.pods) - seen:
            # Gone from the API server without passing through deletion here
            # (force-deleted): stop its process all the same.
            local = self.orphans[uid] = self.pods.pop(uid)
            log.info("pod %s/%s is gone; stopping its process", local.namespace, local.name)
            self.begin_stop(local, 10)
        for uid, local in list(self.orphans.items()):
            if self.finish_stop(local):
                del self.orphans[uid]

    def _sync_deleting(self, pod: dict, local: LocalPod) -> None:
        """One step of a pod's deletion: SIGTERM first, then on later syncs
        remove the pod once its process has gone (SIGKILL after the grace)."""
        if local.kill_at is None:
            grace = pod["spec"].get("terminationGracePeriodSeconds", 30)
            log.info("stopping %s/%s (grace %ss)", local.namespace, local.name, grace)
            self.begin_stop(local, grace)
        if not self.finish_stop(local):
            return
        try:
            self.core.delete_namespaced_pod(local.name, local.namespace, grace_period_seconds=0)
        except ApiException as exc:
            if exc.status != 404:
                raise
        self.pods.pop(local.uid, None)

    def run(self) -> None:
        self.register()
        last_beat = time.monotonic()
        while not self._stop.is_set():
            try:
                self.sync_once()
                if time.monotonic() - last_beat > 10:
                    self.heartbeat()
                    last_beat = time.monotonic()
            except Exception as exc:  # noqa: BLE001 - the API server may be briefly away
                log.warning("sync failed: %s", exc)
            self._stop.wait(1.0)
        self.stop_all(15)

    def stop(self) -> None:
        self._stop.set()


def parse_entrypoints(items: list[str]) -> dict[str, list[str]]:
    out = {}
    for item in items:
        image, _, command = item.partition("=")
        if not command:
            raise SystemExit(f"--entrypoint must be IMAGE=COMMAND, got {item!r}")
        out[image_repository(image)] = shlex.split(command)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kubeconfig", required=True)
    parser.add_argument("--entrypoint", action="append", default=[],
                        help="IMAGE=COMMAND: what a container of that image runs without a command")
    parser.add_argument("--work-dir", type=Path, required=True)
    parser.add_argument("--hf-home", type=Path, required=True)
    parser.add_argument("--env", action="append", default=[],
                        help="NAME=VALUE added to every container (host-specific settings)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s localnode %(message)s")
    config.load_kube_config(args.kubeconfig)
    extra_env = dict(e.split("=", 1) for e in args.env)
    node = LocalNode(parse_entrypoints(args.entrypoint), args.work_dir, args.hf_home, extra_env)
    signal.signal(signal.SIGTERM, lambda *_: node.stop())
    signal.signal(signal.SIGINT, lambda *_: node.stop())
    node.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
