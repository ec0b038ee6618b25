"""make bench-gateway: what the gateway adds to a stream, against clients going direct and vllm-router.

One run, the paths side by side at each concurrency (64, 256, 1,024 streams
by default, the order of the paths rotating between rounds):

- direct: the load generator straight to two fast fake OpenAI stream servers
  (hack/bench/fake_openai.py: 64 chunks 20 ms apart, on loopback);
- gateway: through ``modelendpoint-gateway`` (its console script, as the chart
  runs it, with its default of one process) on a local control plane
  (hack/localcluster.py) that holds one ModelEndpoint and two ready runtime
  pods pointing at the two fake servers;
- gateway-2w: the same with ``MEP_GATEWAY_WORKERS=2`` (a supervisor and two
  worker processes on the port; ``--workers`` chooses the variants; measured
  only when the proxy has that many CPUs);
- gateway-compiled: the same with ``MEP_GATEWAY_DATA_PLANE=compiled`` (the
  Rust data plane on the port, one thread, the Python process its control
  plane; ``--data-planes`` chooses);
- vllm-router: through ``vllm-router`` 0.1.17 from PyPI (installed with uv
  into its own venv under ~/.cache/modelendpoint/bench, never into .venv) in
  its default mode (a thread per core), the same two workers,
  ``--policy round_robin``.

The proxy under test is pinned to the last CPU (``--proxy-cpus``) and
everything else (load generators, fake servers, control plane) to the rest,
the same for every path, so a proxy's work does not slow the clients that
time it.

The load generator (hack/bench/loadgen.py; two processes above 64 streams)
keeps N keep-alive streams going for a warm-up and a measured window and
reports errors, time to first byte, gaps between chunks and completed streams.
The proxy's CPU (user + system of its processes and their threads, /proc)
over the window per 1,000 chunks delivered, and its largest memory (PSS
summed over its processes, so pages shared by a supervisor and its workers
count once), come from /proc. Results are pooled over the rounds. Writes the table, the targets and the command into
docs/benchmarks.md between ``<!-- bench-gateway:start -->`` and
``<!-- bench-gateway:end -->`` (appended at the end when missing; --no-write
to skip) and docs/gateway-latency.png (added time to first byte against
concurrency for both proxies).
"""

from __future__ import annotations

import argparse
import array
import contextlib
import datetime
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

HACK = Path(__file__).resolve().parent
REPO = HACK.parent
sys.path.insert(0, str(HACK))

import localcluster  # noqa: E402

PY = Path(sys.executable)
GATEWAY_BIN = PY.parent / "modelendpoint-gateway"
UV = PY.parent / "uv"
ROUTER_VERSION = "0.1.17"
DOC = REPO / "docs" / "benchmarks.md"
PLOT = REPO / "docs" / "gateway-latency.png"
START, END = "<!-- bench-gateway:start -->", "<!-- bench-gateway:end -->"
MODEL = "bench-model"
NS = "bench"
NODE = "bench-node"
# The targets.
TARGET_TTFB_P50_MS_AT_256 = 1.0
TARGET_THROUGHPUT = 0.97
TARGET_VS_ROUTER = 1.5


def log(msg: str) -> None:
    print(f"==> {msg}", file=sys.stderr, flush=True)


# --- processes ----------------------------------------------------------------------------------


class Proc:
    """A child process with its log; stopped with SIGTERM, then SIGKILL."""

    def __init__(self, name: str, argv: list[str], log_dir: Path, env: dict[str, str] | None = None,
                 cpus: set[int] | None = None) -> None:
        self.name = name
        self.log_path = log_dir / f"{name}.log"

        def preexec() -> None:
            localcluster.die_with_starter()
            if cpus:
                os.sched_setaffinity(0, cpus)

        with open(self.log_path, "wb") as out:
            self.p = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                      env=env, start_new_session=True, preexec_fn=preexec)

    @property
    def pid(self) -> int:
        return self.p.pid

    def alive(self) -> bool:
        return self.p.poll() is None

    def stop(self) -> None:
        if self.p.poll() is None:
            os.killpg(self.p.pid, signal.SIGTERM)
            try:
                self.p.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.p.pid, signal.SIGKILL)
                self.p.wait(5)

    def tail(self, n: int = 20) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])


