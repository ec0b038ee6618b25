"""make bench-autoscale: one autoscaled ModelEndpoint, a load pattern through the gateway.

The whole system as `make dev` runs it (the local control plane, the real node with
the project's images, the chart's operator and gateway in real containers, the local
ingress), and one ModelEndpoint of the embedded model with ``minReplicas: 0,
maxReplicas: 2, targetRequests: 4``. The load pattern, from the official OpenAI SDK
through the gateway's one base URL:

1. created: the first replica loads (its load time is the model's own load time, as
   the cluster sees it: pod created -> Ready);
2. idle until the autoscaler scales to zero;
3. wake: one streamed request to the model at zero; the wake time is the request's
   time to first token, set against the woken pod's own load time;
4. a ramp from 1 to 8 concurrent streams, one more every 5 s; past 4 the load asks for
   a second replica, and the time from that step to the new replica's first request
   is measured (with its parts: the decision, the pod's creation, its load, the first
   request the gateway routes to it);
5. a plateau of 8 streams until the new replica has served a while;
6. stop: back to one replica after scaleDownDelaySeconds, then to zero.

Every request's outcome is kept: the target is no failed request over the whole
run. Writes its table into docs/benchmarks.md (between the bench-autoscale markers)
and a plot of load, replicas and time to first token, docs/autoscale.png, unless
--no-write.

Times come from the benchmark's own clock: its watches of the pods and of the
ModelEndpoint see each change within milliseconds, which the API server's
second-resolution timestamps would not.
"""

from __future__ import annotations

import argparse
import json
import math
import signal
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

HACK = Path(__file__).resolve().parent
sys.path.insert(0, str(HACK))

import benchdoc  # noqa: E402
import dev  # noqa: E402
import localcluster  # noqa: E402

NAME, NS = "bench", dev.SAMPLE_NAMESPACE  # the embedded model's volume is in this namespace
SERVED = "smollm2-bench"
AUTOSCALING = {"minReplicas": 0, "maxReplicas": 2, "targetRequests": 4, "scaleDownDelaySeconds": 30}
RAMP_TO, RAMP_STEP_S = 8, 5.0
PLATEAU_AFTER_NEW_S, PLATEAU_MAX_S = 45.0, 420.0
MAX_TOKENS = 32
REPLICA_HEADER = "x-modelendpoint-replica"
RUNTIME_PORT = 8000
# The targets of the issue: no failed request; a wake at most 2 s longer than the model's load.
TARGET_WAKE_OVERHEAD_S = 2.0
PNG = benchdoc.REPO / "docs" / "autoscale.png"
# Chart values: answers name the replica that served them (how the benchmark tells
# the new replica's first request); everything else is the chart's defaults.
HELM_VALUES = ("--set", "gateway.extraEnv[0].name=MEP_GATEWAY_REPLICA_HEADER",
               "--set-string", "gateway.extraEnv[0].value=true")


def endpoint() -> dict:
    """The local sample's engine and volume under its own name, autoscaled; requests small
    enough that two replicas fit beside the system on two cores."""
    import yaml

    sample = yaml.safe_load(dev.SAMPLE.read_text())["spec"]
    spec = {k: sample[k] for k in ("model", "gpus", "engine", "modelCache", "env", "shmSize",
                                   "allowUnauthenticated")}
    spec.update(servedModelName=SERVED, autoscaling=dict(AUTOSCALING),
                resources={"requests": {"cpu": "100m", "memory": "1Gi"}, "limits": {"memory": "6Gi"}})
    return {"apiVersion": "serving.modelendpoint.dev/v1alpha1", "kind": "ModelEndpoint",
            "metadata": {"name": NAME, "namespace": NS}, "spec": spec}


# --- what the run records (the benchmark's own monotonic clock) ------------------------------


@dataclass
class Request:
    start: float
    first: float | None = None  # the first streamed token
    end: float | None = None
    replica: str | None = None  # namespace/pod, from the gateway's replica header
    error: str | None = None


@dataclass
class PodTimes:
    added: float
    ip: str | None = None
    serving: float | None = None  # the runtime's own /ready first answered 200 (polled directly)
    ready: float | None = None    # the pod's Ready condition (the kubelet's probes)
    gone: float | None = None


