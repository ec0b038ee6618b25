"""The local stack's parts without a cluster: image entrypoints, $(VAR) expansion,
ingress routing, node capacity, that its processes die with whoever started them,
and `make dev`'s pidfile, port checks, progress output, signals and testbed build."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import dev
import localingress
from processes import running
from waiting import wait_for


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

    # Reaped by init once it has exited; a zombie counts as gone.
    wait_for(lambda: not running(child), timeout=10, what="the child of a SIGKILLed starter to exit", interval=0.05)


# --- `make dev`: the pidfile, the ingress port, liveness and progress --------------


@pytest.mark.parametrize(
    "argv, is_dev",
    [
        (["/repo/.venv/bin/python", "hack/dev.py"], True),
        (["python", "/repo/hack/dev.py", "--ingress-port=9000"], True),
        (["python", "hack/dev.py", "--down"], False),  # `make dev-down` itself
        (["sleep", "300"], False),
        (["python", "hack/devtools.py"], False),
    ],
)
def test_is_dev_cmdline(argv, is_dev):
    assert dev.is_dev_cmdline(argv) is is_dev


def _pidfile(tmp_path, content: str):
    path = tmp_path / "dev.pid"
    path.write_text(content)
    return path


def test_running_dev_pid_ignores_missing_garbled_dead_and_reused_pids(tmp_path):
    assert dev.running_dev_pid(tmp_path / "none.pid") is None
    assert dev.running_dev_pid(_pidfile(tmp_path, "not a pid\n")) is None
    assert dev.running_dev_pid(_pidfile(tmp_path, "0")) is None
    assert dev.running_dev_pid(_pidfile(tmp_path, "4242"), cmdline=lambda pid: None) is None
    assert dev.running_dev_pid(_pidfile(tmp_path, "4242"), cmdline=lambda pid: ["sleep", "9"]) is None
    assert dev.running_dev_pid(_pidfile(tmp_path, "4242\n"),
                               cmdline=lambda pid: ["python", "hack/dev.py"]) == 4242


def test_dev_down_with_a_stale_pidfile_signals_nothing_and_removes_it(tmp_path):
    kills = []
    unrelated = _pidfile(tmp_path, "4242")
    message = dev.stop_running_dev(unrelated, cmdline=lambda pid: ["sleep", "9"],
                                   kill=lambda *a: kills.append(a))
    assert kills == [] and not unrelated.exists() and "stale" in message
    garbled = _pidfile(tmp_path, "")
    assert "stale" in dev.stop_running_dev(garbled, kill=lambda *a: kills.append(a))
    assert kills == [] and not garbled.exists()
    assert dev.stop_running_dev(tmp_path / "none.pid") == "no `make dev` is running"


def test_dev_down_signals_a_running_dev(tmp_path):
    kills = []
    pidfile = _pidfile(tmp_path, "4242")
    message = dev.stop_running_dev(pidfile, cmdline=lambda pid: ["python", "hack/dev.py"],
                                   kill=lambda *a: kills.append(a))
    assert kills == [(4242, signal.SIGTERM)] and "4242" in message


@pytest.fixture
def fake_dev_process():
    """A live process whose command line looks like `make dev`'s."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", "hack/dev.py"])
    # Until exec completes, /proc shows the forked pytest's command line.
    wait_for(lambda: "hack/dev.py" in (dev.read_cmdline(proc.pid) or []), timeout=10,
             what="the fake `make dev` to exec", interval=0.01)
    yield proc
    proc.kill()
    proc.wait()


def test_read_cmdline_recognises_a_live_dev_and_not_another_process(tmp_path, fake_dev_process):
    assert dev.running_dev_pid(_pidfile(tmp_path, str(fake_dev_process.pid))) == fake_dev_process.pid
    with subprocess.Popen(["sleep", "120"]) as other:
        wait_for(lambda: dev.read_cmdline(other.pid) == ["sleep", "120"], timeout=10,
                 what="sleep to exec", interval=0.01)
        try:
            assert dev.running_dev_pid(_pidfile(tmp_path, str(other.pid))) is None
        finally:
            other.kill()


def test_a_second_make_dev_refuses_and_keeps_the_first_ones_state(tmp_path, monkeypatch, capsys,
                                                                   fake_dev_process):
    monkeypatch.setenv("MEP_CACHE", str(tmp_path))
    state = tmp_path / "dev"
    state.mkdir()
    (state / "dev.pid").write_text(str(fake_dev_process.pid))
    (state / "cluster-marker").write_text("the first one's")
    assert dev.main([]) == 1
    assert "already running" in capsys.readouterr().err
    assert (state / "cluster-marker").exists()


