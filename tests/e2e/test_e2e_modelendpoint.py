"""The whole system on one machine: ModelEndpoint → operator → pods → OpenAI SDK.

Applies the embedded-model sample on a control plane where the chart's
operator runs on the local node, then calls the model through the Ingress and
Service the operator created, with the official OpenAI Python SDK.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml
from openai import OpenAI

import dev
from processes import proc_stat, running
from waiting import wait_for

pytestmark = pytest.mark.timeout(1500)

ROLE = "model"  # a non-default responseRole, so the test sees it come through
RUNTIME_PORT = 8000  # the runtime container's port in the pods the operator writes


def _mep(cp, name, ns):
    return json.loads(cp.kubectl("get", "modelendpoint", name, "-n", ns, "-o", "json"))


def _runtime_pod_ips(cp, name, ns) -> set[str]:
    pods = json.loads(cp.kubectl("get", "pods", "-n", ns, "-o", "json"))["items"]
    return {
        p["status"]["podIP"]
        for p in pods
        if p["metadata"]["name"].startswith(name + "-") and p["status"].get("podIP")
    }


def _proc_entries():
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            yield int(entry.name), entry


def _runtime_pids(ips: set[str]) -> dict[str, int]:
    """Pod IP → PID of the runtime process the local node started for that pod.

    Found in /proc: a ``modelendpoint-runtime`` process whose environment binds
    ``HOST`` to the pod's IP and which leads its own process group (the local
    node starts each container in a new session; the engine's workers share
    the group but don't lead it).
    """
    found: dict[str, int] = {}
    for pid, entry in _proc_entries():
        try:
            cmdline = (entry / "cmdline").read_bytes()
            environ = (entry / "environ").read_bytes().split(b"\0")
            pgid = os.getpgid(pid)
        except (OSError, ProcessLookupError):
            continue
        if pid != pgid or b"modelendpoint-runtime" not in cmdline:
            continue
        for ip in ips:
            if f"HOST={ip}".encode() in environ:
                found[ip] = pid
    return found


def _live_members(pgids: set[int]) -> set[int]:
    """Processes, other than zombies, still in any of the process groups ``pgids``."""
    alive = set()
    for pid, _ in _proc_entries():
        stat = proc_stat(pid)
        if stat is not None and stat[2] in pgids and running(pid):
            alive.add(pid)
    return alive


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
    backends = set()

    def both_serve() -> bool:
        raw = client.chat.completions.with_raw_response.create(
            model=served, messages=[{"role": "user", "content": "Hi"}], max_tokens=2)
        assert raw.parse().choices[0].message.role == ROLE
        backends.add(raw.headers["x-local-ingress-backend"])
        return len(backends) == 2

    wait_for(both_serve, timeout=120, what="answers from both replicas")

    ips = _runtime_pod_ips(cp, name, ns)
    assert len(ips) == 2 and all(dev.port_accepts(ip, RUNTIME_PORT) for ip in ips)
    pids = _runtime_pids(ips)
    assert set(pids) == ips, f"runtime processes found by pod IP: {pids}"
    cp.kubectl("delete", f"modelendpoint/{name}", "-n", ns, "--wait=true")
    wait_for(lambda: not any(dev.port_accepts(ip, RUNTIME_PORT) for ip in ips), timeout=180,
             what="the runtime processes to stop listening", interval=1)
    # Gone by PID, the engine's worker processes in their groups included.
    wait_for(lambda: not _live_members(set(pids.values())), timeout=60,
             what=f"the runtime processes {sorted(pids.values())} and their children to exit", interval=1)
    wait_for(lambda: not _runtime_pod_ips(cp, name, ns), timeout=60, what="the pods to be gone")