@dataclass
class Record:
    t0: float = field(default_factory=time.monotonic)
    lock: threading.Lock = field(default_factory=threading.Lock)
    requests: list[Request] = field(default_factory=list)
    pods: dict[str, PodTimes] = field(default_factory=dict)
    desired: list[tuple[float, int]] = field(default_factory=list)  # status.autoscaling.desiredReplicas
    target: list[tuple[float, int]] = field(default_factory=list)   # the pattern's concurrency
    load: list[tuple[float, float]] = field(default_factory=list)   # the operator's load gauge
    marks: dict[str, float] = field(default_factory=dict)

    def mark(self, what: str) -> float:
        t = time.monotonic()
        with self.lock:
            self.marks[what] = t
        print(f"==> {t - self.t0:7.1f}s {what}", file=sys.stderr, flush=True)
        return t

    def ready_pods(self, at: float) -> int:
        with self.lock:
            return sum(1 for p in self.pods.values()
                       if p.ready is not None and p.ready <= at and (p.gone is None or p.gone > at))

    def desired_now(self) -> int | None:
        with self.lock:
            return self.desired[-1][1] if self.desired else None


def _ready(pod) -> bool:
    conditions = (pod.status.conditions or []) if pod.status else []
    return any(c.type == "Ready" and c.status == "True" for c in conditions)


def watch_pods(core, record: Record, stop: threading.Event) -> None:
    """Each runtime pod's creation, Ready and end (deletion started or gone), as seen."""
    from kubernetes import watch

    while not stop.is_set():
        try:
            for event in watch.Watch().stream(core.list_namespaced_pod, NS, timeout_seconds=30,
                                              label_selector=f"app.kubernetes.io/instance={NAME}"):
                pod, now = event["object"], time.monotonic()
                with record.lock:
                    times = record.pods.setdefault(pod.metadata.name, PodTimes(now))
                    times.ip = times.ip or (pod.status.pod_ip if pod.status else None)
                    if times.ready is None and _ready(pod):
                        times.ready = now
                    if times.gone is None and (event["type"] == "DELETED" or pod.metadata.deletion_timestamp):
                        times.gone = now
                if stop.is_set():
                    return
        except Exception as exc:  # noqa: BLE001 - an expired or broken watch: start again
            print(f"(pod watch restarted: {exc!r:.200})", file=sys.stderr)
            time.sleep(0.2)


def poll_runtimes(record: Record, stop: threading.Event) -> None:
    """When each runtime itself first answers /ready (every 100 ms, on the pod's IP): the
    model's own load time ends there, before the kubelet's probes notice."""
    while not stop.wait(0.1):
        with record.lock:
            waiting = [(name, p.ip) for name, p in record.pods.items()
                       if p.ip and p.serving is None and p.gone is None]
        for name, ip in waiting:
            try:
                with urllib.request.urlopen(f"http://{ip}:{RUNTIME_PORT}/ready", timeout=0.5) as r:
                    if r.status == 200:
                        with record.lock:
                            record.pods[name].serving = time.monotonic()
            except OSError:
                pass


def watch_endpoint(custom, record: Record, stop: threading.Event) -> None:
    """The autoscaler's decisions: status.autoscaling.desiredReplicas, as they change."""
    from kubernetes import watch

    while not stop.is_set():
        try:
            for event in watch.Watch().stream(custom.list_namespaced_custom_object, "serving.modelendpoint.dev",
                                              "v1alpha1", NS, "modelendpoints", timeout_seconds=30,
                                              field_selector=f"metadata.name={NAME}"):
                desired = ((event["object"].get("status") or {}).get("autoscaling") or {}).get("desiredReplicas")
                if desired is not None:
                    with record.lock:
                        if not record.desired or record.desired[-1][1] != desired:
                            record.desired.append((time.monotonic(), int(desired)))
                if stop.is_set():
                    return
        except Exception as exc:  # noqa: BLE001
            print(f"(ModelEndpoint watch restarted: {exc!r:.200})", file=sys.stderr)
            time.sleep(0.2)


def sample_operator_load(url: str, record: Record, stop: threading.Event) -> None:
    """The operator's own gauge of the load it sees for the ModelEndpoint, every second."""
    wanted = f'modelendpoint_operator_autoscaler_load{{name="{NAME}",namespace="{NS}"}}'
    while not stop.wait(1.0):
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                for line in r.read().decode().splitlines():
                    if line.startswith("modelendpoint_operator_autoscaler_load{") and _same_labels(line, wanted):
                        with record.lock:
                            record.load.append((time.monotonic(), float(line.rsplit(" ", 1)[1])))
        except OSError:
            pass


