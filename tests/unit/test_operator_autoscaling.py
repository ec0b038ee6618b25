"""The autoscaler's decision as a pure function of (samples, current replicas, spec, clock),
the load it reads from metrics and annotations, the scaler's restart and wake paths, and
the peering rule that pauses it on a standby replica."""

from __future__ import annotations

import asyncio
import datetime
import json
import random

import pytest

from modelendpoint_operator import autoscaling as a
from modelendpoint_operator import peering
from modelendpoint_operator.scaler import Scaler, metrics_targets, ready_replicas
from modelendpoint_operator.spec import AutoscalingSpec, Endpoint

NOW = datetime.datetime(2026, 12, 1, 12, 0, 0, tzinfo=datetime.UTC)


def spec(**kw: int) -> AutoscalingSpec:
    return AutoscalingSpec.model_validate({"minReplicas": 1, "maxReplicas": 4, "targetRequests": 8,
                                           "scaleDownDelaySeconds": 60, **kw})


def history(loads: list[float], start: float = 0.0, step: float = 5.0, since: float | None = None,
            served: list[bool] | None = None) -> a.History:
    h = a.History(since=start if since is None else since)
    for i, load in enumerate(loads):
        h.add(a.Sample(start + i * step, load, bool(served and served[i])), 1e9)
    return h


def now_of(h: a.History) -> float:
    return h.samples[-1].at


@pytest.mark.parametrize("load,expected", [(0, 1), (1, 1), (8, 1), (9, 2), (19, 3), (32, 4), (500, 4)])
def test_desired_is_load_over_target_rounded_up_and_clamped(load: float, expected: int) -> None:
    h = history([load])
    assert a.decide(spec(), 1, h, now_of(h)).replicas == max(1, expected)


def test_up_at_once_with_the_reason_in_words() -> None:
    h = history([19])
    d = a.decide(spec(), 1, h, now_of(h))
    assert (d.replicas, d.reason) == (3, "19 requests in flight, target 8 per replica")


def test_down_only_after_the_load_stayed_low_for_the_whole_window() -> None:
    loads = [20] + [4] * 11  # 55 s of low load after a peak, window 60 s
    h = history(loads)
    assert a.decide(spec(), 3, h, now_of(h)).replicas == 3
    h.add(a.Sample(now_of(h) + 10, 4, False), 60)  # the peak is now out of the window
    assert a.decide(spec(), 3, h, now_of(h)).replicas == 1


def test_no_scale_down_before_a_whole_window_has_been_observed() -> None:
    """After an operator restart: no jump to min (or zero) on the first quiet samples."""
    h = history([0, 0, 0], start=100.0, since=100.0)
    assert a.decide(spec(minReplicas=0), 3, h, now_of(h)).replicas == 3
    assert "observing" in a.decide(spec(minReplicas=0), 3, h, now_of(h)).reason


def test_never_below_one_replica_while_anything_is_in_flight_or_held() -> None:
    h = history([0] * 12 + [1])
    assert a.decide(spec(minReplicas=0), 1, h, now_of(h)).replicas == 1
    assert a.decide(spec(minReplicas=0), 0, h, now_of(h)).replicas == 1  # and up from zero at once


def test_to_zero_only_after_nothing_was_served_for_the_delay() -> None:
    quiet = history([0] * 14, since=-100)
    assert a.decide(spec(minReplicas=0), 1, quiet, now_of(quiet)).replicas == 0
    # A short request between two samples shows as a finished-counter step, not as load.
    served = history([0] * 14, since=-100, served=[False] * 10 + [True] + [False] * 3)
    assert a.decide(spec(minReplicas=0), 1, served, now_of(served)).replicas == 1
    # minReplicas 1 never goes to zero.
    assert a.decide(spec(minReplicas=1), 1, quiet, now_of(quiet)).replicas == 1


def test_a_replica_still_loading_is_not_idle_time() -> None:
    """Created at one replica with minReplicas 0: the delay counts from when it is ready,
    so a model slower to load than scaleDownDelaySeconds still gets to serve."""
    h = a.History(since=-100)
    for i in range(14):  # 70 s loading, beyond the 60 s delay
        h.add(a.Sample(i * 5.0, 0, False, starting=True), 1e9)
    assert a.decide(spec(minReplicas=0), 1, h, now_of(h)).replicas == 1
    for i in range(14, 27):  # ready, then idle for 60 s
        h.add(a.Sample(i * 5.0, 0, False), 1e9)
    assert a.decide(spec(minReplicas=0), 1, h, now_of(h)).replicas == 0


