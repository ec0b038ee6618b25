"""MEP_GATEWAY_WORKERS: the supervisor, its workers on one port, merged metrics, readiness, signals.

The process tests run the real supervisor and workers (tests/fixtures_gateway.py
run as a script) over a fixed cluster view, in front of fake replicas.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pytest

from fixtures_gateway import FakeReplica, StaticGatewayProcess, gateway_env, mep_obj, metric_value, pod_obj
from modelendpoint_gateway import hold, workers
from waiting import wait_for

BIN = Path(sys.executable).parent / "modelendpoint-gateway"


def test_worker_count_and_setting():
    from modelendpoint_gateway.settings import SettingsError, load_settings

    assert load_settings({}).workers == 1
    assert load_settings({"MEP_GATEWAY_WORKERS": "0"}).workers == 0
    assert workers.worker_count(3) == 3
    assert 1 <= workers.worker_count(0) <= len(os.sched_getaffinity(0))
    with pytest.raises(SettingsError, match="MEP_GATEWAY_WORKERS"):
        load_settings({"MEP_GATEWAY_WORKERS": "-1"})


def test_each_worker_has_its_own_held_annotation_key():
    assert hold.annotation_key("gw-0") == f"{hold.ANNOTATION_PREFIX}/gw-0"   # one process: the contract's key
    assert hold.annotation_key("gw-0", 0) == f"{hold.ANNOTATION_PREFIX}/gw-0-w0"
    long = "g" * 70
    name = hold.annotation_key(long, 12).split("/", 1)[1]
    assert len(name) == 63 and name.endswith("g-w12")


def test_share_is_ready_when_every_worker_is():
    share = workers.Share(2)
    assert not share.all_ready()
    share.set_ready(0, True)
    assert not share.all_ready()
    share.set_ready(1, True)
    assert share.all_ready()
    share.set_ready(0, False)   # draining
    assert not share.all_ready()


def test_merged_metrics_keep_every_worker_apart():
    text0 = ('# HELP x_requests_total Requests.\n# TYPE x_requests_total counter\n'
             'x_requests_total{model="m",code="200"} 3.0\n'
             '# HELP x_ttfb_seconds T.\n# TYPE x_ttfb_seconds histogram\n'
             'x_ttfb_seconds_bucket{model="m",le="0.1"} 1.0\nx_ttfb_seconds_bucket{model="m",le="+Inf"} 1.0\n'
             'x_ttfb_seconds_count{model="m"} 1.0\nx_ttfb_seconds_sum{model="m"} 0.05\n')
    text1 = text0.replace("} 3.0", "} 4.0")
    merged = workers.merge_metrics([("0", text0), ("1", text1)]).decode()
    assert merged.count("# TYPE x_requests_total counter") == 1
    assert metric_value(merged, "x_requests_total", model="m", worker="0") == 3
    assert metric_value(merged, "x_requests_total", model="m", worker="1") == 4
    assert metric_value(merged, "x_requests_total", model="m") == 7
    assert metric_value(merged, "x_ttfb_seconds_count", worker="1") == 1


# --- the processes ------------------------------------------------------------------------------------


@pytest.fixture
def fake(replicas) -> FakeReplica:
    r = FakeReplica("a").start()
    replicas.append(r)
    return r


def _workers_of(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry))
    return out


def _ready(gw: StaticGatewayProcess) -> bool:
    assert gw.proc is not None and gw.proc.poll() is None, gw.log_tail()
    try:
        return (httpx.get(gw.url + "/readyz", timeout=2).status_code == 200
                and httpx.get(gw.metrics_url + "/readyz", timeout=2).status_code == 200)
    except httpx.HTTPError:
        return False


def test_two_workers_share_the_port_merge_metrics_and_drain_on_sigterm(tmp_path, fake):
    fake.chunks, fake.delay = 8, 0.1
    gw = StaticGatewayProcess(tmp_path, [mep_obj("ep", "ns", "m"), pod_obj("ep-0", "ns", "ep", "127.0.0.1", fake.port)],
                              workers=2).start()
    try:
        wait_for(lambda: _ready(gw), timeout=30, what="both workers ready")
        assert len(_workers_of(gw.proc.pid)) == 2
        for _ in range(40):   # a new connection each: the kernel spreads them over the workers' sockets
            r = httpx.post(gw.url + "/v1/chat/completions", json={"model": "m", "messages": []},
                           headers={"connection": "close"}, timeout=10)
            assert r.status_code == 200 and r.json()["served_by"] == "a"
        text = httpx.get(gw.metrics_url + "/metrics", timeout=10).text
        per_worker = [metric_value(text, "modelendpoint_gateway_requests_total", model="m", code="200", worker=w)
                      for w in ("0", "1")]
        assert sum(per_worker) == 40 and min(per_worker) > 0, per_worker
        started = [line for line in gw.log_lines() if line.get("msg") == "modelendpoint-gateway started"]
        assert sorted(line["worker"] for line in started) == [0, 1]

        # SIGTERM to the supervisor: a stream in flight finishes, then everything exits 0.
        lines: list[str] = []

        def stream() -> None:
            with httpx.Client(timeout=30) as h, h.stream("POST", gw.url + "/v1/chat/completions",
                                                          json={"model": "m", "stream": True}) as r:
                lines.extend(r.iter_lines())

        t = threading.Thread(target=stream)
        t.start()
        wait_for(lambda: fake.in_flight == 1, timeout=10, what="the stream started")
        os.kill(gw.proc.pid, signal.SIGTERM)
        wait_for(lambda: httpx.get(gw.metrics_url + "/readyz", timeout=2).status_code == 503, timeout=5,
                 what="the supervisor's /readyz draining")
        t.join(30)
        assert [x for x in lines if x.startswith("data:")][-1] == "data: [DONE]"
        assert gw.proc.wait(30) == 0, gw.log_tail()
    finally:
        gw.stop()


def test_a_worker_that_dies_stops_the_pod_with_status_1(tmp_path, fake):
    gw = StaticGatewayProcess(tmp_path, [mep_obj("ep", "ns", "m"), pod_obj("ep-0", "ns", "ep", "127.0.0.1", fake.port)],
                              workers=2).start()
    try:
        wait_for(lambda: _ready(gw), timeout=30, what="both workers ready")
        os.kill(_workers_of(gw.proc.pid)[0], signal.SIGKILL)
        assert gw.proc.wait(30) == 1
        assert any(line.get("msg", "").startswith("a worker exited on its own") for line in gw.log_lines())
    finally:
        gw.stop()


def test_a_busy_port_exits_2_in_one_line_before_any_worker_starts(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MEP_GATEWAY_", "KUBERNETES_"))}
    # A configuration is all the start needs (nothing is asked of an API server before listening).
    (tmp_path / "kubeconfig").write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "x",
        "clusters": [{"name": "x", "cluster": {"server": "https://127.0.0.1:1"}}],
        "users": [{"name": "x", "user": {"token": "t"}}],
        "contexts": [{"name": "x", "context": {"cluster": "x", "user": "x"}}]}))
    env.update(gateway_env(workers=2), KUBECONFIG=str(tmp_path / "kubeconfig"))
    with socket.socket() as busy:
        busy.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        busy.bind(("127.0.0.1", int(env["MEP_GATEWAY_PORT"])))
        busy.listen()
        proc = subprocess.run([str(BIN)], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("modelendpoint-gateway: cannot listen on 127.0.0.1")
    assert proc.stderr.strip().count("\n") == 0


def test_without_kubernetes_configuration_several_workers_exit_2_in_one_line(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MEP_GATEWAY_", "KUBERNETES_"))}
    env.update(gateway_env(workers=2), KUBECONFIG=str(tmp_path / "missing"), HOME=str(tmp_path))
    proc = subprocess.run([str(BIN)], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("modelendpoint-gateway: no Kubernetes configuration")
    assert proc.stderr.strip().count("\n") == 0