def _same_labels(line: str, wanted: str) -> bool:
    labels = set(line.partition("{")[2].partition("}")[0].split(","))
    return labels == set(wanted.partition("{")[2].partition("}")[0].split(","))


# --- the load: N streams, each one request after another ------------------------------------


class Load:
    """Streams through the gateway with the official SDK; ``set(n)`` keeps n in flight."""

    def __init__(self, base_url: str, record: Record, most: int) -> None:
        from openai import OpenAI

        # No retries in the client: a request the system fails must count as failed.
        self.client = OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=900)
        self.record = record
        self.wanted = 0
        self.done = threading.Event()
        self.threads = [threading.Thread(target=self._stream_forever, args=(i,), daemon=True) for i in range(most)]
        for t in self.threads:
            t.start()

    def set(self, n: int) -> None:
        self.wanted = n
        with self.record.lock:
            self.record.target.append((time.monotonic(), n))

    def stop(self) -> None:
        self.set(0)
        self.done.set()
        for t in self.threads:
            t.join(timeout=900)

    def one(self, prompt: str = "Count from one to twenty.") -> Request:
        req = Request(time.monotonic())
        try:
            raw = self.client.chat.completions.with_raw_response.create(
                model=SERVED, messages=[{"role": "user", "content": prompt}], max_tokens=MAX_TOKENS,
                temperature=0, stream=True)
            req.replica = raw.headers.get(REPLICA_HEADER)
            for chunk in raw.parse():
                if req.first is None and chunk.choices and (chunk.choices[0].delta.content
                                                            or chunk.choices[0].finish_reason):
                    req.first = time.monotonic()
            req.end = time.monotonic()
            if req.first is None:
                req.error = "a stream without a token"
        except Exception as exc:  # noqa: BLE001 - every failure is a result
            req.error = f"{type(exc).__name__}: {exc}"[:300]
            req.end = time.monotonic()
        with self.record.lock:
            self.record.requests.append(req)
        return req

    def _stream_forever(self, index: int) -> None:
        while not self.done.is_set() or index < self.wanted:
            if index < self.wanted:
                self.one(f"Stream {index}: count from one to twenty.")
            else:
                time.sleep(0.05)


# --- the run ------------------------------------------------------------------------------


def wait_for(what: str, check, timeout: float, alive=lambda: None) -> float:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive()
        if check():
            return time.monotonic()
        time.sleep(0.1)
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")


