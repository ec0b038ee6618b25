"""The test bed is made of real parts: a real control plane and the real vLLM engine."""

from __future__ import annotations

import json

import pytest

from waiting import wait_for

GPU_POD_IMAGE = "registry.example/idle:1"  # never pulled: kwok plays the kubelet


def _deployment(name: str, gpus: int) -> dict:
    labels = {"app": name}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "containers": [
                        {
                            "name": "main",
                            "image": GPU_POD_IMAGE,
                            "resources": {"limits": {"nvidia.com/gpu": str(gpus)}},
                        }
                    ]
                },
            },
        },
    }


def test_server_is_the_pinned_kubernetes_release(control_plane):
    version = json.loads(control_plane.kubectl("version", "-o", "json"))
    assert version["serverVersion"]["gitVersion"] == "v1.37.2"
    assert version["clientVersion"]["gitVersion"] == "v1.37.2"
    nodes = json.loads(control_plane.kubectl("get", "nodes", "-o", "json"))["items"]
    gpu_nodes = [n for n in nodes if "nvidia.com/gpu" in n["status"]["allocatable"]]
    gpus = {n["metadata"]["name"]: n["status"]["allocatable"]["nvidia.com/gpu"] for n in gpu_nodes}
    assert gpus == {"kwok-gpu-0": "4", "kwok-gpu-1": "8"}
    # Tainted as GPU node pools are: only pods that tolerate it (GPU pods) land there.
    for node in gpu_nodes:
        assert node["spec"]["taints"] == [{"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}]


def test_gpu_deployment_becomes_available_on_a_kwok_node(control_plane):
    control_plane.kubectl("apply", "-f", "-", input=json.dumps(_deployment("gpu-fits", 2)))
    control_plane.kubectl(
        "wait", "deployment/gpu-fits", "--for=condition=Available", "--timeout=120s"
    )
    pods = json.loads(control_plane.kubectl("get", "pods", "-l", "app=gpu-fits", "-o", "json"))
    [pod] = pods["items"]
    assert pod["spec"]["nodeName"] in {"kwok-gpu-0", "kwok-gpu-1"}
    assert pod["status"]["phase"] == "Running"
    control_plane.kubectl("delete", "deployment/gpu-fits", "--wait=true")


def test_pod_asking_for_more_gpus_than_any_node_stays_pending(control_plane):
    control_plane.kubectl("apply", "-f", "-", input=json.dumps(_deployment("gpu-too-many", 16)))

    def scheduler_event() -> str | None:
        events = json.loads(
            control_plane.kubectl(
                "get", "events", "--field-selector", "reason=FailedScheduling", "-o", "json"
            )
        )["items"]
        for e in events:
            if e["involvedObject"]["name"].startswith("gpu-too-many-"):
                return e["message"]
        return None

    message = wait_for(scheduler_event, timeout=60, what="a FailedScheduling event")
    assert "Insufficient nvidia.com/gpu" in message
    pods = json.loads(
        control_plane.kubectl("get", "pods", "-l", "app=gpu-too-many", "-o", "json")
    )["items"]
    assert [p["status"]["phase"] for p in pods] == ["Pending"]
    assert not pods[0]["spec"].get("nodeName")
    control_plane.kubectl("delete", "deployment/gpu-too-many", "--wait=true")


@pytest.mark.timeout(600)
def test_embedded_model_answers_through_the_official_sdk(runtime_server, openai_client):
    response = openai_client.chat.completions.create(
        model=runtime_server.model,
        messages=[
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "Hello, who are you?"},
        ],
        temperature=0,
        max_tokens=24,
    )
    text = response.choices[0].message.content
    assert response.usage.completion_tokens > 0
    # A real model answers in English words; a stub or broken weights would not.
    words = [w.strip(",.!?").lower() for w in text.split()]
    assert len([w for w in words if w.isalpha()]) >= 3, text
    assert {"i", "i'm", "am", "assistant", "help", "hello", "ai"} & set(words), text
