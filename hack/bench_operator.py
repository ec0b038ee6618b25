"""make bench-operator: 1,000 ModelEndpoints across 10 namespaces on a local control plane.

Starts its own control plane (hack/localcluster.py: etcd, API server,
controller-manager, scheduler, kwok) plus extra kwok nodes so every runtime pod
can be placed, installs the CRDs, runs the operator as its console script, creates
the ModelEndpoints and watches (not polls) for each one's Deployment, Service and
status. Reports per-object p50/p99 time to converge, the total, the operator's
peak resident memory and its API requests per object against the issue's targets
(all converged within 120 s, peak memory under 150 MiB), and writes the table, with
the command that produced it, into docs/benchmarks.md between the
``<!-- bench-operator:start -->`` and ``<!-- bench-operator:end -->`` markers
(appended after the runtime section when they are missing; --no-write to skip).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HACK = Path(__file__).resolve().parent
REPO = HACK.parent
sys.path.insert(0, str(HACK))

import benchdoc  # noqa: E402
import localcluster  # noqa: E402
import testbed_nodes  # noqa: E402

GROUP, VERSION, PLURAL = "serving.modelendpoint.dev", "v1alpha1", "modelendpoints"
OPERATOR_BIN = Path(sys.executable).parent / "modelendpoint-operator"
# The targets: every ModelEndpoint converged within, the operator's peak memory under.
TARGET_TOTAL_S, TARGET_PEAK_MIB = 120.0, 150.0


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1))))
    return ordered[k]


def scrape(url: str, prefix: str, **match: str) -> float:
    """Sum of the samples of metric ``prefix`` whose labels include ``match``."""
    with urllib.request.urlopen(url, timeout=30) as r:
        text = r.read().decode()
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(prefix + "{") and not line.startswith(prefix + " "):
            continue
        key, value = line.rsplit(" ", 1)
        if all(f'{k}="{v}"' in key for k, v in match.items()):
            total += float(value)
    return total


class Tracker:
    """First-seen times of each ModelEndpoint's creation, children and status, from watches."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.created: dict[tuple[str, str], float] = {}
        self.deployment: dict[tuple[str, str], float] = {}
        self.service: dict[tuple[str, str], float] = {}
        self.status: dict[tuple[str, str], float] = {}
        self.stop = threading.Event()

    def done(self, key: tuple[str, str]) -> float | None:
        with self.lock:
            parts = [d.get(key) for d in (self.created, self.deployment, self.service, self.status)]
        return None if None in parts else max(parts)

    def watch(self, list_fn, record) -> None:
        from kubernetes import watch

        rv = None
        while not self.stop.is_set():
            w = watch.Watch()
            try:
                kwargs = {"timeout_seconds": 30, "allow_watch_bookmarks": False}
                if rv:
                    kwargs["resource_version"] = rv
                # Through a lambda the client yields plain dicts (no model types).
                for event in w.stream(list_fn, **kwargs):
                    obj = event["object"]
                    rv = obj["metadata"]["resourceVersion"]
                    record(event["type"], obj, time.monotonic())
                    if self.stop.is_set():
                        break
            except Exception as exc:  # noqa: BLE001 - a watch expired or broke: resume from a list
                print(f"(watch restarted: {exc!r:.200})", file=sys.stderr)
                rv = None
                time.sleep(0.2)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--namespaces", type=int, default=10)
    parser.add_argument("--replicas", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument("--no-write", action="store_true", help="don't update the docs table")
    args = parser.parse_args()

    from kubernetes import client, config

    # SIGTERM (a timeout, Ctrl-C from make) still stops everything the benchmark started.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    work = Path(tempfile.mkdtemp(prefix="bench-operator-"))
    print(f"==> starting a control plane in {work}", file=sys.stderr)
    cp = localcluster.start(work / "cluster")
    op = None
    tracker = Tracker()
    try:
        # Room for every runtime pod on simulated CPU nodes (the GPU nodes are tainted):
        # kwok nodes take 110 pods each.
        nodes = {"apiVersion": "v1", "kind": "List", "items": [
            testbed_nodes.cpu_node_manifest(f"kwok-bench-{i}")
            for i in range(-(-args.count * args.replicas // 100))]}
        cp.kubectl("apply", "-f", "-", input=json.dumps(nodes))
        cp.kubectl("apply", "--server-side", "-f", str(REPO / "crds"))
        cp.kubectl("wait", "--for=condition=Established", "--timeout=60s",
                   "crd/modelendpoints.serving.modelendpoint.dev", "crd/clusterkopfpeerings.kopf.dev")
        namespaces = [f"bench-{i}" for i in range(args.namespaces)]
        for ns in namespaces:
            cp.kubectl("create", "namespace", ns)

        api = config.new_client_from_config(config_file=str(cp.kubeconfig))
        api.configuration.connection_pool_maxsize = 16
        custom, apps, core = client.CustomObjectsApi(api), client.AppsV1Api(api), client.CoreV1Api(api)

        def on_mep(kind, obj, t):
            key = (obj["metadata"]["namespace"], obj["metadata"]["name"])
            with tracker.lock:
                tracker.created.setdefault(key, t)
                if (obj.get("status") or {}).get("phase"):
                    tracker.status.setdefault(key, t)

        def on_child(store):
            def record(kind, obj, t):
                labels = obj["metadata"].get("labels") or {}
                owner = labels.get("serving.modelendpoint.dev/endpoint")
                if owner and kind != "DELETED":
                    with tracker.lock:
                        store.setdefault((obj["metadata"]["namespace"], owner), t)
            return record

        watchers = [
            threading.Thread(target=tracker.watch, daemon=True, args=(
                lambda **kw: custom.list_cluster_custom_object(GROUP, VERSION, PLURAL, **kw), on_mep)),
            threading.Thread(target=tracker.watch, daemon=True, args=(
                lambda **kw: apps.list_deployment_for_all_namespaces(**kw), on_child(tracker.deployment))),
            threading.Thread(target=tracker.watch, daemon=True, args=(
                lambda **kw: core.list_service_for_all_namespaces(**kw), on_child(tracker.service))),
        ]
        for t in watchers:
            t.start()

        metrics_port, liveness_port = localcluster.free_ports(2)
        env = dict(cp.env())
        env.update({"MEP_OPERATOR_METRICS_PORT": str(metrics_port),
                    "MEP_OPERATOR_LIVENESS_PORT": str(liveness_port),
                    "MEP_OPERATOR_BIND_ADDRESS": "127.0.0.1",
                    "MEP_OPERATOR_LOG_LEVEL": "warning"})
        log = open(work / "operator.log", "wb")
        op = subprocess.Popen([str(OPERATOR_BIN)], env=env, stdout=log, stderr=subprocess.STDOUT,
                              start_new_session=True)
        metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
        deadline = time.monotonic() + 60
        while True:
            try:
                scrape(metrics_url, "modelendpoint_operator_endpoints")
                break
            except OSError:
                if op.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the operator did not start; see {work / 'operator.log'}") from None
                time.sleep(0.2)

        def apiserver_patches() -> float:
            out = cp.kubectl("get", "--raw", "/metrics")
            total = 0.0
            for line in out.splitlines():
                if (line.startswith("apiserver_request_total{") and 'resource="modelendpoints"' in line
                        and 'verb="PATCH"' in line and 'subresource=""' in line):
                    total += float(line.rsplit(" ", 1)[1])
            return total

        requests_before = scrape(metrics_url, "modelendpoint_operator_api_requests_total")
        events_before = scrape(metrics_url, "modelendpoint_operator_api_requests_total", resource="Event")
        patches_before = apiserver_patches()

        print(f"==> creating {args.count} ModelEndpoints in {args.namespaces} namespaces",
              file=sys.stderr)
        started = time.monotonic()

        def create(i: int) -> None:
            ns = namespaces[i % len(namespaces)]
            body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "ModelEndpoint",
                    "metadata": {"name": f"m{i:04d}", "namespace": ns},
                    "spec": {"model": "bench/model", "servedModelName": f"bench-{i:04d}", "gpus": 0,
                             "replicas": args.replicas}}
            custom.create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, body)

        with ThreadPoolExecutor(8) as pool:
            list(pool.map(create, range(args.count)))
        created_in = time.monotonic() - started
        keys = [(namespaces[i % len(namespaces)], f"m{i:04d}") for i in range(args.count)]
        peak_rss = 0
        while True:
            finished = [tracker.done(k) for k in keys]
            try:
                with open(f"/proc/{op.pid}/status") as f:
                    for line in f:
                        if line.startswith("VmHWM:"):
                            peak_rss = max(peak_rss, int(line.split()[1]))
            except FileNotFoundError:
                raise RuntimeError(f"the operator died; see {work / 'operator.log'}") from None
            if all(finished):
                break
            if time.monotonic() - started > args.timeout:
                raise RuntimeError(f"{sum(map(bool, finished))}/{args.count} converged after "
                                   f"{args.timeout:.0f}s; see {work / 'operator.log'}")
            time.sleep(0.5)
        latencies = [done - tracker.created[k] for k, done in zip(keys, finished, strict=True)]
        total = max(finished) - started
        requests = scrape(metrics_url, "modelendpoint_operator_api_requests_total") - requests_before
        kopf_patches = apiserver_patches() - patches_before
        time.sleep(5)  # the pods' status traffic settles; memory keeps its peak
        with open(f"/proc/{op.pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    peak_rss = max(peak_rss, int(line.split()[1]))
        # The operator posts an Event per phase transition (one POST each, counted in its
        # own request metric as resource "Event"), checked against the Event objects.
        events = scrape(metrics_url, "modelendpoint_operator_api_requests_total", resource="Event") - events_before
        about_meps = f"involvedObject.kind=ModelEndpoint,involvedObject.apiVersion={GROUP}/{VERSION}"
        event_objects = sum(len(core.list_namespaced_event(ns, field_selector=about_meps).items)
                            for ns in namespaces)
        phases: dict[str, int] = {}
        for ns in namespaces:
            for item in custom.list_namespaced_custom_object(GROUP, VERSION, ns, PLURAL)["items"]:
                phase = (item.get("status") or {}).get("phase", "none")
                phases[phase] = phases.get(phase, 0) + 1

        result = {
            "count": args.count, "namespaces": args.namespaces, "replicas": args.replicas,
            "p50": percentile(latencies, 50), "p99": percentile(latencies, 99),
            "max": max(latencies), "total": total, "created_in": created_in,
            "peak_rss_mib": peak_rss / 1024,
            "reconciler_requests_per_object": (requests - events) / args.count,
            "kopf_patches_per_object": kopf_patches / args.count,
            "event_posts_per_object": events / args.count,
            "event_objects_per_object": event_objects / args.count,
            "phases": phases,
        }
        print(json.dumps(result, indent=2))
        section = render(result, benchdoc.command("hack/bench_operator.py", "bench-operator", sys.argv[1:]))
        print(section)
        if not args.no_write:
            benchdoc.write_section("operator", section, after="runtime")
        return 0
    finally:
        tracker.stop.set()
        if op is not None and op.poll() is None:
            os.killpg(op.pid, signal.SIGTERM)
            try:
                op.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(op.pid, signal.SIGKILL)
        cp.stop()


def render(r: dict, cmd: str) -> str:
    """The docs section (Markdown, without the markers) for the results ``r``."""
    phases = ", ".join(f"{k} {v}" for k, v in sorted(r["phases"].items()))
    all_requests = (r["reconciler_requests_per_object"] + r["kopf_patches_per_object"]
                    + r["event_posts_per_object"])
    return f"""## Operator: {r['count']:,} ModelEndpoints across {r['namespaces']} namespaces

Command: {cmd}.

{r['count']:,} ModelEndpoints (`gpus: 0`, `replicas: {r['replicas']}`, each its own
`servedModelName`) created across
{r['namespaces']} namespaces by 8 client threads on the local control plane (etcd,
kube-apiserver, controller-manager, scheduler, kwok nodes; started by the benchmark
itself), one operator process. "Converged" is the moment the benchmark's watches
have seen the ModelEndpoint, its Deployment, its Service and a `status.phase`;
the time per object counts from the ModelEndpoint's creation.

| Measure | Result | Target | Met |
|---|---|---|---|
| Time to converge per object, p50 | {r['p50']:.2f} s | | |
| Time to converge per object, p99 | {r['p99']:.2f} s | | |
| Time to converge per object, max | {r['max']:.2f} s | | |
| All {r['count']:,} converged after (from the first create) | {r['total']:.1f} s \
| within {TARGET_TOTAL_S:.0f} s | {benchdoc.met(r['total'] <= TARGET_TOTAL_S)} |
| Creating them took (client side) | {r['created_in']:.1f} s | | |
| Operator peak resident memory (VmHWM) | {r['peak_rss_mib']:.0f} MiB \
| under {TARGET_PEAK_MIB:.0f} MiB | {benchdoc.met(r['peak_rss_mib'] < TARGET_PEAK_MIB)} |
| API requests of the reconciler per object (applies, status patches, reads) \
| {r['reconciler_requests_per_object']:.2f} | | |
| PATCHes of ModelEndpoints per object (kopf's bookkeeping; none: no change handlers) \
| {r['kopf_patches_per_object']:.2f} | | |
| Event POSTs (phase transitions) per object \
| {r['event_posts_per_object']:.2f} (Event objects: {r['event_objects_per_object']:.2f}) | | |
| All of the above: API requests per object | {all_requests:.2f} | | |

Phases when converged: {phases} (kwok runs the pods; status keeps following them).

What is counted, from the first create until every object converged: the operator's
requests by its own metric `modelendpoint_operator_api_requests_total` (server-side
applies of the children, status patches, Secret reads, and any GETs and deletes; its
Event POSTs, one per phase transition, in their own row and checked against the Event
objects about ModelEndpoints in the namespaces); PATCHes of `modelendpoints` by the API
server's `apiserver_request_total`, which only kopf's bookkeeping would send (the
operator registers only event handlers, so there are none). Not counted: the watch
streams and their initial LISTs (one per resource kind, not per object), kopf's
peering keep-alives and the operator's reads of the peering object (per period, not
per object), and the requests before the first create.

Machine: {benchdoc.machine()}; the machine was shared with other work, so times
are an upper bound.
"""


if __name__ == "__main__":
    sys.exit(main())
