"""hack/bench_autoscale.py's figures from a recorded run: which pod is the new replica,
what counts as the wake's overhead, and what the table says."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "hack"))


def _bench():
    spec = importlib.util.spec_from_file_location("bench_autoscale", REPO / "hack" / "bench_autoscale.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("bench_autoscale", module)
    spec.loader.exec_module(module)
    return module


def _run(b):
    r = b.Record(t0=0.0)
    # The first replica, gone at zero; the woken one; the one the load step asked for.
    r.pods = {"p-first": b.PodTimes(added=1.0, serving=60.0, ready=60.5, gone=130.0),
              "p-woken": b.PodTimes(added=200.3, serving=270.0, ready=270.4),
              "p-new": b.PodTimes(added=306.0, serving=400.0, ready=400.6)}
    r.desired = [(2.0, 1), (125.0, 0), (200.2, 1), (305.5, 2), (520.0, 1), (555.0, 0)]
    wake = b.Request(start=200.0, first=271.0, end=272.0, replica="default/p-woken")
    r.requests = [wake,
                  b.Request(start=301.0, first=301.5, end=303.0, replica="default/p-woken"),
                  b.Request(start=401.0, first=401.2, end=402.0, replica="default/p-new"),
                  b.Request(start=402.0, first=None, end=402.5, error="APIConnectionError: boom")]
    return b.summarise(r, wake_start=200.0, wake=wake, woken_pod="p-woken", step_at=300.0,
                       stop_at=480.0, down_1=520.0, down_0=555.0)


def test_the_wake_is_set_against_the_woken_pods_own_load_time() -> None:
    s = _run(_bench())
    assert s["wake_s"] == 71.0 and s["woken_load_s"] == 270.0 - 200.3
    assert round(s["wake_to_pod_s"], 2) == 0.3 and round(s["ready_to_token_s"], 2) == 0.6


def test_the_new_replica_is_the_pod_created_after_the_step_and_its_first_request_counts() -> None:
    s = _run(_bench())
    assert s["step_to_new_first_s"] == 101.0
    assert s["step_to_decision_s"] == 5.5 and s["decision_to_pod_s"] == 0.5
    assert s["new_load_s"] == 94.0 and round(s["ready_to_first_s"], 2) == 0.4


def test_every_failed_request_is_counted_and_the_table_says_the_target_was_missed() -> None:
    b = _bench()
    s = _run(b)
    assert s["requests"] == 4 and s["failed"] == 1
    table = b.render(s, "`make bench-autoscale`")
    assert "| Requests failed, of 4 | 1 | 0 | **no** |" in table
    assert "| Load stops -> one replica | 40.0 s | after 30 s | yes |" in table
