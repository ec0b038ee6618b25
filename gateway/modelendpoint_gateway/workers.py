"""Several worker processes behind one pod's ports (``MEP_GATEWAY_WORKERS``): supervisor, readiness, metrics.

One gateway process is one event loop: one CPU. With ``MEP_GATEWAY_WORKERS``
above 1 the console script becomes a supervisor that forks that many
workers, each a complete gateway (its own discovery watches, key cache,
balancer state and held annotation), all accepting on the API port through
``SO_REUSEPORT``: the kernel spreads new connections over the workers'
listening sockets. What that costs, documented in docs/gateway.md: in-flight
counts (LeastRequests, the CHWBL bound), held counts and their bound are per
worker, as they already are per gateway pod; each worker watches and reads
Secrets itself; each writes its own held annotation (key suffixed ``-w<i>``).

The supervisor:

- checks what can fail at start before forking (the ports, the Kubernetes
  configuration), so a bad setting still exits 2 with one line;
- serves the metrics port itself: ``/metrics`` merges the workers' metrics
  (each worker serves its own on an abstract Unix socket) with a ``worker``
  label; ``/healthz``; ``/readyz``, 200 once every worker has its first lists
  (a worker's own ``/readyz`` on the API port says the same), 503 while
  draining;
- forwards SIGTERM/SIGINT to the workers, which drain as one gateway does,
  and exits 0 once they all have; a worker that exits on its own (a crash)
  makes it drain the others and exit 1 (or the worker's status 2), so
  Kubernetes restarts the container rather than running it short of a worker.

Readiness is shared through one anonymous shared memory byte per worker
(inherited across ``fork``), set by the worker when its first lists are in.
"""

from __future__ import annotations

import contextlib
import ctypes
import http.client
import http.server
import logging
import math
import mmap
import os
import signal
import socket
import threading
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger("modelendpoint_gateway")

_PR_SET_PDEATHSIG = 1


def usable_cpus() -> int:
    """CPUs this process may use: its affinity, capped by a cgroup v2 CPU quota (a pod's CPU limit)."""
    count = len(os.sched_getaffinity(0))
    with contextlib.suppress(OSError, ValueError):
        with open("/sys/fs/cgroup/cpu.max") as f:
            quota, period = f.read().split()[:2]
        if quota != "max":
            count = min(count, max(1, math.ceil(int(quota) / int(period))))
    return max(1, count)


def worker_count(setting: int) -> int:
    """MEP_GATEWAY_WORKERS: the number, or 0 for one per usable CPU."""
    return setting if setting > 0 else usable_cpus()


class Share:
    """State the workers share: one byte per worker, 1 while it is ready (first lists in, not draining)."""

    def __init__(self, count: int) -> None:
        self.count = count
        self._bytes = mmap.mmap(-1, count)  # anonymous and shared: the same pages in every forked worker

    def set_ready(self, index: int, ready: bool) -> None:
        self._bytes[index] = 1 if ready else 0

    def all_ready(self) -> bool:
        return self._bytes[:] == b"\x01" * self.count


@dataclass(frozen=True)
class WorkerRole:
    """What makes a gateway process one worker of several."""

    index: int
    share: Share
    supervisor_pid: int

    @property
    def metrics_address(self) -> str:
        return metrics_address(self.supervisor_pid, self.index)


def metrics_address(supervisor_pid: int, index: int) -> str:
    """A worker's own metrics listener: an abstract Unix socket (no file, pod-local, nothing to clean up)."""
    return f"\0modelendpoint-gateway-{supervisor_pid}-{index}"


def reserve_port(host: str, port: int) -> socket.socket:
    """Bind (without listening) the API port with SO_REUSEPORT: fails now if another program holds it.

    The workers bind their own listening sockets to it; a bound socket that
    does not listen is given no connections.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


def merge_metrics(texts: Iterable[tuple[str, str]], label: str = "worker", openmetrics: Collection[str] = ()) -> bytes:
    """Prometheus texts, (label value, text) each, as one text with that ``label`` on every sample
    (the workers' texts by ``worker``; the two data planes' by ``data_plane``). The texts of the
    label values in ``openmetrics`` are in the OpenMetrics format (the compiled data plane's)."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.metrics_core import Metric
    from prometheus_client.openmetrics.parser import text_string_to_metric_families as openmetrics_families
    from prometheus_client.parser import text_string_to_metric_families
    from prometheus_client.samples import Sample

    families: dict[str, Metric] = {}
    for worker, text in texts:
        parse = openmetrics_families if worker in openmetrics else text_string_to_metric_families
        for fam in parse(text):
            merged = families.get(fam.name)
            if merged is None:
                merged = families[fam.name] = Metric(fam.name, fam.documentation, fam.type, fam.unit)
            merged.samples.extend(Sample(s.name, {**s.labels, label: worker}, s.value, s.timestamp, s.exemplar)
                                  for s in fam.samples)

    class Merged:
        def collect(self) -> Iterable[Metric]:
            return list(families.values())

    registry = CollectorRegistry(auto_describe=False)
    registry.register(Merged())
    return generate_latest(registry)


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, address: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.address = address

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self.address)
        self.sock = sock