def test_a_noisy_signal_does_not_flap() -> None:
    """Load wobbling between one and two replicas' worth, with dips: up once, never back
    down while the window still holds a busy sample."""
    rng = random.Random(7)
    h = a.History(since=0.0)
    replicas, changes = 1, 0
    for i in range(400):
        load = rng.choice([3, 5, 7, 9, 11, 13, 15, 10])
        h.add(a.Sample(i * 5.0, load, True), 60)
        d = a.decide(spec(), replicas, h, i * 5.0)
        changes += d.replicas != replicas
        replicas = d.replicas
    assert (replicas, changes) == (2, 1)


def test_lowered_max_applies_at_once() -> None:
    h = history([30])
    assert a.decide(spec(maxReplicas=2), 4, h, now_of(h)).replicas == 2


def test_replica_metrics_parse_vllms_series() -> None:
    text = "\n".join([
        "# HELP vllm:num_requests_running Number of requests in model execution batches.",
        "# TYPE vllm:num_requests_running gauge",
        'vllm:num_requests_running{engine="0",model_name="m"} 3.0',
        "# TYPE vllm:num_requests_waiting gauge",
        'vllm:num_requests_waiting{engine="0",model_name="m"} 2.0',
        "# TYPE vllm:request_success counter",
        'vllm:request_success_total{engine="0",finished_reason="stop",model_name="m"} 10.0',
        'vllm:request_success_total{engine="0",finished_reason="length",model_name="m"} 4.0',
        'vllm:request_success_created{engine="0",finished_reason="stop",model_name="m"} 1.7e9',
        "# TYPE modelendpoint_requests_in_flight gauge",
        "modelendpoint_requests_in_flight 9.0",
        # Series whose names only start like the ones read, and a histogram, count for nothing.
        "vllm:num_requests_running_max 7.0",
        'vllm:num_requests_waiting_by_reason{reason="capacity"} 6.0',
        "# TYPE vllm:e2e_request_latency_seconds histogram",
        'vllm:e2e_request_latency_seconds_bucket{le="+Inf",model_name="m"} 14.0',
        # A series without labels (a runtime that drops them) is read too.
        "vllm:num_requests_waiting 1.0",
    ]) + "\n"
    assert a.parse_replica_metrics(text) == a.ReplicaLoad(in_flight=6.0, finished=14.0)


def test_held_requests_count_only_fresh_gateway_entries() -> None:
    def entry(held: int, age: float) -> str:
        return json.dumps({"held": held, "at": (NOW - datetime.timedelta(seconds=age)).isoformat()})
    annotations = {
        f"{a.HELD_ANNOTATION_PREFIX}gw-a": entry(3, 2),
        f"{a.HELD_ANNOTATION_PREFIX}gw-b": entry(4, 5),
        f"{a.HELD_ANNOTATION_PREFIX}gw-dead": entry(9, 60),
        f"{a.HELD_ANNOTATION_PREFIX}gw-bad": "not json",
        "other/annotation": entry(100, 0),
    }
    held, seen = a.held_requests(annotations, {}, 100.0, NOW)
    assert held == 7 and set(seen) == {f"{a.HELD_ANNOTATION_PREFIX}gw-{x}" for x in ("a", "b", "dead")}
    # Unchanged, they age on this clock: gw-b is 5 + 11 s old 11 s later.
    assert a.held_requests(annotations, seen, 111.0, NOW)[0] == 3