def test_make_dev_down_with_a_dead_pid_in_the_pidfile_exits_cleanly(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MEP_CACHE", str(tmp_path))
    (tmp_path / "dev").mkdir()
    dead = subprocess.Popen(["true"])
    dead.wait()
    (tmp_path / "dev" / "dev.pid").write_text(str(dead.pid))
    assert dev.main(["--down"]) == 0
    assert "stale" in capsys.readouterr().err
    assert not (tmp_path / "dev" / "dev.pid").exists()


def test_port_is_free_sees_a_listener():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert not dev.port_is_free("127.0.0.1", port)
    assert dev.port_is_free("127.0.0.1", port)


def test_make_dev_refuses_a_busy_ingress_port_in_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MEP_CACHE", str(tmp_path))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert dev.main([f"--ingress-port={port}"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert f"port {port}" in err and "MEP_DEV_PORT" in err
    assert not (tmp_path / "dev").exists()  # nothing started, nothing written


class _NodesAlive:
    """node.stack.Stack's check seam: the control plane and the node are up."""

    def check_alive(self) -> None:
        pass


def test_check_alive_names_the_dead_process_with_its_log(tmp_path):
    alive = subprocess.Popen(["sleep", "120"])
    dead = subprocess.Popen(["true"])
    dead.wait()
    (tmp_path / "localingress.log").write_text("starting\nOSError: [Errno 98] address already in use\n")
    stack = dev.LocalStack(nodes=_NodesAlive(), work_dir=tmp_path, ingress_port=1,
                           pids={"localingress": dead.pid, "other": alive.pid})
    try:
        with pytest.raises(RuntimeError, match=r"localingress exited(.|\n)*address already in use"):
            stack.check_alive()
        del stack.pids["localingress"]
        stack.check_alive()
    finally:
        alive.kill()
        alive.wait()


def _pod(name, phase="Pending", waiting=None, ready=False, restarts=0):
    state = {"waiting": {"reason": waiting}} if waiting else {"running": {}}
    return {"metadata": {"name": name}, "status": {"phase": phase, "containerStatuses": [
        {"ready": ready, "restartCount": restarts, "state": state}]}}


def test_pods_summary():
    assert dev.pods_summary([]) == "no pods yet"
    assert dev.pods_summary([_pod("a", waiting="ContainerCreating"),
                             _pod("b", "Running", ready=True, restarts=2)]) == (
        "a ContainerCreating, not ready; b Running, ready, 2 restarts")


class _FakeControlPlane:
    """Answers `kubectl get` from a script of ModelEndpoint statuses, one per poll."""

    def __init__(self, phases):
        self.phases = list(phases)
        self.polls = 0

    def kubectl(self, *args):
        if args[:2] == ("get", "modelendpoint"):
            phase = self.phases[min(self.polls, len(self.phases) - 1)]
            self.polls += 1
            return json.dumps({"status": {"phase": phase, "replicas": 1, "readyReplicas": 0}})
        return json.dumps({"items": [_pod("smollm2-abc", "Running")]})


def test_wait_ready_prints_progress_every_interval_even_without_change(capsys):
    now = [0.0]
    cp = _FakeControlPlane(["Progressing"] * 20 + ["Ready"])
    obj = dev.wait_ready(cp, "smollm2", "default", timeout=900, interval=15,
                         clock=lambda: now[0], sleep=lambda s: now.__setitem__(0, now[0] + s))
    assert obj["status"]["phase"] == "Ready"
    lines = [line for line in capsys.readouterr().err.splitlines() if "default/smollm2" in line]
    # 40 s of polling every 2 s: at 0, 16 and 32 s.
    assert len(lines) == 3
    assert "phase=Progressing ready=0/1" in lines[0] and "smollm2-abc Running, not ready" in lines[0]


def test_wait_ready_stops_when_a_process_of_the_stack_dies():
    def dead():
        raise RuntimeError("kubelet exited")

    with pytest.raises(RuntimeError, match="kubelet exited"):
        dev.wait_ready(_FakeControlPlane(["Progressing"]), "m", "default", timeout=900,
                       check_alive=dead, sleep=lambda s: None)


# --- hack/build-testbed.sh: a cold Kubernetes build reports progress ----------------


BUILD_TESTBED = Path(__file__).resolve().parents[2] / "hack" / "build-testbed.sh"

# Stands in for the Go toolchain: `go list -deps` names 8 packages; `go build -v`
# prints 6 of them over about 3 s (then fails if FAKE_GO_FAIL is set), and writes
# the binaries it was asked for.
FAKE_GO = r"""#!/usr/bin/env bash
set -eu
case "$1" in
  list) for i in 1 2 3 4 5 6 7 8; do echo "example.com/pkg$i"; done ;;
  build)
    out=""; pkgs=()
    while [ $# -gt 0 ]; do
      case "$1" in -o) out="$2"; shift 2 ;; -ldflags) shift 2 ;; *) pkgs+=("$1"); shift ;; esac
    done
    for i in 1 2 3 4 5 6; do echo "example.com/pkg$i" >&2; sleep 0.5; done
    if [ -n "${FAKE_GO_FAIL:-}" ]; then echo "./main.go:3:1: syntax error" >&2; exit 1; fi
    for p in "${pkgs[@]}"; do
      [ "$p" = build ] || { touch "$out/$(basename "$p")"; chmod +x "$out/$(basename "$p")"; }
    done ;;
  *) echo "fake go: unexpected $*" >&2; exit 2 ;;
esac
"""


def _run_build_testbed(tmp_path, **env):
    fake_bin = tmp_path / "fake-bin"
    fake_bin.mkdir(exist_ok=True)
    (fake_bin / "go").write_text(FAKE_GO)
    (fake_bin / "go").chmod(0o755)
    cache = tmp_path / "cache"
    versions = dict(line.split("=", 1) for line in
                    (BUILD_TESTBED.parent / "versions.env").read_text().split("\n")
                    if "=" in line and not line.startswith("#"))
    v = {k: val.strip().strip('"') for k, val in versions.items()}
    bin_dir = cache / (f"testbed-k8s-{v['KUBERNETES_VERSION']}-etcd-{v['ETCD_VERSION']}"
                       f"-kwok-{v['KWOK_VERSION']}-helm-{v['HELM_VERSION']}") / "bin"
    bin_dir.mkdir(parents=True, exist_ok=True)
    # Only the Kubernetes build is left to do: kwok, kwokctl, its stages and helm are "cached".
    for name in ("kwok", "kwokctl", "helm"):
        (bin_dir / name).write_text("")
        (bin_dir / name).chmod(0o755)
    (bin_dir.parent / "kwok-stages.yaml").write_text("---\n")
    result = subprocess.run(
        ["bash", str(BUILD_TESTBED)], capture_output=True, text=True, timeout=60,
        env={"PATH": f"{fake_bin}:/usr/bin:/bin", "HOME": str(tmp_path), "MEP_CACHE": str(cache),
             "MEP_BUILD_PROGRESS_SECONDS": "1", **env})
    return result, bin_dir


def test_a_cold_kubernetes_build_reports_progress_while_it_runs(tmp_path):
    result, bin_dir = _run_build_testbed(tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == str(bin_dir)
    progress = [line for line in result.stderr.splitlines() if "packages compiled," in line]
    assert len(progress) >= 2, result.stderr  # about one a second over a 3 s build
    assert "of at most 8 packages compiled" in progress[-1]
    assert "elapsed (latest: example.com/pkg" in progress[-1]
    assert "go build: 6 packages compiled in " in result.stderr
    for name in ("kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubectl", "etcd"):
        assert (bin_dir / name).exists()


def test_a_failing_kubernetes_build_shows_the_error_and_fails(tmp_path):
    result, bin_dir = _run_build_testbed(tmp_path, FAKE_GO_FAIL="1")
    assert result.returncode != 0
    assert "./main.go:3:1: syntax error" in result.stderr
    assert not (bin_dir / "kube-apiserver").exists()


class _HelmOnlyControlPlane:
    def __init__(self, bin_dir):
        self.bin_dir = bin_dir

    def env(self):
        return {"PATH": "/usr/bin:/bin"}


def _fake_helm(tmp_path, script: str) -> _HelmOnlyControlPlane:
    (tmp_path / "helm").write_text("#!/bin/sh\n" + script)
    (tmp_path / "helm").chmod(0o755)
    return _HelmOnlyControlPlane(tmp_path)


def test_helm_install_stops_waiting_when_the_node_dies(tmp_path):
    cp = _fake_helm(tmp_path, "exec sleep 300\n")  # helm --wait for a pod that never starts
    calls = []

    def dies_on_the_third_check():
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("kubelet exited")

    # Without the checks, helm_install would return normally after helm's 300 s.
    with pytest.raises(RuntimeError, match="kubelet exited"):
        dev.helm_install(cp, check_alive=dies_on_the_third_check)


def test_helm_install_fails_with_helms_exit_status(tmp_path):
    with pytest.raises(subprocess.CalledProcessError):
        dev.helm_install(_fake_helm(tmp_path, "exit 3\n"))
    dev.helm_install(_fake_helm(tmp_path, "exit 0\n"))


def test_wait_listening_returns_once_the_ingress_listens_and_fails_fast_if_it_died(tmp_path):
    alive = subprocess.Popen(["sleep", "120"])
    try:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            s.listen()
            port = s.getsockname()[1]
            dev.LocalStack(nodes=_NodesAlive(), work_dir=tmp_path, ingress_port=port,
                           pids={"localingress": alive.pid}).wait_listening(timeout=5)
    finally:
        alive.kill()
        alive.wait()
    dead = subprocess.Popen(["true"])
    dead.wait()
    # Without the check it would time out (TimeoutError), not name the dead process.
    with pytest.raises(RuntimeError, match="localingress exited"):
        dev.LocalStack(nodes=_NodesAlive(), work_dir=tmp_path, ingress_port=port,
                       pids={"localingress": dead.pid}).wait_listening(timeout=30)


def test_only_the_first_stop_signal_interrupts_make_dev(capsys):
    on_signal = dev.StopOnSignal()
    with pytest.raises(KeyboardInterrupt):
        on_signal(signal.SIGTERM, None)
    on_signal(signal.SIGTERM, None)  # a second `make dev-down` during the clean-up
    on_signal(signal.SIGINT, None)
    assert capsys.readouterr().err.count("already stopping") == 2
