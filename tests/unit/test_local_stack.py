"""Pure parts of the local stack: image entrypoints, $(VAR) expansion, ingress
routing, node capacity; and that its processes die with whoever started them."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest

import localingress
import localnode
from waiting import wait_for


@pytest.mark.parametrize(
    "image, repo",
    [
        ("ghcr.io/x/runtime:0.1.0", "ghcr.io/x/runtime"),
        ("ghcr.io/x/runtime", "ghcr.io/x/runtime"),
        ("localhost:5000/runtime:dev", "localhost:5000/runtime"),
        ("ghcr.io/x/runtime@sha256:abc", "ghcr.io/x/runtime"),
    ],
)
def test_image_repository(image, repo):
    assert localnode.image_repository(image) == repo


def test_container_argv_uses_the_image_entrypoint_then_args_with_expansion():
    container = {"image": "ghcr.io/x/runtime:1", "args": ["--port", "$(PORT)", "$(MISSING)"]}
    argv = localnode.container_argv(container, {"ghcr.io/x/runtime": ["/venv/bin/rt"]}, {"PORT": "8000"})
    assert argv == ["/venv/bin/rt", "--port", "8000", "$(MISSING)"]


def test_container_argv_prefers_the_pod_command():
    container = {"image": "ghcr.io/x/runtime:1", "command": ["python", "-m", "x"]}
    assert localnode.container_argv(container, {}, {}) == ["python", "-m", "x"]


def test_unknown_image_without_command_is_a_clear_error():
    with pytest.raises(LookupError, match="no local entrypoint for image 'busybox:1'"):
        localnode.container_argv({"image": "busybox:1"}, {}, {})


def _ingress(ns, host, path, svc, port=80, path_type="Prefix"):
    rule = {"http": {"paths": [{"path": path, "pathType": path_type,
                                "backend": {"service": {"name": svc, "port": {"number": port}}}}]}}
    if host:
        rule["host"] = host
    return {"metadata": {"namespace": ns}, "spec": {"rules": [rule]}}


def test_routes_prefer_the_longest_prefix_and_respect_hosts():
    routes = localingress.routes_from_ingresses([
        _ingress("a", "", "/v2", "short"),
        _ingress("a", "", "/v2/m1/openai/v1", "m1"),
        _ingress("b", "models.example.com", "/v2/m2/openai/v1", "m2"),
    ])

    def pick(host, path):
        r = next((r for r in routes if localingress.matches(r, host, path)), None)
        return r and r.service

    assert pick("127.0.0.1:8080", "/v2/m1/openai/v1/chat/completions") == "m1"
    assert pick("127.0.0.1:8080", "/v2/m2/openai/v1/models") == "short"
    assert pick("models.example.com", "/v2/m2/openai/v1/models") == "m2"
    assert pick("127.0.0.1", "/v2/m1/openai/v10") == "short"  # prefix matches whole segments
    assert pick("127.0.0.1", "/other") is None


def test_host_capacity_is_this_machine():
    capacity = localnode.host_capacity()
    assert capacity["cpu"] == str(os.cpu_count())
    assert capacity["memory"].endswith("Ki") and int(capacity["memory"][:-2]) > 0


def test_a_started_process_dies_with_its_starter_even_on_sigkill():
    starter = subprocess.Popen([sys.executable, "-c", textwrap.dedent("""
        import subprocess, sys, time
        from localcluster import die_with_starter
        child = subprocess.Popen(["sleep", "300"], preexec_fn=die_with_starter)
        print(child.pid, flush=True)
        time.sleep(300)
    """)], stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    child = int(starter.stdout.readline())
    os.kill(starter.pid, signal.SIGKILL)
    starter.wait()

    def gone() -> bool:
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            return True
        # Reaped by init once it has exited; a zombie counts as gone.
        with open(f"/proc/{child}/stat") as stat:
            return stat.read().split(") ")[1].startswith("Z")

    wait_for(gone, timeout=10, what="the child of a SIGKILLed starter to exit", interval=0.05)
