"""The runtime image, built from Dockerfile.runtime, run by the real node with the pod
spec the operator writes, on the embedded model.

The Deployment and Service are the operator's own manifests
(``modelendpoint_operator.manifests``) for the local sample, with the model cache
on a pre-provisioned volume holding the embedded model (hack/node/models.py) and
this machine's two settings (no model hub, a small CPU KV cache) in ``spec.env``.
No operator runs here: what is checked is that the pod spec works in a real
container (non-root uid 10001, capabilities dropped, seccomp, no service-account
token, the shm volume, the probes, preStop and the grace period).
"""

from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

import embedded_model
import localcluster
from images import build as images
from modelendpoint_operator import manifests
from modelendpoint_operator.settings import OperatorSettings
from modelendpoint_operator.spec import Endpoint
from node import config, models, run
from waiting import wait_for

pytestmark = pytest.mark.timeout(2400)

REPO = Path(__file__).resolve().parents[2]
NAME = "smollm2"


def _endpoint(cache_dir: Path) -> Endpoint:
    mep = yaml.safe_load((REPO / "samples" / "smollm2-cpu-local.yaml").read_text())
    mep["metadata"].update({"namespace": "default", "uid": "00000000-0000-0000-0000-000000000015"})
    mep["spec"]["modelCache"] = {"claimName": models.CLAIM_NAME}
    mep["spec"]["env"] = [
        {"name": "HF_HUB_OFFLINE", "value": "1"},
        {"name": "VLLM_CPU_KVCACHE_SPACE", "value": "1"},
        # vLLM's and inductor's compile caches on the (persistent) model volume: a pod
        # that starts again, or the next run, skips minutes of C++ compilation.
        {"name": "VLLM_CACHE_ROOT", "value": "/var/cache/huggingface/vllm"},
        {"name": "TORCHINDUCTOR_CACHE_DIR", "value": "/var/cache/huggingface/torchinductor"},
    ]
    return Endpoint.from_body(mep)


@pytest.fixture(scope="module")
def runtime_pod(testbed_bin: Path, embedded_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    state = tmp_path_factory.mktemp("realnode-runtime")
    run.host_setup()
    cp = localcluster.start(state / "cluster", testbed_bin, node_ip=config.NODE_IP)
    node = None
    try:
        node = run.start(cp, state / "node", setup=False)
        started = time.monotonic()
        names = images.ensure_project_images(node)
        print(f"images ready in {time.monotonic() - started:.0f}s: {names}")
        cache = models.prepare(embedded_model.hf_home(), localcluster.default_cache_dir() / "node" / "model-cache")
        for obj in models.volume_manifests(cache, "default"):
            cp.kubectl("apply", "-f", "-", input=json.dumps(obj))
        ep = _endpoint(cache)
        settings = OperatorSettings()
        deployment = manifests.deployment(ep, settings)
        service = manifests.service(ep, settings)
        applied = time.monotonic()
        for obj in (service, deployment):
            obj["metadata"].pop("ownerReferences", None)  # no ModelEndpoint object here
            cp.kubectl("apply", "-f", "-", input=json.dumps(obj))
        yield cp, node, deployment, applied
    finally:
        if node:
            node.stop()
        cp.stop()


def _pod(cp) -> dict:
    [pod] = json.loads(cp.kubectl("get", "pods", "-l", f"app.kubernetes.io/instance={NAME}",
                                  "-o", "json"))["items"]
    return pod


def _base_url(cp) -> str:
    svc = json.loads(cp.kubectl("get", "service", NAME, "-o", "json"))["spec"]
    return f"http://{svc['clusterIP']}:{svc['ports'][0]['port']}/v2/{NAME}/openai/v1"


def _post(url: str, body: dict, timeout: float = 120) -> bytes:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return r.read()


def test_operator_pod_spec_serves_the_embedded_model_and_drains_on_delete(runtime_pod):
    cp, node, deployment, applied = runtime_pod

    def ready():
        pod = _pod(cp)
        statuses = pod["status"].get("containerStatuses") or []
        assert not any(cs["restartCount"] for cs in statuses), f"the runtime restarted: {statuses}"
        return statuses and statuses[0]["ready"]

    # Cold, the CPU engine compiles its kernels for minutes on 2 busy cores (320 s seen).
    wait_for(ready, timeout=1200, interval=5, what="the runtime pod to be Ready")
    print(f"runtime pod Ready {time.monotonic() - applied:.0f}s after the Deployment was applied")
    pod = _pod(cp)
    assert pod["spec"]["nodeName"] == config.NODE_NAME
    name = pod["metadata"]["name"]

    base = _base_url(cp)
    models_list = json.loads(urllib.request.urlopen(f"{base}/models", timeout=30).read())
    assert [m["id"] for m in models_list["data"]] == ["SmolLM2-135M-Instruct"]
    answer = json.loads(_post(f"{base}/chat/completions", {
        "model": "SmolLM2-135M-Instruct", "max_tokens": 8,
        "messages": [{"role": "user", "content": "Say hello"}]}))
    assert answer["choices"][0]["message"]["content"]

    # The security context holds in the real container.
    assert cp.kubectl("exec", name, "--", "id", "-u").strip() == "10001"
    probe = cp.kubectl("exec", name, "--", "sh", "-c",
                       "ls /var/run/secrets/kubernetes.io 2>&1; touch /usr/x 2>&1; "
                       "grep -E '^(CapEff|NoNewPrivs|Seccomp):' /proc/1/status; "
                       "stat -f -c %T /dev/shm; touch /var/cache/huggingface/.w && echo cache-writable; "
                       "touch /tmp/.w $HOME/.w && echo scratch-writable")
    assert "No such file or directory" in probe  # no service-account token
    assert "Read-only file system" in probe  # the root filesystem is read-only: only the volumes are writable
    assert "scratch-writable" in probe  # /tmp and the home are emptyDirs
    assert "CapEff:\t0000000000000000" in probe and "NoNewPrivs:\t1" in probe and "Seccomp:\t2" in probe
    assert "tmpfs" in probe and "cache-writable" in probe

    # Delete while a long stream is in flight: preStop, SIGTERM, the drain: the stream ends
    # normally, and the pod is gone within its grace period.
    grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    req = urllib.request.Request(f"{base}/completions", data=json.dumps({
        "model": "SmolLM2-135M-Instruct", "prompt": "Once upon a time", "max_tokens": 300, "min_tokens": 300,
        "stream": True}).encode(), headers={"content-type": "application/json"})
    stream = urllib.request.urlopen(req, timeout=120)
    first = stream.readline()
    assert first.startswith(b"data: ")
    cp.kubectl("delete", "deployment", NAME, "--wait=false")
    deleted = time.monotonic()
    rest = stream.read().decode()
    chunks = [json.loads(line[6:]) for line in rest.splitlines() if line.startswith("data: {")]
    assert rest.rstrip().endswith("data: [DONE]"), rest[-500:]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    wait_for(lambda: not json.loads(cp.kubectl("get", "pods", "-l", f"app.kubernetes.io/instance={NAME}",
                                               "-o", "json"))["items"],
             timeout=grace + 30, what="the runtime pod to be gone")
    assert time.monotonic() - deleted <= grace + 5
    assert node.crictl("ps", "-q", "--name", "runtime").strip() == ""
