"""`make dev`: the whole system on one machine, on the embedded model.

1. starts the local control plane (hack/localcluster.py) with its kwok GPU nodes;
2. starts the local node (hack/localnode.py), which runs pods bound to it as
   local processes, and the local ingress (hack/localingress.py) on a loopback
   port;
3. installs the chart with `helm install` (CRD and operator; the operator's pod
   lands on the local node, so the operator runs with its ServiceAccount's
   token, as in a cluster);
4. applies samples/smollm2-cpu-local.yaml and waits for it to be Ready;
5. prints the OpenAI base URL and a snippet, then stays up until Ctrl-C or
   `make dev-down`, and stops every process it started.

The same steps, as functions, serve the end-to-end tests (tests/e2e).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import localcluster
from localcluster import ControlPlane, stop_pids

REPO = localcluster.REPO_DIR
VENV_BIN = Path(sys.executable).parent
CHART = REPO / "charts" / "modelendpoint-operator"
SAMPLE = REPO / "samples" / "smollm2-cpu-local.yaml"
SAMPLE_NAMESPACE = "default"
RELEASE = "modelendpoint-operator"
OPERATOR_NAMESPACE = "modelendpoint-system"
OPERATOR_IMAGE = "ghcr.io/modelendpoint/modelendpoint-operator"
RUNTIME_IMAGE = "ghcr.io/modelendpoint/modelendpoint-runtime"


def step(message: str) -> None:
    print(f"==> {message}", file=sys.stderr, flush=True)


@dataclass
class LocalStack:
    """The local node and ingress processes beside a control plane."""

    cp: ControlPlane
    work_dir: Path
    ingress_port: int
    pids: dict[str, int] = field(default_factory=dict)

    @property
    def ingress_url(self) -> str:
        return f"http://127.0.0.1:{self.ingress_port}"

    def stop(self) -> None:
        stop_pids(list(self.pids.values()), timeout=60)
        self.pids.clear()


def start_local_stack(cp: ControlPlane, work_dir: Path, hf_home: Path,
                      ingress_port: int | None = None) -> LocalStack:
    """Start the local node and the local ingress against ``cp``."""
    work_dir.mkdir(parents=True, exist_ok=True)
    stack = LocalStack(cp, work_dir, ingress_port or localcluster.free_port())
    py = str(VENV_BIN / "python")
    node_argv = [
        py, str(REPO / "hack" / "localnode.py"),
        f"--kubeconfig={cp.kubeconfig}",
        f"--work-dir={work_dir / 'pods'}",
        f"--hf-home={hf_home}",
        f"--entrypoint={OPERATOR_IMAGE}={VENV_BIN / 'modelendpoint-operator'}",
        f"--entrypoint={RUNTIME_IMAGE}={VENV_BIN / 'modelendpoint-runtime'}",
        # The CPU engine's KV cache comes out of RAM: keep it small on a laptop.
        "--env=VLLM_CPU_KVCACHE_SPACE=1",
        # This machine reaches no model hub: models load from the node's cache.
        "--env=HF_HUB_OFFLINE=1",
    ]
    ingress_argv = [py, str(REPO / "hack" / "localingress.py"), f"--kubeconfig={cp.kubeconfig}",
                    f"--port={stack.ingress_port}"]
    for name, argv in (("localnode", node_argv), ("localingress", ingress_argv)):
        log = open(work_dir / f"{name}.log", "ab")
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, cwd=str(REPO),
                                preexec_fn=localcluster.die_with_starter)
        log.close()
        stack.pids[name] = proc.pid
    return stack


def helm_install(cp: ControlPlane, *extra: str) -> None:
    health_port, metrics_port = localcluster.free_ports(2)
    subprocess.run(
        [str(cp.bin_dir / "helm"), "upgrade", "--install", RELEASE, str(CHART),
         "--namespace", OPERATOR_NAMESPACE, "--create-namespace", "--wait", "--timeout", "5m",
         "--set-json", 'nodeSelector={"modelendpoint.dev/local-runner":"true"}',
         # The operator's pod runs on the host's network here: free ports for
         # its health and metrics listeners, so nothing else on the machine clashes.
         "--set", f"healthPort={health_port}",
         "--set", f"metrics.port={metrics_port}",
         *extra],
        check=True, env=cp.env(), stdout=sys.stderr,
    )


def wait_ready(cp: ControlPlane, name: str, namespace: str, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        obj = json.loads(cp.kubectl("get", "modelendpoint", name, "-n", namespace, "-o", "json"))
        status = obj.get("status", {})
        summary = f"phase={status.get('phase')} ready={status.get('readyReplicas')}/{status.get('replicas')}"
        if summary != last:
            step(f"{namespace}/{name}: {summary}")
            last = summary
        if status.get("phase") == "Ready":
            return obj
        time.sleep(2)
    raise TimeoutError(f"{namespace}/{name} was not Ready after {timeout:.0f}s ({last})")


def snippet(base_url: str, model: str) -> str:
    return (
        "from openai import OpenAI\n"
        f'client = OpenAI(base_url="{base_url}", api_key="unused")\n'
        f'r = client.chat.completions.create(model="{model}", '
        'messages=[{"role": "user", "content": "Hello, who are you?"}])\n'
        "print(r.choices[0].message.content)"
    )


def _state_dir() -> Path:
    return localcluster.default_cache_dir() / "dev"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--down", action="store_true", help="stop a running `make dev`")
    parser.add_argument("--ingress-port", type=int, default=int(os.environ.get("MEP_DEV_PORT", "8080")))
    args = parser.parse_args(argv)
    state = _state_dir()
    pidfile = state / "dev.pid"
    if args.down:
        if not pidfile.exists():
            print("no `make dev` is running", file=sys.stderr)
            return 0
        os.kill(int(pidfile.read_text()), signal.SIGTERM)
        print("asked `make dev` to stop", file=sys.stderr)
        return 0

    import embedded_model

    shutil.rmtree(state, ignore_errors=True)
    state.mkdir(parents=True)
    pidfile.write_text(str(os.getpid()))
    stopping = False

    def on_signal(*_: object) -> None:
        nonlocal stopping
        stopping = True
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    cp = stack = None
    try:
        step("starting the local control plane (etcd, kube-apiserver, controller-manager, scheduler, kwok)")
        cp = localcluster.start(state / "cluster")
        step("starting the local node and the local ingress")
        stack = start_local_stack(cp, state, embedded_model.hf_home(), args.ingress_port)
        step("installing the chart (CRD and operator) with helm")
        helm_install(cp)
        step(f"applying {SAMPLE.relative_to(REPO)}")
        ns = SAMPLE_NAMESPACE
        cp.kubectl("apply", "--server-side", "-n", ns, "-f", str(SAMPLE))
        name = json.loads(cp.kubectl("get", "-n", ns, "-f", str(SAMPLE), "-o", "json"))["metadata"]["name"]
        step("waiting for the model to load (about 1-2 minutes on 2 cores)")
        obj = wait_ready(cp, name, ns, timeout=900)
        model = obj["status"]["servedModelName"]
        base_url = f"{stack.ingress_url}/v2/{name}/openai/v1"
        print(f"\nIn-cluster URL (status.url): {obj['status'].get('url')}")
        print(f"export KUBECONFIG={cp.kubeconfig}")
        print(f"export PATH={cp.bin_dir}:$PATH\n")
        print(snippet(base_url, model) + "\n")
        print(f"OpenAI base URL: {base_url}", flush=True)
        step("up; Ctrl-C or `make dev-down` stops everything")
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        step("stopping")
    finally:
        if stack:
            stack.stop()
        if cp:
            cp.stop()
        pidfile.unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
