"""The whole system on one machine: ModelEndpoint → operator → pods → OpenAI SDK.

Applies the embedded-model sample on a control plane where the chart's operator
runs in a real container on the real node, then calls the model through the
Ingress and Service the operator created (kube-proxy balancing the Service's
cluster IP over the ready pods), with the official OpenAI Python SDK.
"""

from __future__ import annotations

import json
import urllib.request

import pytest
import yaml
from openai import OpenAI

import dev
from waiting import wait_for

pytestmark = pytest.mark.timeout(1500)

ROLE = "model"  # a non-default responseRole, so the test sees it come through
METRICS_PORT = 9400  # the runtime container's metrics port in the pods the operator writes


def _mep(cp, name, ns):
    return json.loads(cp.kubectl("get", "modelendpoint", name, "-n", ns, "-o", "json"))


def _runtime_pods(cp, name, ns) -> dict[str, str]:
    """Pod IP -> pod uid of the ModelEndpoint's runtime pods."""
    pods = json.loads(cp.kubectl("get", "pods", "-n", ns, "-l", f"serving.modelendpoint.dev/endpoint={name}",
                                 "-o", "json"))["items"]
    return {p["status"]["podIP"]: p["metadata"]["uid"] for p in pods if p["status"].get("podIP")}


def _requests_served(ip: str) -> float:
    """Chat completions a replica answered, from its own metrics port (no key needed)."""
    with urllib.request.urlopen(f"http://{ip}:{METRICS_PORT}/metrics", timeout=10) as r:
        text = r.read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("modelendpoint_requests_total{") and "chat/completions" in line
               and 'status="200"' in line)


def _containers_of(stack, pod_uids: set[str]) -> list[str]:
    """The node's running containers (crictl) that belong to one of these pods."""
    out = json.loads(stack.nodes.node.crictl("ps", "-o", "json"))
    return [c["id"] for c in out.get("containers", [])
            if c.get("labels", {}).get("io.kubernetes.pod.uid") in pod_uids]


def test_modelendpoint_serves_through_ingress_scales_and_goes_away(e2e_cluster):
    cp, stack = e2e_cluster
    sample = yaml.safe_load(dev.SAMPLE.read_text())
    sample["spec"]["responseRole"] = ROLE
    name, ns = sample["metadata"]["name"], dev.SAMPLE_NAMESPACE
    cp.kubectl("apply", "--server-side", "-n", ns, "-f", "-", input=json.dumps(sample))

    obj = wait_for(lambda: (m := _mep(cp, name, ns)).get("status", {}).get("phase") == "Ready" and m,
                   timeout=600, what=f"{ns}/{name} to be Ready", interval=2)
    status = obj["status"]
    assert status["url"].endswith("/openai/v1")
    assert status["readyReplicas"] == 1
    served = status["servedModelName"]
    assert served == sample["spec"].get("servedModelName", sample["spec"]["model"])

    client = OpenAI(base_url=f"{stack.ingress_url}/v2/{name}/openai/v1", api_key="unused", timeout=120)
    assert [m.id for m in client.models.list()] == [served]
    reply = client.chat.completions.create(
        model=served,
        messages=[{"role": "user", "content": "Hello, who are you?"}],
        max_tokens=16, temperature=0,
    )
    assert reply.choices[0].message.role == ROLE
    assert reply.choices[0].message.content.strip()
    chunks = list(client.chat.completions.create(
        model=served, messages=[{"role": "user", "content": "Count to five."}],
        max_tokens=16, temperature=0, stream=True,
    ))
    assert chunks[0].choices[0].delta.role == ROLE
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices).strip()

    cp.kubectl("scale", f"modelendpoint/{name}", "-n", ns, "--replicas=2")
    wait_for(lambda: _mep(cp, name, ns).get("status", {}).get("readyReplicas") == 2,
             timeout=600, what="two ready replicas", interval=2)
    pods = _runtime_pods(cp, name, ns)
    assert len(pods) == 2
    before = {ip: _requests_served(ip) for ip in pods}

    def both_serve() -> bool:
        reply = client.chat.completions.create(model=served, messages=[{"role": "user", "content": "Hi"}],
                                               max_tokens=2)
        assert reply.choices[0].message.role == ROLE
        return all(_requests_served(ip) > before[ip] for ip in pods)

    wait_for(both_serve, timeout=120, what="answers from both replicas (kube-proxy over the Service)")

    assert len(_containers_of(stack, set(pods.values()))) == 2
    cp.kubectl("delete", f"modelendpoint/{name}", "-n", ns, "--wait=true")
    # Their containers gone from the node (preStop, SIGTERM, the drain, within the grace period).
    wait_for(lambda: not _containers_of(stack, set(pods.values())), timeout=180,
             what="the runtime containers to stop", interval=1)
    wait_for(lambda: not _runtime_pods(cp, name, ns), timeout=60, what="the pods to be gone")