def test_held_requests_age_on_the_operators_clock_not_the_gateways() -> None:
    """The operator's clock runs 60 s ahead of the gateway's: the gateway's first entry looks
    stale, but each rewrite (every 5 s) is fresh from when it is seen; an entry no longer
    rewritten (its gateway died) ages out 15 s after it was last seen changing."""
    key = f"{a.HELD_ANNOTATION_PREFIX}gw-a"
    gateway_now = NOW - datetime.timedelta(seconds=60)

    def entry(held: int, at: datetime.datetime) -> dict[str, str]:
        return {key: json.dumps({"held": held, "at": at.isoformat()})}
    held, seen = a.held_requests(entry(2, gateway_now), {}, 0.0, NOW)
    assert held == 0  # the first sight can only go by the gateway's clock
    rewritten = entry(2, gateway_now + datetime.timedelta(seconds=5))
    held, seen = a.held_requests(rewritten, seen, 5.0, NOW + datetime.timedelta(seconds=5))
    assert held == 2
    held, seen = a.held_requests(rewritten, seen, 19.0, NOW + datetime.timedelta(seconds=19))
    assert held == 2
    assert a.held_requests(rewritten, seen, 21.0, NOW + datetime.timedelta(seconds=21))[0] == 0
    # A gateway clock ahead: a new entry counts at once, then ages here like any other.
    ahead = entry(1, NOW + datetime.timedelta(seconds=300))
    held, seen = a.held_requests(ahead, {}, 0.0, NOW)
    assert held == 1 and a.held_requests(ahead, seen, 16.0, NOW)[0] == 0


def _endpoint(status: dict | None = None, annotations: dict | None = None, **auto: int) -> Endpoint:
    return Endpoint.from_body({
        "metadata": {"name": "llm", "namespace": "ns", "uid": "u", "generation": 1,
                     "annotations": annotations or {}},
        "spec": {"model": "m", "autoscaling": {"minReplicas": 0, "maxReplicas": 4, "scaleDownDelaySeconds": 60,
                                               **auto}},
        "status": status or {}})


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def _scaler(clock: Clock, events: list) -> Scaler:
    return Scaler(lambda key, why: None, lambda ep, *args: events.append(args), interval=5, max_scrapes=4,
                  clock=clock, wallclock=lambda: NOW)


def test_a_restarted_operator_goes_on_from_the_status() -> None:
    events: list = []
    scaler = _scaler(Clock(), events)
    ep = _endpoint({"autoscaling": {"desiredReplicas": 3, "lastActiveTime": "2026-12-01T11:59:00Z"}})
    assert scaler.replicas(ep, {"spec": {"replicas": 1}}) == 3  # not max, not zero, not the Deployment's
    assert events == []
    fresh = _scaler(Clock(), events)
    assert fresh.replicas(_endpoint(), {"spec": {"replicas": 2}}) == 2  # no status yet: the Deployment's


def test_autoscaling_turned_back_on_starts_from_the_deployment_not_its_old_count() -> None:
    scaler = _scaler(Clock(), [])
    ep = _endpoint({"autoscaling": {"desiredReplicas": 1}})
    assert scaler.replicas(ep, {"spec": {"replicas": 1}}) == 1
    scaler.forget_track(ep.key)  # autoscaling off; someone runs replicas: 3 meanwhile
    assert scaler.replicas(_endpoint(), {"spec": {"replicas": 3}}) == 3


def test_a_restarted_operator_writes_back_the_autoscaling_status_it_read() -> None:
    # Otherwise every reconcile after a restart would patch the status (an event, a reconcile,
    # a patch...) until the next decision.
    saved = {"desiredReplicas": 2, "load": 3.5, "lastScaleTime": "2026-12-01T11:58:00Z",
             "lastActiveTime": "2026-12-01T11:59:00Z", "message": "scaled 1 -> 2: load 7.0 over target 4"}
    scaler = _scaler(Clock(), [])
    ep = _endpoint({"autoscaling": saved})
    scaler.replicas(ep, {"spec": {"replicas": 2}})
    assert scaler.status(ep) == saved


def test_a_fresh_held_annotation_wakes_a_zero_endpoint_at_once() -> None:
    events: list = []
    clock = Clock()
    scaler = _scaler(clock, events)
    asleep = _endpoint({"autoscaling": {"desiredReplicas": 0}})
    assert scaler.replicas(asleep, None) == 0
    held = {f"{a.HELD_ANNOTATION_PREFIX}gw-1": json.dumps({"held": 20, "at": NOW.isoformat()})}
    woken = _endpoint({"autoscaling": {"desiredReplicas": 0}}, held, targetRequests=8)
    assert scaler.replicas(woken, None) == 3  # 20 held / 8 per replica
    assert events == [("Normal", "Scaled", "scaled 0 -> 3: woken by 20 held requests")]
    status = scaler.status(woken)
    assert status["desiredReplicas"] == 3 and status["lastActiveTime"] == "2026-12-01T12:00:00Z"


