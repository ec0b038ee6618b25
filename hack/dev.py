"""`make dev`: the whole system on one machine, on the embedded model.

1. starts the local control plane (hack/localcluster.py) with its kwok GPU nodes,
   and the real node (hack/node: containerd, runc, CNI, kubelet, kube-proxy) with the
   operator and runtime images built from the repository's Dockerfiles and loaded
   into its containerd, and the embedded model's cache volume (hack/node/stack.py);
2. starts the local ingress (hack/localingress.py) on a loopback port;
3. installs the chart (CRD, operator, gateway) with `helm upgrade --install`, which
   is `helm install` on a fresh control plane (the operator's pod runs in a real
   container on the node, with its ServiceAccount's token, as in a cluster);
4. applies samples/smollm2-cpu-local.yaml and waits for it to be Ready, with a
   progress line every 15 s;
5. prints the OpenAI base URL and a snippet, then stays up until Ctrl-C or
   `make dev-down`, and stops every process it started.

Only one `make dev` runs at a time: its PID is in ``<cache>/dev/dev.pid``, and
a second one refuses to start rather than wipe the first one's state. `make
dev-down` signals that PID only after checking, by its command line, that it is
still a `make dev` (a stale file may name a reused PID).

The same steps, as functions, serve the end-to-end tests (tests/e2e).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import localcluster
from localcluster import ControlPlane, stop_pids
from node import stack as node_stack

REPO = localcluster.REPO_DIR
VENV_BIN = Path(sys.executable).parent
CHART = REPO / "charts" / "modelendpoint-operator"
SAMPLE = REPO / "samples" / "smollm2-cpu-local.yaml"
SAMPLE_NAMESPACE = "default"
INGRESS_HOST = "127.0.0.1"
PROGRESS_INTERVAL = 15.0
RELEASE = "modelendpoint-operator"
OPERATOR_NAMESPACE = "modelendpoint-system"


def step(message: str) -> None:
    print(f"==> {message}", file=sys.stderr, flush=True)


@dataclass
class LocalStack:
    """The control plane and the real node (``node.stack``), and the local ingress beside them."""

    nodes: node_stack.Stack
    work_dir: Path
    ingress_port: int
    pids: dict[str, int] = field(default_factory=dict)

    @property
    def cp(self) -> ControlPlane:
        return self.nodes.cp

    @property
    def ingress_url(self) -> str:
        return f"http://127.0.0.1:{self.ingress_port}"

    def check_alive(self) -> None:
        """Raise, with the tail of its log, if the node or the local ingress has exited."""
        self.nodes.check_alive()
        for name, pid in self.pids.items():
            if not localcluster._alive(pid):
                tail = localcluster._tail(self.work_dir / f"{name}.log")
                raise RuntimeError(f"{name} exited; the end of {self.work_dir / name}.log:\n{tail}")

    def wait_listening(self, timeout: float = 60.0) -> None:
        """Wait until the local ingress accepts connections, failing fast if a process dies."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check_alive()
            if port_accepts(INGRESS_HOST, self.ingress_port):
                return
            time.sleep(0.2)
        raise TimeoutError(f"the local ingress did not listen on {self.ingress_url} within {timeout:.0f}s")

    def stop(self) -> None:
        try:
            stop_pids(list(self.pids.values()), timeout=60)
            self.pids.clear()
        finally:
            self.nodes.stop()


def port_is_free(host: str, port: int) -> bool:
    """Whether a server could listen on ``host:port`` now.

    Binds as aiohttp's server does (``SO_REUSEADDR``), so a port that only has
    connections in TIME_WAIT counts as free and one with a listener does not.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
        return True


def port_accepts(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(1)
        return s.connect_ex((host, port)) == 0


def port_busy_message(host: str, port: int) -> str:
    return (f"port {port} on {host} is in use, so the local ingress cannot listen there; "
            f"choose another with `MEP_DEV_PORT=<port> make dev`")


# --- the pidfile of a running `make dev` ----------------------------------------


def is_dev_cmdline(argv: list[str]) -> bool:
    """Whether a process's argv is a running `make dev` (not `make dev-down`)."""
    return any(Path(a).name == "dev.py" for a in argv) and "--down" not in argv