def run(stack: dev.LocalStack, record: Record) -> dict:
    from kubernetes import client, config

    cp = stack.cp
    api = config.new_client_from_config(config_file=str(cp.kubeconfig))
    core, custom = client.CoreV1Api(api), client.CustomObjectsApi(api)
    stop = threading.Event()
    threading.Thread(target=watch_pods, args=(core, record, stop), daemon=True).start()
    threading.Thread(target=watch_endpoint, args=(custom, record, stop), daemon=True).start()
    threading.Thread(target=poll_runtimes, args=(record, stop), daemon=True).start()
    operator_pod = core.list_namespaced_pod(
        dev.OPERATOR_NAMESPACE, label_selector="app.kubernetes.io/component=operator").items[0]
    port = next(p.container_port for c in operator_pod.spec.containers for p in (c.ports or []) if p.name == "metrics")
    threading.Thread(target=sample_operator_load, daemon=True,
                     args=(f"http://{operator_pod.status.pod_ip}:{port}/metrics", record, stop)).start()
    load = None
    try:
        record.mark("applying the ModelEndpoint (minReplicas 0, maxReplicas 2, targetRequests 4)")
        cp.kubectl("apply", "--server-side", "-f", "-", input=json.dumps(endpoint()))
        wait_for("the first replica to be Ready", lambda: record.ready_pods(time.monotonic()) == 1, 900,
                 stack.check_alive)
        record.mark("first replica Ready")
        load = Load(dev.gateway_url(stack), record, RAMP_TO)
        # A request so that the idle clock counts from a served one, as in use.
        first = load.one()
        if first.error:
            raise RuntimeError(f"the first request failed: {first.error}")
        delay = AUTOSCALING["scaleDownDelaySeconds"]
        record.mark("idle")
        wait_for("the autoscaler to scale to zero", lambda: record.desired_now() == 0, delay + 300, stack.check_alive)
        wait_for("the last replica to go", lambda: record.ready_pods(time.monotonic()) == 0, 300, stack.check_alive)
        record.mark("at zero")
        time.sleep(5)  # at rest at zero for a moment, as between uses

        wake_start = record.mark("wake: one request to the model at zero")
        with record.lock:
            before = set(record.pods)
        wake = load.one()
        if wake.error:
            raise RuntimeError(f"the waking request failed: {wake.error}")
        record.mark("woken: first token")
        with record.lock:
            woken = [n for n in record.pods if n not in before]
        assert len(woken) == 1, f"expected one woken pod, saw {woken}"
        woken_pod = woken[0]

        ramp_at = record.mark("ramp")
        step_at = None
        for n in range(1, RAMP_TO + 1):
            load.set(n)
            if n == AUTOSCALING["targetRequests"] + 1:
                step_at = record.mark(f"load step to {n} streams: more than one replica's target")
            time.sleep(RAMP_STEP_S)
        record.mark(f"plateau at {RAMP_TO} streams")

        def new_replica_served_a_while() -> bool:
            # Requests since the ramp only: the first request went to the replica that has gone.
            with record.lock:
                firsts = [r.start for r in record.requests
                          if r.start >= ramp_at and r.replica and not r.replica.endswith("/" + woken_pod)]
            return bool(firsts) and time.monotonic() - min(firsts) >= PLATEAU_AFTER_NEW_S

        wait_for("the new replica to serve", new_replica_served_a_while, PLATEAU_MAX_S, stack.check_alive)
        stop_at = record.mark("stop: no load")
        load.set(0)
        wait_for("one replica again", lambda: record.desired_now() == 1, delay + 120, stack.check_alive)
        down_1 = record.mark("scaled down to one")
        wait_for("zero replicas again", lambda: record.desired_now() == 0, delay + 180, stack.check_alive)
        down_0 = record.mark("scaled down to zero")
        wait_for("the last replica to go", lambda: record.ready_pods(time.monotonic()) == 0, 300, stack.check_alive)
        load.stop()
        load = None
        record.mark("done")
        return summarise(record, wake_start, wake, woken_pod, step_at, stop_at, down_1, down_0)
    finally:
        if load is not None:
            load.stop()
        stop.set()


def summarise(record: Record, wake_start: float, wake: Request, woken_pod: str, step_at: float | None,
              stop_at: float, down_1: float, down_0: float) -> dict:
    with record.lock:
        requests = list(record.requests)
        pods = dict(record.pods)
        desired = list(record.desired)
    assert step_at is not None and wake.first is not None
    first_pod = min(pods.values(), key=lambda p: p.added)
    woken = pods[woken_pod]
    assert None not in (woken.ready, woken.serving, first_pod.ready, first_pod.serving)
    new_name, new = min(((n, p) for n, p in pods.items() if p.added > step_at), key=lambda x: x[1].added)
    assert new.ready is not None
    served_new = sorted(r.start for r in requests if r.replica and r.replica.endswith("/" + new_name))
    decided_2 = next(t for t, d in desired if d == 2 and t >= step_at)
    failed = [r for r in requests if r.error]
    on_plateau = [r for r in requests if r.first is not None and r.start >= step_at and r.start < stop_at]
    one_replica = [r.first - r.start for r in on_plateau if r.start < new.ready]  # type: ignore[operator]
    two_replicas = [r.first - r.start for r in on_plateau if r.start >= new.ready]  # type: ignore[operator]
    return {
        "requests": len(requests), "failed": len(failed), "errors": sorted({r.error for r in failed})[:5],
        "first_load_s": first_pod.serving - first_pod.added,  # type: ignore[operator]
        "wake_s": wake.first - wake_start,
        "woken_load_s": woken.serving - woken.added,  # type: ignore[operator]
        "wake_to_pod_s": woken.added - wake_start,
        "serving_to_ready_s": woken.ready - woken.serving,  # type: ignore[operator]
        "ready_to_token_s": wake.first - woken.ready,  # type: ignore[operator]
        "step_to_new_first_s": served_new[0] - step_at if served_new else math.nan,
        "step_to_decision_s": decided_2 - step_at,
        "decision_to_pod_s": new.added - decided_2,
        "new_load_s": (new.serving or new.ready) - new.added,
        "new_serving_to_ready_s": new.ready - (new.serving or new.ready),
        "ready_to_first_s": served_new[0] - new.ready if served_new else math.nan,
        "ttft_one_p50_ms": _pct(one_replica, 50) * 1000, "ttft_two_p50_ms": _pct(two_replicas, 50) * 1000,
        "ttft_one_p99_ms": _pct(one_replica, 99) * 1000, "ttft_two_p99_ms": _pct(two_replicas, 99) * 1000,
        "stop_to_one_s": down_1 - stop_at, "stop_to_zero_s": down_0 - stop_at,
    }