def process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants (a gateway supervisor's workers)."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                parents[int(entry)] = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
    tree, frontier = [pid], [pid]
    while frontier:
        frontier = [child for child, parent in parents.items() if parent in frontier]
        tree += frontier
    return tree


def cpu_seconds(pids: list[int]) -> tuple[float, float]:
    """User and system CPU of processes (all their threads), in seconds."""
    user = system = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            user += int(fields[11])
            system += int(fields[12])
    tick = os.sysconf("SC_CLK_TCK")
    return user / tick, system / tick


def pss_mib(pids: list[int]) -> float:
    """Proportional set size summed over processes: memory shared between them counts once."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1])
    return total / 1024


def wait_http(url: str, what: str, proc: Proc | None = None, timeout: float = 120, expect: bytes = b"") -> None:
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if proc is not None and not proc.alive():
            raise SystemExit(f"{proc.name} exited while waiting for {what}:\n{proc.tail()}")
        try:
            with urllib.request.urlopen(url, timeout=3) as r:
                body = r.read()
                if r.status == 200 and expect in body:
                    return
        except Exception as exc:  # noqa: BLE001 - not yet
            last = str(exc)
        time.sleep(0.25)
    raise SystemExit(f"timed out waiting for {what} ({last})")


def router_venv() -> Path:
    """vllm-router in its own venv (uv), built once; never in .venv."""
    venv = localcluster.default_cache_dir() / "bench" / f"vllm-router-{ROUTER_VERSION}"
    exe = venv / "bin" / "vllm-router"
    if not exe.exists():
        log(f"installing vllm-router {ROUTER_VERSION} into {venv} (uv)")
        subprocess.run([str(UV), "venv", "-q", "--python", sys.executable, str(venv)], check=True)
        subprocess.run([str(UV), "pip", "install", "-q", "--python", str(venv / "bin" / "python"),
                        f"vllm-router=={ROUTER_VERSION}"], check=True)
    return exe


# --- the cluster view the gateway watches ---------------------------------------------------------------


def now_rfc3339() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def setup_cluster(cp: localcluster.ControlPlane, ports: list[int]) -> threading.Event:
    """The CRD, a ModelEndpoint with its status, a heartbeating node and two ready pods on it.

    No operator runs here: the benchmark writes the status the operator would
    write, and plays the kubelet for the two pods (Running, 127.0.0.1, Ready),
    whose container port ``http`` is a fake server's port.
    """
    k = cp.kubectl
    k("apply", "--server-side", "-f", str(REPO / "crds" / "modelendpoints.yaml"))
    k("wait", "--for=condition=Established", "--timeout=60s", "crd/modelendpoints.serving.modelendpoint.dev")
    k("create", "namespace", NS)

    def apply(obj: dict) -> None:
        k("apply", "--server-side", "--field-manager=bench", "-f", "-", input=json.dumps(obj))

    apply({"apiVersion": "v1", "kind": "Node", "metadata": {"name": NODE},
           "spec": {"taints": [{"key": "bench", "value": "true", "effect": "NoSchedule"}]}})
    stop = threading.Event()

    def beat() -> None:
        now = now_rfc3339()
        k("patch", "node", NODE, "--subresource=status", "--type=merge", "-p", json.dumps({"status": {
            "conditions": [{"type": "Ready", "status": "True", "reason": "Bench", "message": "bench",
                            "lastHeartbeatTime": now, "lastTransitionTime": now}]}}))
        apply({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
               "metadata": {"name": NODE, "namespace": "kube-node-lease"},
               "spec": {"holderIdentity": NODE, "leaseDurationSeconds": 40,
                        "renewTime": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")}})

    beat()

    def loop() -> None:
        while not stop.wait(10):
            try:
                beat()
            except Exception:  # noqa: BLE001 - the next beat tries again
                pass

    threading.Thread(target=loop, daemon=True).start()
    apply({"apiVersion": "serving.modelendpoint.dev/v1alpha1", "kind": "ModelEndpoint",
           "metadata": {"name": "bench", "namespace": NS},
           "spec": {"model": "bench/model", "servedModelName": MODEL, "gpus": 0, "replicas": 2}})
    k("patch", "mep", "bench", "-n", NS, "--subresource=status", "--type=merge", "-p", json.dumps(
        {"status": {"servedModelName": MODEL, "phase": "Ready", "readyReplicas": 2}}))
    labels = {"app.kubernetes.io/managed-by": "modelendpoint-operator", "serving.modelendpoint.dev/endpoint": "bench",
              "app.kubernetes.io/name": "modelendpoint-runtime", "app.kubernetes.io/instance": "bench",
              "app.kubernetes.io/component": "model-server"}
    for i, port in enumerate(ports):
        name = f"bench-{i}"
        apply({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": NS, "labels": labels},
               "spec": {"nodeName": NODE, "tolerations": [{"key": "bench", "operator": "Exists"}],
                        "containers": [{"name": "runtime", "image": "bench/none",
                                        "ports": [{"name": "http", "containerPort": port}]}]}})
        k("patch", "pod", name, "-n", NS, "--subresource=status", "--type=merge", "-p", json.dumps({"status": {
            "phase": "Running", "podIP": "127.0.0.1", "podIPs": [{"ip": "127.0.0.1"}], "hostIP": "127.0.0.1",
            "conditions": [{"type": "Ready", "status": "True", "lastTransitionTime": now_rfc3339()}]}}))
    return stop


# --- one measurement -------------------------------------------------------------------------------------


class Point:
    """Pooled results of one path at one concurrency."""

    def __init__(self) -> None:
        self.ttfb = array.array("d")
        self.gaps = array.array("d")
        self.ok = 0
        self.errors = 0
        self.error_kinds: dict[str, int] = {}
        self.events = 0
        self.window = 0.0
        self.cpu = 0.0
        self.cpu_system = 0.0
        self.rss = 0.0
        # Each round's TTFB p50 and p99 (ms), to show how much a figure moves from one round to the next.
        self.round_ttfb: list[tuple[float, float]] = []
        self._round_start = 0

    def add(self, prefix: Path) -> None:
        res = json.loads(prefix.with_suffix(".json").read_text())
        self.ok += res["ok"]
        self.errors += res["errors"]
        for k, v in res["error_kinds"].items():
            self.error_kinds[k] = self.error_kinds.get(k, 0) + v
        self.events += res["events"]
        for arr, ext in ((self.ttfb, ".ttfb"), (self.gaps, ".gaps")):
            data = prefix.with_suffix(ext).read_bytes()
            arr.frombytes(data)

    def end_round(self) -> None:
        this = self.ttfb[self._round_start:]
        self._round_start = len(self.ttfb)
        self.round_ttfb.append((self.pct(this, 50) * 1000, self.pct(this, 99) * 1000))

    @staticmethod
    def pct(values: array.array, p: float) -> float:
        if not values:
            return float("nan")
        ordered = sorted(values)
        return ordered[max(0, min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1))))]

    def summary(self) -> dict:
        return {
            "streams": self.ok, "errors": self.errors, "error_kinds": self.error_kinds,
            "ttfb_p50_ms": self.pct(self.ttfb, 50) * 1000, "ttfb_p99_ms": self.pct(self.ttfb, 99) * 1000,
            "gap_p99_ms": self.pct(self.gaps, 99) * 1000,
            "streams_per_s": self.ok / self.window if self.window else 0.0,
            "cpu_per_1000_chunks_s": self.cpu / self.events * 1000 if self.events and self.cpu else None,
            "cpu_system_share": self.cpu_system / self.cpu if self.cpu else None,
            "round_ttfb_ms": self.round_ttfb,
            "rss_mib": self.rss or None,
        }


def measure(point: Point, targets: str, proxy_pid: int | None, concurrency: int, warmup: float, duration: float,
            out_dir: Path, tag: str) -> None:
    parts = 1 if concurrency <= 64 else 2
    gens = []
    prefixes = []
    for i in range(parts):
        prefix = out_dir / f"{tag}-{i}"
        prefixes.append(prefix)
        gens.append(subprocess.Popen([
            str(PY), str(HACK / "bench" / "loadgen.py"), "--target", targets, "--model", MODEL,
            "--concurrency", str(concurrency // parts), "--warmup", str(warmup), "--duration", str(duration),
            "--out", str(prefix)], stdin=subprocess.DEVNULL, start_new_session=True,
            preexec_fn=localcluster.die_with_starter))
    time.sleep(warmup)
    pids = process_tree(proxy_pid) if proxy_pid else []
    cpu0 = cpu_seconds(pids)
    t_end = time.monotonic() + duration
    rss = 0.0
    while time.monotonic() < t_end:
        if pids:
            rss = max(rss, pss_mib(pids))
        time.sleep(0.25)
    cpu1 = cpu_seconds(pids)
    for g in gens:
        if g.wait(180) != 0:
            raise SystemExit(f"the load generator failed ({tag})")
    for prefix in prefixes:
        point.add(prefix)
    point.end_round()
    point.window += duration
    point.cpu += sum(cpu1) - sum(cpu0)
    point.cpu_system += cpu1[1] - cpu0[1]
    point.rss = max(point.rss, rss)


# --- the report ----------------------------------------------------------------------------------------


def fmt(v: float | None, digits: int = 2) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def share(fraction: float | None) -> str:
    return "" if fraction is None else f" ({fraction * 100:.0f} %)"


def round_spread(proxy: dict, direct: dict) -> str:
    added = [p99 - d99 for (_, p99), (_, d99) in zip(proxy["round_ttfb_ms"], direct["round_ttfb_ms"], strict=True)]
    return f" ({min(added):+.1f} to {max(added):+.1f})" if len(added) > 1 else ""


def label(path: str) -> str:
    if path == "gateway":
        return "gateway"
    if path == "gateway-compiled":
        return "gateway, compiled data plane"
    if path.startswith("gateway-"):
        return f"gateway, {path.removeprefix('gateway-').removesuffix('w')} workers"
    return path


def report(results: dict[tuple[str, int], dict], concurrencies: list[int], paths: list[str],
           args: argparse.Namespace, meta: dict) -> tuple[str, list[str]]:
    gateways = [p for p in paths if p.startswith("gateway")]
    variants = ", ".join(f"`{label(g)}`" for g in gateways)
    lines = ["## Gateway: what a proxy adds to a stream (direct, modelendpoint-gateway, vllm-router)", "",
             f"Command: `make bench-gateway` (= `.venv/bin/python hack/bench_gateway.py{meta['argv']}`).", "",
             f"Each stream is a streamed chat completion from a fast fake OpenAI server (hack/bench/fake_openai.py): "
             f"the role chunk at once, then {args.chunks} chunks {args.interval * 1000:.0f} ms apart, the finish "
             f"chunk and `[DONE]`; two such servers on loopback are the backends. Clients: "
             f"hack/bench/loadgen.py, keep-alive connections, each running one stream after another for "
             f"{args.warmup:.0f} s of warm-up and a {args.duration:.0f} s window, {args.rounds} rounds with the "
             f"order of the paths rotating; results pooled. The gateway ({variants}) is its console script "
             f"watching a local control plane (one ModelEndpoint, two ready pods on the fake servers' ports; "
             f"LeastRequests, access log on): `gateway` is its default, one process (one event loop, one CPU); "
             f"`gateway, N workers` sets `MEP_GATEWAY_WORKERS=N` (a supervisor and N worker processes sharing "
             f"the port), measured only when the proxy has that many CPUs; `gateway, compiled data plane` sets "
             f"`MEP_GATEWAY_DATA_PLANE=compiled` (the Rust data plane serves the port with one thread, the "
             f"Python process beside it as its control plane; both count as the proxy). "
             f"vllm-router {ROUTER_VERSION} (PyPI) runs in its default mode (a thread per core) with "
             f"`--policy round_robin` and the same two workers. Time to first byte: request written to the first "
             f"body byte at the client. Gap: time between two arrivals of stream data at the client. CPU: the "
             f"proxy's processes' user + system time over the window per 1,000 chunks delivered (SSE data "
             f"events), and in brackets the kernel's (system time's) share of it. Memory: the largest PSS of "
             f"the proxy's processes summed, during the window.", "",
             "| streams | path | errors | TTFB p50 (ms) | TTFB p99 (ms) | gap p99 (ms) | streams/s | "
             "CPU s / 1,000 chunks | peak memory (MiB) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for c in concurrencies:
        for path in paths:
            r = results[(path, c)]
            err = str(r["errors"]) + (f" ({', '.join(f'{k}: {v}' for k, v in r['error_kinds'].items())})"
                                      if r["errors"] else "")
            lines.append(f"| {c:,} | {label(path)} | {err} | {fmt(r['ttfb_p50_ms'])} | {fmt(r['ttfb_p99_ms'], 1)} | "
                         f"{fmt(r['gap_p99_ms'], 1)} | {fmt(r['streams_per_s'], 1)} | "
                         f"{fmt(r['cpu_per_1000_chunks_s'], 3)}{share(r['cpu_system_share'])} | "
                         f"{fmt(r['rss_mib'], 0)} |")
    proxies = gateways + ["vllm-router"]
    lines += ["", "Added time to first byte over direct (ms, p50 / p99 of the pooled rounds; in brackets the "
              "lowest and highest of the rounds' added p99, each against direct's p99 in the same round):", "",
              "| streams | " + " | ".join(label(p) for p in proxies) + " |",
              "|---|" + "---|" * len(proxies)]
    for c in concurrencies:
        d = results[("direct", c)]
        cells = [f"{results[(p, c)]['ttfb_p50_ms'] - d['ttfb_p50_ms']:+.2f} / "
                 f"{results[(p, c)]['ttfb_p99_ms'] - d['ttfb_p99_ms']:+.1f}{round_spread(results[(p, c)], d)}"
                 for p in proxies]
        lines.append(f"| {c:,} | " + " | ".join(cells) + " |")

    # Targets, for each gateway variant.
    def checks_of(gw: str) -> list[tuple[str, str, bool]]:
        out: list[tuple[str, str, bool]] = []
        top = max(concurrencies)
        g_top = results[(gw, top)]
        out.append((f"zero errors at {top:,} streams", str(g_top["errors"]), g_top["errors"] == 0))
        if 256 in concurrencies:
            added = results[(gw, 256)]["ttfb_p50_ms"] - results[("direct", 256)]["ttfb_p50_ms"]
            out.append(("TTFB p50 within 1 ms of direct at 256 streams", f"{added:+.2f} ms",
                        added <= TARGET_TTFB_P50_MS_AT_256))
        for c in concurrencies:
            ratio = results[(gw, c)]["streams_per_s"] / max(1e-9, results[("direct", c)]["streams_per_s"])
            out.append((f"throughput at least 0.97 of direct at {c:,}", f"{ratio:.3f}", ratio >= TARGET_THROUGHPUT))
        for c in concurrencies:
            g, v = results[(gw, c)]["cpu_per_1000_chunks_s"], results[("vllm-router", c)]["cpu_per_1000_chunks_s"]
            if g is not None and v:
                out.append((f"CPU per chunk at most 1.5x vllm-router's at {c:,}", f"{g / v:.2f}x",
                            g <= TARGET_VS_ROUTER * v))
        for c in concurrencies:
            d = results[("direct", c)]
            for q in ("p50", "p99"):
                ga = results[(gw, c)][f"ttfb_{q}_ms"] - d[f"ttfb_{q}_ms"]
                va = results[("vllm-router", c)][f"ttfb_{q}_ms"] - d[f"ttfb_{q}_ms"]
                # Below 0.2 ms both are within the noise of one loop iteration: compare against that floor.
                floor = max(va, 0.2)
                out.append((f"added TTFB {q} at most 1.5x vllm-router's at {c:,}",
                            f"{ga:+.2f} vs {va:+.2f} ms", ga <= TARGET_VS_ROUTER * floor))
        return out

    per = {gw: checks_of(gw) for gw in gateways}
    lines += ["", "| target | " + " | ".join(f"{label(g)} | met" for g in gateways) + " |",
              "|---|" + "---|---|" * len(gateways)]
    for i, (name, _, _) in enumerate(per[gateways[0]]):
        cells = []
        for gw in gateways:
            _, value, ok = per[gw][i]
            cells += [value, "yes" if ok else "**no**"]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "![added time to first byte against concurrency](gateway-latency.png)", "",
              f"Machine: {meta['cpus']} CPUs, {meta['mem_gib']:.0f} GiB RAM, CPython {platform.python_version()}, "
              f"measured {meta['date']}; load average before the run {meta['load']}, after it {meta['load_after']}. "
              + (f"The proxy under test (each gateway variant, vllm-router) is pinned to CPU "
                 f"{', '.join(map(str, meta['proxy_cpus']))} and the load generators, fake servers and control "
                 f"plane to CPU {', '.join(map(str, meta['load_cpus']))} (`--proxy-cpus`, sched_setaffinity), the "
                 f"same for every path, so a proxy's work does not take time from the clients that measure it; "
                 f"vllm-router's thread per core is then one thread, as the gateway is one process. Where the "
                 f"load CPUs saturate (the highest concurrency, direct included), the latencies there measure "
                 f"the machine; the CPU per chunk stays the comparable figure."
                 if meta["proxy_cpus"] else
                 "The load generators, the two fake servers and the proxy share these cores, so at the highest "
                 "concurrency every path is CPU-bound and the latencies there mostly measure the machine; the CPU "
                 "per chunk is the comparable figure."), ""]
    failed = [f"{label(gw)}: {name}" for gw in gateways for name, _, ok in per[gw] if not ok]
    return "\n".join(lines), failed


def write_doc(section: str) -> None:
    text = DOC.read_text() if DOC.exists() else "# Benchmarks\n"
    block = f"{START}\n{section}\n{END}"
    if (START in text) != (END in text):
        raise SystemExit(f"{DOC} has only one of {START} and {END}; fix it by hand")
    if START in text:
        head, _, rest = text.partition(START)
        text = head + block + rest.partition(END)[2]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    DOC.write_text(text)


def plot(results: dict[tuple[str, int], dict], concurrencies: list[int], paths: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    styles = ["o-", "^-", "D-"]
    proxies = [p for p in paths if p.startswith("gateway")] + ["vllm-router"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, q in zip(axes, ("p50", "p99"), strict=True):
        for i, path in enumerate(proxies):
            added = [results[(path, c)][f"ttfb_{q}_ms"] - results[("direct", c)][f"ttfb_{q}_ms"]
                     for c in concurrencies]
            style = "s--" if path == "vllm-router" else styles[i % len(styles)]
            name = path if path == "vllm-router" else "modelendpoint-" + label(path)
            ax.plot(concurrencies, added, style, label=name)
        ax.axhline(0, color="grey", linewidth=0.5)
        ax.set_xscale("log", base=2)
        ax.set_yscale("symlog", linthresh=1.0)
        ax.set_xticks(concurrencies, [f"{c:,}" for c in concurrencies])
        ax.set_xlabel("concurrent streams")
        ax.set_ylabel(f"added time to first byte, {q} (ms)")
        ax.set_title(f"time to first byte {q}, over direct")
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(PLOT, dpi=110)


# --- main ------------------------------------------------------------------------------------------------


def split_cpus(proxy_count: int) -> tuple[set[int], set[int]]:
    """The CPUs for the proxy under test and the rest, for everything else.

    Pinned apart, the proxy's work cannot steal time from the load generators
    and fake servers (nor theirs from it), so what a path adds is the proxy's
    own cost, the same for every path; direct runs its clients on the same
    load CPUs. With one CPU there is nothing to split: both sets are all CPUs."""
    cpus = sorted(os.sched_getaffinity(0))
    if proxy_count <= 0 or len(cpus) <= proxy_count:
        return set(cpus), set(cpus)
    return set(cpus[-proxy_count:]), set(cpus[:-proxy_count])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--concurrency", default="64,256,1024")
    # Four rounds: a p99 from one 10 s round at 64 streams rests on its top few streams.
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--warmup", type=float, default=3.0)
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--chunks", type=int, default=64)
    p.add_argument("--interval", type=float, default=0.02)
    p.add_argument("--workers", default="1,2", help="MEP_GATEWAY_WORKERS of each Python gateway variant measured")
    p.add_argument("--data-planes", default="python,compiled",
                   help="MEP_GATEWAY_DATA_PLANE of the variants: python (one per --workers), compiled (one thread)")
    p.add_argument("--proxy-cpus", type=int, default=1,
                   help="CPUs the proxy under test is pinned to (the last ones); the load generators, fake "
                        "servers and control plane get the rest; 0 pins nothing")
    p.add_argument("--no-write", action="store_true", help="print the table; leave docs/ alone")
    args = p.parse_args(argv)
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    proxy_cpus, load_cpus = split_cpus(args.proxy_cpus)
    pinned = proxy_cpus != load_cpus
    planes = [d.strip() for d in args.data_planes.split(",") if d.strip()]
    variants = [int(w) for w in args.workers.split(",")] if "python" in planes else []
    if pinned:
        # More workers than the proxy's CPUs would measure time slicing, not the gateway.
        skipped = [w for w in variants if w > len(proxy_cpus)]
        variants = [w for w in variants if w <= len(proxy_cpus)]
        if skipped:
            log(f"skipping MEP_GATEWAY_WORKERS={','.join(map(str, skipped))}: more than the proxy's "
                f"{len(proxy_cpus)} CPU(s)")
        if not variants and "compiled" not in planes:
            raise SystemExit(f"bench-gateway: --workers {args.workers}: every variant needs more than the "
                             f"proxy's {len(proxy_cpus)} CPU(s) (--proxy-cpus)")
        # Everything this process starts from here on inherits the load CPUs.
        os.sched_setaffinity(0, load_cpus)
    gateways = {("gateway" if w == 1 else f"gateway-{w}w"): ("python", w) for w in variants}
    if "compiled" in planes:
        gateways["gateway-compiled"] = ("compiled", 1)
    paths = ["direct", *gateways, "vllm-router"]
    assert GATEWAY_BIN.exists(), f"{GATEWAY_BIN} is missing; run `make setup`"
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    router_exe = router_venv()
    work = Path(tempfile.mkdtemp(prefix="bench-gateway-"))
    log(f"working in {work}; load average {load}")
    procs: list[Proc] = []
    cp = None
    stop_beat = None
    try:
        ports = localcluster.free_ports(4 + 2 * len(gateways))
        backend_ports, router_port, router_metrics, gw_ports = ports[:2], ports[2], ports[3], ports[4:]
        for i, port in enumerate(backend_ports):
            procs.append(Proc(f"fake-{i}", [str(PY), str(HACK / "bench" / "fake_openai.py"), "--port", str(port),
                                            "--chunks", str(args.chunks), "--interval", str(args.interval)], work))
        for port in backend_ports:
            wait_http(f"http://127.0.0.1:{port}/health", "a fake server")
        log("starting the local control plane")
        cp = localcluster.start(work / "cluster")
        stop_beat = setup_cluster(cp, backend_ports)
        targets = {"direct": ",".join(f"127.0.0.1:{p}" for p in backend_ports),
                   "vllm-router": f"127.0.0.1:{router_port}"}
        pids: dict[str, int | None] = {"direct": None}
        for i, (name, (plane, count)) in enumerate(gateways.items()):
            gw_port, gw_metrics = gw_ports[2 * i], gw_ports[2 * i + 1]
            env = {k: v for k, v in os.environ.items() if not k.startswith("MEP_GATEWAY_")}
            env.update(KUBECONFIG=str(cp.kubeconfig), MEP_GATEWAY_BIND_ADDRESS="127.0.0.1",
                       MEP_GATEWAY_PORT=str(gw_port), MEP_GATEWAY_METRICS_PORT=str(gw_metrics),
                       MEP_GATEWAY_POD_NAME=f"bench-{name}", MEP_GATEWAY_WORKERS=str(count),
                       MEP_GATEWAY_DATA_PLANE=plane)
            gateway = Proc(name, [str(GATEWAY_BIN)], work, env, cpus=proxy_cpus)
            procs.append(gateway)
            wait_http(f"http://127.0.0.1:{gw_metrics}/readyz", f"{name} to be ready", gateway)
            wait_http(f"http://127.0.0.1:{gw_port}/v1/models", f"{name} to route the model", gateway,
                      expect=MODEL.encode())
            targets[name] = f"127.0.0.1:{gw_port}"
            pids[name] = gateway.pid
        router = Proc("vllm-router", [str(router_exe), "--host", "127.0.0.1", "--port", str(router_port),
                                      "--policy", "round_robin", "--prometheus-port", str(router_metrics),
                                      "--worker-urls",
                                      *[f"http://127.0.0.1:{p}" for p in backend_ports]], work,
                      cpus=proxy_cpus)
        procs.append(router)
        wait_http(f"http://127.0.0.1:{router_port}/health", "vllm-router", router)
        pids["vllm-router"] = router.pid
        points = {(path, c): Point() for path in paths for c in concurrencies}
        for rnd in range(args.rounds):
            for ci, c in enumerate(concurrencies):
                shift = (rnd + ci) % len(paths)
                for path in paths[shift:] + paths[:shift]:
                    log(f"round {rnd + 1}/{args.rounds}: {c} streams via {path}")
                    measure(points[(path, c)], targets[path], pids[path], c, args.warmup, args.duration, work,
                            f"r{rnd}-{c}-{path}")
                    for proc in procs:
                        if not proc.alive():
                            raise SystemExit(f"{proc.name} exited during the benchmark:\n{proc.tail()}")
        results = {k: v.summary() for k, v in points.items()}
        (work / "results.json").write_text(json.dumps({f"{k[0]}@{k[1]}": v for k, v in results.items()},
                                                      indent=1))
        extra = (" " + shlex.join(argv if argv is not None else sys.argv[1:])).rstrip()
        meta = {"argv": extra if extra.strip() else "", "cpus": os.cpu_count(),
                "proxy_cpus": sorted(proxy_cpus) if pinned else None, "load_cpus": sorted(load_cpus),
                "mem_gib": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30,
                "date": datetime.date.today().isoformat(), "load": load,
                "load_after": " ".join(f"{x:.2f}" for x in os.getloadavg())}
        section, failed = report(results, concurrencies, paths, args, meta)
        print(section)
        if not args.no_write:
            write_doc(section)
            plot(results, concurrencies, paths)
            log(f"wrote {DOC.relative_to(REPO)} and {PLOT.relative_to(REPO)}")
        if failed:
            log("targets not met: " + "; ".join(failed))
        return 0
    finally:
        if stop_beat is not None:
            stop_beat.set()
        for proc in reversed(procs):
            proc.stop()
        if cp is not None:
            cp.stop()


if __name__ == "__main__":
    sys.exit(main())