def fetch_worker_metrics(address: str, timeout: float = 5.0) -> str | None:
    """One worker's /metrics text; None when it does not answer (starting, stopping)."""
    conn = _UnixHTTPConnection(address, timeout)
    try:
        conn.request("GET", "/metrics")
        resp = conn.getresponse()
        return resp.read().decode() if resp.status == 200 else None
    except OSError:
        return None
    finally:
        conn.close()


class Supervisor:
    """Forks the workers, serves the metrics port, forwards signals, waits, exits with their outcome."""

    def __init__(self, count: int, run_worker: Callable[[WorkerRole], int], *, bind_address: str, port: int,
                 metrics_port: int) -> None:
        self.count = count
        self.run_worker = run_worker
        self.bind_address = bind_address
        self.port = port
        self.metrics_port = metrics_port
        self.share = Share(count)
        self.pid = os.getpid()
        self.children: dict[int, int] = {}  # pid -> worker index
        self.draining = False
        self.status = 0
        self._signals = 0
        self._httpd: http.server.ThreadingHTTPServer | None = None

    # --- before forking: what can fail at start fails here, once ------------------------------

    def bind(self) -> None:
        """Reserve the API port and listen on the metrics port; OSError (the caller's one line) if not."""
        self._reserved = reserve_port(self.bind_address, self.port)
        if self.metrics_port:
            supervisor = self

            class Handler(http.server.BaseHTTPRequestHandler):
                protocol_version = "HTTP/1.1"

                def do_GET(self) -> None:  # noqa: N802 - http.server's name
                    status, ctype, body = supervisor.answer(self.path)
                    self.send_response(status)
                    self.send_header("content-type", ctype)
                    self.send_header("content-length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)

                def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet: scrapes and probes
                    pass

            http.server.ThreadingHTTPServer.allow_reuse_address = True
            self._httpd = http.server.ThreadingHTTPServer((self.bind_address, self.metrics_port), Handler)
            self._httpd.daemon_threads = True

    def answer(self, path: str) -> tuple[int, str, bytes]:
        """The metrics port: merged /metrics, /healthz, /readyz."""
        json_type = "application/json"
        if path == "/metrics":
            texts = []
            for index in range(self.count):
                text = fetch_worker_metrics(metrics_address(self.pid, index))
                if text is not None:
                    texts.append((str(index), text))
            from prometheus_client import CONTENT_TYPE_LATEST

            return 200, CONTENT_TYPE_LATEST, merge_metrics(texts)
        if path == "/healthz":
            return 200, json_type, b'{"status":"ok"}'
        if path == "/readyz":
            if self.draining:
                return 503, json_type, b'{"status":"draining"}'
            if not self.share.all_ready():
                return 503, json_type, b'{"status":"starting"}'
            return 200, json_type, b'{"status":"ready"}'
        return 404, json_type, (b'{"error":{"message":"not found","type":"invalid_request_error","param":null,'
                                b'"code":"unknown_url"}}')

    # --- running ---------------------------------------------------------------------------------

    def _fork(self, index: int) -> None:
        pid = os.fork()
        if pid == 0:  # the worker
            code = 1
            try:
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                signal.signal(signal.SIGINT, signal.SIG_DFL)
                # Its own process group: a terminal's Ctrl-C reaches the supervisor only, which passes
                # one SIGTERM on (two would be a forced stop).
                os.setpgid(0, 0)
                with contextlib.suppress(OSError, AttributeError):
                    # Stop with the supervisor even if it is killed outright (outside a container).
                    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
                self._reserved.close()
                if self._httpd is not None:
                    self._httpd.socket.close()
                code = self.run_worker(WorkerRole(index, self.share, self.pid))
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else 1
            except BaseException:  # noqa: BLE001 - reported, then the worker ends
                logger.exception("worker failed", extra={"fields": {"worker": index}})
            finally:
                logging.shutdown()
                os._exit(code)
        self.children[pid] = index

    def _forward(self, signum: int, frame: Any = None) -> None:
        self.draining = True
        self._signals += 1
        for pid in list(self.children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)

    def run(self) -> int:
        for index in range(self.count):
            self._fork(index)
        signal.signal(signal.SIGTERM, self._forward)
        signal.signal(signal.SIGINT, self._forward)
        if self._httpd is not None:
            threading.Thread(target=self._httpd.serve_forever, name="metrics", daemon=True).start()
        logger.info("modelendpoint-gateway supervisor started", extra={"fields": {
            "workers": self.count, "port": self.port, "metrics_port": self.metrics_port}})
        while self.children:
            try:
                pid, wait_status = os.wait()
            except ChildProcessError:
                break
            if pid not in self.children:
                continue
            index = self.children.pop(pid)
            code = os.waitstatus_to_exitcode(wait_status)
            if not self.draining:
                logger.error("a worker exited on its own; stopping the others", extra={"fields": {
                    "worker": index, "status": code}})
                self.status = code if code == 2 else 1
                self._forward(signal.SIGTERM)
            elif code != 0 and self.status == 0:
                self.status = 1
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
        self._reserved.close()
        return self.status