def _pct(values: list[float], p: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1))))]


# --- the report ---------------------------------------------------------------------------


def render(r: dict, cmd: str) -> str:
    delay = AUTOSCALING["scaleDownDelaySeconds"]
    overhead = r["wake_s"] - r["woken_load_s"]
    return f"""## Autoscaling: idle, wake from zero, a ramp, a plateau, a stop

Command: {cmd}.

One ModelEndpoint of the embedded model (`minReplicas: 0`, `maxReplicas: 2`,
`targetRequests: 4`, `scaleDownDelaySeconds: {delay}`) on the real node, with the
chart's operator and gateway in their containers and the chart's defaults (the
autoscaler samples every 5 s). The load comes from the official OpenAI SDK through
the gateway's base URL, streamed chat completions of at most {MAX_TOKENS} tokens, no
client retries: idle until zero, one request to wake it, a ramp from 1 to {RAMP_TO}
streams (one more every {RAMP_STEP_S:.0f} s), a plateau until the new replica has served
for {PLATEAU_AFTER_NEW_S:.0f} s, then nothing. A pod's "load time" runs from its creation
(the benchmark's watch) to its runtime's first 200 on `/ready` (polled on the pod's IP
every 100 ms): scheduling, the container's start and the model's load, which no
autoscaler can shorten. What the system adds on top is the rest of the wake.

| Measure | Result | Target | Met |
|---|---|---|---|
| Requests failed, of {r['requests']} | {r['failed']} | 0 | {benchdoc.met(r['failed'] == 0)} |
| Wake from zero: request sent -> first token | {r['wake_s']:.1f} s | | |
| &nbsp;&nbsp;the woken pod's load time (created -> its runtime ready) | {r['woken_load_s']:.1f} s | | |
| &nbsp;&nbsp;wake time minus load time | {overhead:.1f} s | at most {TARGET_WAKE_OVERHEAD_S:.0f} s \
| {benchdoc.met(overhead <= TARGET_WAKE_OVERHEAD_S)} |
| &nbsp;&nbsp;of which: request -> pod created | {r['wake_to_pod_s']:.2f} s | within 1 s \
| {benchdoc.met(r['wake_to_pod_s'] <= 1.0)} |
| &nbsp;&nbsp;of which: runtime ready -> the pod's Ready condition (probes) | {r['serving_to_ready_s']:.2f} s | | |
| &nbsp;&nbsp;of which: pod Ready -> first token | {r['ready_to_token_s']:.2f} s | | |
| The first replica's load time (for comparison) | {r['first_load_s']:.1f} s | | |
| Load step (5 streams) -> the new replica's first request | {r['step_to_new_first_s']:.1f} s | | |
| &nbsp;&nbsp;step -> the autoscaler's decision (2 replicas) | {r['step_to_decision_s']:.1f} s | | |
| &nbsp;&nbsp;decision -> pod created | {r['decision_to_pod_s']:.2f} s | | |
| &nbsp;&nbsp;pod created -> its runtime ready (its load, beside a busy replica) | {r['new_load_s']:.1f} s | | |
| &nbsp;&nbsp;runtime ready -> the pod's Ready condition | {r['new_serving_to_ready_s']:.2f} s | | |
| &nbsp;&nbsp;Ready -> its first request | {r['ready_to_first_s']:.2f} s | | |
| Time to first token on the ramp and plateau, p50 / p99: one replica \
| {r['ttft_one_p50_ms']:.0f} / {r['ttft_one_p99_ms']:.0f} ms | | |
| Time to first token on the plateau, p50 / p99: two replicas \
| {r['ttft_two_p50_ms']:.0f} / {r['ttft_two_p99_ms']:.0f} ms | | |
| Load stops -> one replica | {r['stop_to_one_s']:.1f} s | after {delay} s | \
{benchdoc.met(r['stop_to_one_s'] >= delay)} |
| Load stops -> zero replicas (nothing served for the delay) | {r['stop_to_zero_s']:.1f} s | after {delay} s | \
{benchdoc.met(r['stop_to_zero_s'] >= delay)} |

![load, replicas and time to first token over the run](autoscale.png)

Machine: {benchdoc.machine()}. Both engines, the control plane, the node, the
operator, the gateway and the load generator share these cores, so the engines'
times (load, first token) are this machine's; the autoscaler's and the gateway's parts
(decision, pod created, Ready -> first request) are the comparable figures.
"""