def test_a_notready_replica_s_requests_count_and_its_silence_stops_nothing() -> None:
    """A replica that failed its readiness probe under load still serves what it took; a
    NotReady one that does not answer (loading, crashing) holds nothing and blocks no decision."""
    scaler = _scaler(Clock(), [])
    ep = _endpoint({"autoscaling": {"desiredReplicas": 1}}, targetRequests=4)
    scaler.replicas(ep, {"spec": {"replicas": 1}})

    def pod(uid: str, ip: str, ready: bool) -> dict:
        return {"metadata": {"uid": uid}, "status": {"podIP": ip, "phase": "Running", "conditions": [
            {"type": "Ready", "status": "True" if ready else "False"}]}}
    loads = {"10.0.0.1": a.ReplicaLoad(2.0, 5.0), "10.0.0.2": a.ReplicaLoad(6.0, 9.0), "10.0.0.3": None}

    async def scrape(url: str) -> a.ReplicaLoad | None:
        return loads[url.split("//")[1].split(":")[0]]
    scaler._scrape = scrape  # type: ignore[method-assign]
    pods = [pod("a", "10.0.0.1", True), pod("b", "10.0.0.2", False), pod("c", "10.0.0.3", False)]
    asyncio.run(scaler._load(ep, pods, 1))
    assert scaler.status(ep)["desiredReplicas"] == 2 and scaler.status(ep)["load"] == 8.0


def test_ready_replicas_are_scraped_on_their_metrics_port() -> None:
    ready = {"type": "Ready", "status": "True"}
    pods = [
        {"metadata": {"uid": "a"}, "status": {"podIP": "10.0.0.1", "conditions": [ready]},
         "ports": [{"name": "http", "containerPort": 8000}, {"name": "metrics", "containerPort": 9400}]},
        {"metadata": {"uid": "b"}, "status": {"podIP": "10.0.0.2", "conditions": [{"type": "Ready",
                                                                                    "status": "False"}]}},
        {"metadata": {"uid": "c", "deletionTimestamp": "x"}, "status": {"podIP": "10.0.0.3", "conditions": [ready]}},
        {"metadata": {"uid": "d"}, "status": {"conditions": [ready]}},
    ]
    assert ready_replicas(pods) == [("a", "http://10.0.0.1:9400")]
    # The load is read from NotReady pods too (b); never from deleting or unplaced ones.
    assert metrics_targets(pods + [{"metadata": {"uid": "e"}, "status": {"podIP": "10.0.0.5", "phase": "Failed"}}]) \
        == [("a", "http://10.0.0.1:9400", True), ("b", "http://10.0.0.2:9400", False)]
    assert a.LOAD_METRICS_PATH == ("/metrics?name[]=vllm%3Anum_requests_running&name[]=vllm%3Anum_requests_waiting"
                                   "&name[]=vllm%3Arequest_success_total")


def _peer(priority: int, age: float, lifetime: int = 60) -> dict:
    return {"priority": priority, "lifetime": lifetime,
            "lastseen": (NOW - datetime.timedelta(seconds=age)).isoformat()}


@pytest.mark.parametrize("status,expected", [
    ({"me": _peer(100, 0)}, True),
    ({"me": _peer(100, 0), "other": _peer(50, 1)}, True),
    ({"me": _peer(100, 0), "other": _peer(200, 1)}, False),
    ({"me": _peer(100, 0), "other": _peer(100, 1)}, False),  # equal: kopf pauses both
    ({"me": _peer(100, 0), "other": _peer(200, 120)}, True),  # dead
    ({}, True),
    (None, False),  # no peering object: kopf pauses too
])
def test_peering_gate_follows_kopfs_rule(status: dict | None, expected: bool) -> None:
    assert peering.active([status], "me", 100, NOW) is expected


def test_adapter_status_counts_replicas_that_loaded_each_adapter() -> None:
    from modelendpoint_operator.scaler import adapter_summary

    reports = [
        {"adapters": [{"name": "sql", "state": "loaded"}, {"name": "bad", "state": "failed",
                                                           "error": "No adapter found for /x"}]},
        {"adapters": [{"name": "sql", "state": "loaded"}, {"name": "bad", "state": "loading"}]},
        None,  # a replica that did not answer counts for nothing
    ]
    assert adapter_summary(["sql", "bad", "new"], reports) == [
        {"name": "sql", "loadedReplicas": 2},
        {"name": "bad", "loadedReplicas": 0, "message": "No adapter found for /x"},
        {"name": "new", "loadedReplicas": 0},
    ]