def read_cmdline(pid: int) -> list[str] | None:
    """The argv of ``pid`` from /proc, or None when there is no such process."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def running_dev_pid(pidfile: Path, cmdline=read_cmdline) -> int | None:
    """The PID in ``pidfile`` if it is a live `make dev`; None for no file, a
    garbled one, a dead PID, or a PID reused by another program."""
    try:
        pid = int(pidfile.read_text().strip())
    except (FileNotFoundError, ValueError):
        return None
    if pid <= 0:
        return None
    argv = cmdline(pid)
    return pid if argv and is_dev_cmdline(argv) else None


def stop_running_dev(pidfile: Path, cmdline=read_cmdline, kill=os.kill) -> str:
    """`make dev-down`: SIGTERM the running `make dev`, if any; returns what was done."""
    pid = running_dev_pid(pidfile, cmdline)
    if pid is None:
        if pidfile.exists():
            pidfile.unlink(missing_ok=True)
            return "no `make dev` is running (removed a stale pidfile)"
        return "no `make dev` is running"
    try:
        kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        pidfile.unlink(missing_ok=True)
        return "no `make dev` is running (it has just exited)"
    return f"asked `make dev` (pid {pid}) to stop"


def start_local_stack(state_dir: Path, hf_home: Path, ingress_port: int | None = None,
                      namespace: str = SAMPLE_NAMESPACE, bin_dir: Path | None = None) -> LocalStack:
    """The control plane, the real node with the project's images and the embedded model's
    volume (in ``namespace``), then the local ingress."""
    state_dir.mkdir(parents=True, exist_ok=True)
    nodes = node_stack.start(state_dir, hf_home=hf_home, bin_dir=bin_dir, model_namespace=namespace, step=step)
    stack = LocalStack(nodes, state_dir, ingress_port or localcluster.free_port())
    try:
        argv = [str(VENV_BIN / "python"), str(REPO / "hack" / "localingress.py"), f"--kubeconfig={nodes.cp.kubeconfig}",
                f"--port={stack.ingress_port}"]
        with open(state_dir / "localingress.log", "ab") as log:
            proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True, cwd=str(REPO), preexec_fn=localcluster.die_with_starter)
        stack.pids["localingress"] = proc.pid
    except BaseException:
        stack.stop()
        raise
    return stack


def helm_install(cp: ControlPlane, *extra: str, check_alive=lambda: None) -> None:
    """`helm upgrade --install` of the chart with its default values (the images are the
    ones the node has loaded under the chart's names), waiting for the operator's pod.

    ``check_alive`` is called while helm waits: the operator's pod only starts
    if the node runs, so a dead node ends the wait at once rather than after
    helm's 5 minute timeout.
    """
    argv = [str(cp.bin_dir / "helm"), "upgrade", "--install", RELEASE, str(CHART),
            "--namespace", OPERATOR_NAMESPACE, "--create-namespace", "--wait", "--timeout", "5m",
            # The gateway behind the local ingress: one base URL for every model.
            "--set", "gateway.ingress.enabled=true", *extra]
    helm = subprocess.Popen(argv, env=cp.env(), stdout=sys.stderr)
    try:
        while helm.poll() is None:
            check_alive()
            time.sleep(0.5)
    finally:
        if helm.poll() is None:
            helm.kill()
            helm.wait()
    if helm.returncode:
        raise subprocess.CalledProcessError(helm.returncode, argv)


def pods_summary(pods: list[dict]) -> str:
    """One short phrase per pod: ``name Running/ready`` or the reason it waits."""
    if not pods:
        return "no pods yet"
    parts = []
    for pod in pods:
        status = pod.get("status", {})
        phrase = status.get("phase", "Pending")
        for cs in status.get("containerStatuses", []):
            waiting = cs.get("state", {}).get("waiting")
            if waiting and waiting.get("reason"):
                phrase = waiting["reason"]
            phrase += ", ready" if cs.get("ready") else ", not ready"
            if cs.get("restartCount"):
                phrase += f", {cs['restartCount']} restarts"
        if pod.get("metadata", {}).get("deletionTimestamp"):
            phrase = "Terminating"
        parts.append(f"{pod['metadata']['name']} {phrase}")
    return "; ".join(parts)


def progress_line(name: str, namespace: str, mep: dict, pods: list[dict], elapsed: float) -> str:
    status = mep.get("status", {})
    return (f"{namespace}/{name} after {elapsed:.0f}s: phase={status.get('phase')} "
            f"ready={status.get('readyReplicas') or 0}/{status.get('replicas', '?')}; "
            f"pods: {pods_summary(pods)}")


def wait_ready(cp: ControlPlane, name: str, namespace: str, timeout: float,
               check_alive=lambda: None, interval: float = PROGRESS_INTERVAL,
               clock=time.monotonic, sleep=time.sleep) -> dict:
    """Wait for phase Ready, printing a progress line at once, on every change
    of phase, and every ``interval`` seconds, so a 1-2 minute model load is not
    silence. ``check_alive`` raises if a process the model needs has died."""
    start = clock()
    deadline = start + timeout
    last_summary, last_print = None, float("-inf")
    line = ""
    while clock() < deadline:
        check_alive()
        obj = json.loads(cp.kubectl("get", "modelendpoint", name, "-n", namespace, "-o", "json"))
        status = obj.get("status", {})
        if status.get("phase") == "Ready":
            return obj
        summary = (status.get("phase"), status.get("readyReplicas"))
        if summary != last_summary or clock() - last_print >= interval:
            pods = json.loads(cp.kubectl("get", "pods", "-n", namespace, "-l",
                                         f"app.kubernetes.io/instance={name}", "-o", "json"))["items"]
            line = progress_line(name, namespace, obj, pods, clock() - start)
            step(line)
            last_summary, last_print = summary, clock()
        sleep(2)
    raise TimeoutError(f"{namespace}/{name} was not Ready after {timeout:.0f}s ({line})")


def snippet(base_url: str, model: str) -> str:
    return (
        "from openai import OpenAI\n"
        f'client = OpenAI(base_url="{base_url}", api_key="unused")\n'
        f'r = client.chat.completions.create(model="{model}", '
        'messages=[{"role": "user", "content": "Hello, who are you?"}])\n'
        "print(r.choices[0].message.content)"
    )


def gateway_url(stack: LocalStack) -> str:
    """The gateway's OpenAI base URL through the local ingress (every model, by name)."""
    return f"{stack.ingress_url}/openai/v1"


def _state_dir() -> Path:
    return localcluster.default_cache_dir() / "dev"


class StopOnSignal:
    """`make dev`'s SIGTERM (`make dev-down`) and SIGINT (Ctrl-C) handler.

    The first signal interrupts what runs (KeyboardInterrupt), and the clean-up
    starts. Later ones only get a word: interrupting the clean-up half-way
    (a second `make dev-down`, an impatient Ctrl-C) would leave processes behind.
    """

    def __init__(self) -> None:
        self.stopping = False

    def __call__(self, *_: object) -> None:
        if self.stopping:
            print("==> already stopping", file=sys.stderr, flush=True)
            return
        self.stopping = True
        raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--down", action="store_true", help="stop a running `make dev`")
    parser.add_argument("--ingress-port", type=int, default=int(os.environ.get("MEP_DEV_PORT", "8080")))
    args = parser.parse_args(argv)
    state = _state_dir()
    pidfile = state / "dev.pid"
    if args.down:
        print(stop_running_dev(pidfile), file=sys.stderr)
        return 0

    running = running_dev_pid(pidfile)
    if running is not None:
        # Starting over would delete the running one's control plane and pods.
        print(f"a `make dev` is already running (pid {running}) from {state}; "
              "`make dev-down` stops it", file=sys.stderr)
        return 1
    if not port_is_free(INGRESS_HOST, args.ingress_port):
        print(port_busy_message(INGRESS_HOST, args.ingress_port), file=sys.stderr)
        return 1

    import embedded_model

    shutil.rmtree(state, ignore_errors=True)
    state.mkdir(parents=True)
    pidfile.write_text(str(os.getpid()))
    on_signal = StopOnSignal()
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    stack = None
    try:
        stack = start_local_stack(state, embedded_model.hf_home(), args.ingress_port)
        cp = stack.cp
        step("starting the local ingress")
        stack.wait_listening()
        step("installing the chart (CRD, operator, gateway) with `helm upgrade --install`")
        helm_install(cp, check_alive=stack.check_alive)
        step(f"applying {SAMPLE.relative_to(REPO)}")
        ns = SAMPLE_NAMESPACE
        cp.kubectl("apply", "--server-side", "-n", ns, "-f", str(SAMPLE))
        name = json.loads(cp.kubectl("get", "-n", ns, "-f", str(SAMPLE), "-o", "json"))["metadata"]["name"]
        step("waiting for the model to load (about 1-2 minutes on 2 cores)")
        obj = wait_ready(cp, name, ns, timeout=900, check_alive=stack.check_alive)
        model = obj["status"]["servedModelName"]
        base_url = f"{stack.ingress_url}/v2/{name}/openai/v1"
        print(f"\nIn-cluster URL (status.url): {obj['status'].get('url')}")
        print(f"export KUBECONFIG={cp.kubeconfig}")
        print(f"export PATH={cp.bin_dir}:$PATH\n")
        print(snippet(gateway_url(stack), model) + "\n")
        print(f"OpenAI base URL: {base_url}")
        print(f"Gateway base URL: {gateway_url(stack)}", flush=True)
        step("up; Ctrl-C or `make dev-down` stops everything")
        while True:
            # Stay up while the stack does: a dead runner or ingress ends `make dev` loudly.
            stack.check_alive()
            time.sleep(5)
    except KeyboardInterrupt:
        step("stopping")
    except (RuntimeError, TimeoutError) as exc:
        # A process of the stack died or the model never came up: say which, then clean up.
        step(f"failed: {exc}")
        return 1
    finally:
        on_signal.stopping = True  # from here on, signals must not cut the clean-up short
        if stack:
            stack.stop()
        pidfile.unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