def plot(record: Record, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with record.lock:
        t0 = record.marks.get("idle", record.t0)
        end = record.marks.get("done", time.monotonic())
        requests = list(record.requests)
        target, load, desired = list(record.target), list(record.load), list(record.desired)
        pods = dict(record.pods)

    def rel(t: float) -> float:
        return t - t0

    fig, (ax_load, ax_rep, ax_ttft) = plt.subplots(3, 1, figsize=(10, 8), sharex=True)
    if target:
        xs = [rel(t) for t, _ in target] + [rel(end)]
        ax_load.step(xs, [n for _, n in target] + [target[-1][1]], where="post", label="streams sent (the pattern)")
    ax_load.plot([rel(t) for t, _ in load], [v for _, v in load], ".", markersize=3,
                 label="load the operator sees (in flight + held)")
    ax_load.set_ylabel("requests")
    ax_load.legend(loc="upper left", fontsize=8)

    if desired:
        xs = [rel(t) for t, _ in desired] + [rel(end)]
        ax_rep.step(xs, [d for _, d in desired] + [desired[-1][1]], where="post", label="desired (autoscaler)")
    changes = sorted({t for p in pods.values() for t in (p.ready, p.gone) if t is not None})
    ready = [(rel(t), record.ready_pods(t)) for t in changes]
    if ready:
        ax_rep.step([x for x, _ in ready] + [rel(end)], [n for _, n in ready] + [ready[-1][1]], where="post",
                    linestyle="--", label="ready replicas")
    ax_rep.set_ylabel("replicas")
    ax_rep.set_yticks([0, 1, 2])
    ax_rep.legend(loc="upper left", fontsize=8)

    names = sorted({r.replica for r in requests if r.replica})
    for name in names:
        mine = [r for r in requests if r.replica == name and r.first is not None and r.start >= t0]
        ax_ttft.plot([rel(r.start) for r in mine], [r.first - r.start for r in mine], ".", markersize=3,  # type: ignore[operator]
                     label=name.split("/")[-1])
    bad = [r for r in requests if r.error]
    if bad:
        ax_ttft.plot([rel(r.start) for r in bad], [1.0] * len(bad), "rx", label="failed")
    ax_ttft.set_yscale("log")
    ax_ttft.set_ylabel("time to first token (s)")
    ax_ttft.set_xlabel("seconds since the idle phase began")
    ax_ttft.legend(loc="upper left", fontsize=8)
    for ax in (ax_load, ax_rep, ax_ttft):
        for what in ("at zero", "wake: one request to the model at zero", "ramp", "stop: no load"):
            if what in record.marks:
                ax.axvline(rel(record.marks[what]), color="grey", linewidth=0.5)
    fig.suptitle("make bench-autoscale: one ModelEndpoint through the gateway")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-write", action="store_true", help="print the table; leave docs/ as it is")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    import embedded_model

    state = localcluster.default_cache_dir() / "bench-autoscale"
    import shutil

    shutil.rmtree(state, ignore_errors=True)
    record = Record()
    stack = dev.start_local_stack(state, embedded_model.hf_home())
    try:
        stack.wait_listening()
        dev.step("installing the chart")
        dev.helm_install(stack.cp, *HELM_VALUES, check_alive=stack.check_alive)
        result = run(stack, record)
    finally:
        stack.stop()
    print(json.dumps(result, indent=2))
    section = render(result, benchdoc.command("hack/bench_autoscale.py", "bench-autoscale", sys.argv[1:]))
    print(section)
    if not args.no_write:
        plot(record, PNG)
        benchdoc.write_section("autoscale", section, after="gateway")
    else:
        plot(record, state / "autoscale.png")
        print(f"plot: {state / 'autoscale.png'}", file=sys.stderr)
    return 0 if result["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
