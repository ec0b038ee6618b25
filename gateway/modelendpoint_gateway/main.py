"""The ``modelendpoint-gateway`` console script: settings, logging, discovery, listeners, drain.

Configuration is by ``MEP_GATEWAY_*`` environment variables (docs/gateway.md);
a bad one prints one line naming it and exits with status 2, as does a port
that cannot be bound or a missing Kubernetes configuration. The API server is
reached through $KUBECONFIG, ~/.kube/config or the pod's service account.

SIGTERM (or SIGINT): /readyz turns 503, the listener closes, idle keep-alive
connections close, in-flight requests (streams included) may finish for
MEP_GATEWAY_DRAIN_TIMEOUT_SECONDS; held requests still waiting then get 503
``shutting_down``, this gateway's held annotations are removed, and the
process exits 0. A second signal stops at once.

With MEP_GATEWAY_WORKERS above 1 the process is a supervisor of that many
such gateways sharing the ports (workers.py). With MEP_GATEWAY_DATA_PLANE=compiled
it is one process that runs the compiled data plane on the API port
(dataplane.py; MEP_GATEWAY_WORKERS is then the data plane's threads), answering
what that hands back; on SIGTERM both drain, and the data plane exiting on its
own stops the gateway with status 1.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

from . import __version__, dataplane, hold, metrics, workers
from .app import JSON_HEADERS, Gateway
from .discovery import Changes, Discovery, Source
from .http import HTTPServer, Pool, Request, Responder
from .keys import KeyStore
from .logs import setup_logging
from .router import Router
from .settings import GatewaySettings, SettingsError, load_settings

logger = logging.getLogger("modelendpoint_gateway")

# Snapshots go to the compiled data plane at most this often (a readiness flip still routes within 1 s).
PUSH_INTERVAL_SECONDS = 0.1

USAGE = """usage: modelendpoint-gateway [--help] [--version]

One OpenAI base URL for every ModelEndpoint: routes by the request's model,
balances across ready replicas, holds requests while a model wakes. Configured
by environment variables: MEP_GATEWAY_NAMESPACES, MEP_GATEWAY_PORT,
MEP_GATEWAY_METRICS_PORT, MEP_GATEWAY_POD_NAME, MEP_GATEWAY_HOLD_TIMEOUT_SECONDS,
MEP_GATEWAY_MAX_HELD_REQUESTS, MEP_GATEWAY_DRAIN_TIMEOUT_SECONDS, ... (see
docs/gateway.md). The Kubernetes API is reached through $KUBECONFIG,
~/.kube/config or the in-cluster service account."""


class Fatal(Exception):
    """A start-up failure explained in one line (exit status 2)."""


class Service:
    """Everything a running gateway consists of; ``run()`` until a stop signal, then drain."""

    def __init__(self, settings: GatewaySettings, source: Source, secret_reader: Callable[..., Awaitable],
                 annotate: Callable[..., Awaitable[bool]], role: workers.WorkerRole | None = None) -> None:
        self.settings = settings
        self.role = role  # one worker of several (MEP_GATEWAY_WORKERS), or None: the only process
        self.source = source
        self.annotate = annotate
        self.router = Router()
        self.keys = KeyStore(secret_reader, settings.key_refresh_seconds)
        self.pool = Pool(connect_timeout=settings.connect_timeout_seconds, idle_seconds=settings.upstream_idle_seconds,
                         max_idle_per_address=settings.max_idle_connections_per_replica)
        self.gateway = Gateway(settings, self.router, self.keys, self.pool)
        if role is not None:
            self.gateway.peers_ready = role.share.all_ready
        self.discovery = Discovery(source, self.router, settings.namespace_list, on_change=self.on_change)
        self.api = HTTPServer(self.gateway.handle, max_header_bytes=settings.max_header_bytes,
                              max_body_bytes=settings.max_body_bytes, idle_seconds=settings.client_idle_seconds,
                              write_timeout=settings.client_write_timeout_seconds, on_error=self.gateway.protocol_error)
        self.metrics_server = HTTPServer(self.metrics_handler, max_header_bytes=16384, max_body_bytes=1024,
                                         idle_seconds=60)
        self.annotation_key = hold.annotation_key(settings.pod_name, role.index if role else None)
        self.stop = asyncio.Event()
        self.force = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self.api_port = 0
        self.metrics_port = 0
        self.dataplane: dataplane.DataPlane | None = None
        self.exit_status = 0
        self._push_scheduled = False
        self._pushed_at = -PUSH_INTERVAL_SECONDS

    # --- reacting to table changes ---------------------------------------------------------------

    def on_change(self, changes: Changes) -> None:
        new_refs = self.keys.touch(self.router.secret_refs())
        for ref in new_refs:
            # Read a new model's keys now, so its first request does not wait for the read.
            asyncio.ensure_future(self.keys.refresh(*ref))
        names = {m.served_name for m in self.router.routed()}
        for model, deleted in changes:
            if deleted:
                self.gateway.held.gone(model.key)
                if model.served_name and model.served_name not in names:
                    metrics.forget_model(model.served_name)
            elif model.served_name and self.router.table.owns_name(model.key):
                metrics.READY_REPLICAS.labels(model.served_name).set(len(model.replicas))
        metrics.MODELS.set(len(names))
        self.push_snapshot()

    def push_snapshot(self) -> None:
        """The compiled data plane's snapshot follows the routing table and the keys: at once, or
        PUSH_INTERVAL_SECONDS after the last push (each serializes every model: under churn of
        many ModelEndpoints, one push covers a burst of changes)."""
        if self.dataplane is None or self._push_scheduled:
            return
        self._push_scheduled = True
        loop = asyncio.get_running_loop()
        loop.call_later(max(0.0, self._pushed_at + PUSH_INTERVAL_SECONDS - loop.time()), self._push_now)

    def _push_now(self) -> None:
        self._push_scheduled = False
        self._pushed_at = asyncio.get_running_loop().time()
        if self.dataplane is None:
            return
        # Before the first full lists, nothing is served fast (this process answers 503 not_ready).
        router = self.router if self.gateway.synced else Router()
        self.dataplane.push(dataplane.snapshot_message(
            router, lambda info: self.keys.fresh(info.namespace, info.key_secret or "", info.key_field or ""),
            self.gateway.withheld, self.settings))

    # --- background loops -----------------------------------------------------------------------------

    async def _refresh_keys(self) -> None:
        while True:
            await asyncio.sleep(self.settings.key_refresh_seconds)
            self.keys.retain(self.router.secret_refs())
            await self.keys.refresh_all()
            self.push_snapshot()  # keys read too long ago leave the fast path

    async def _write_annotations(self) -> None:
        gw = self.gateway
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):
                    await gw.wake.wait()
            gw.wake.clear()
            due = gw.held.due()
            if due:
                await asyncio.gather(*(self._write_one(key, held) for key, held in due))

    async def _write_one(self, key: tuple[str, str], held: int | None) -> None:
        value = None if held is None else hold.annotation_value(held, time.time())
        try:
            present = await self.annotate(key[0], key[1], self.annotation_key, value)
        except Exception as exc:  # noqa: BLE001 - retried on the next tick
            self.gateway.held.failed(key)
            metrics.ANNOTATION_WRITES.labels("error").inc()
            logger.warning("could not write the held annotation", extra={"fields": {
                "endpoint": f"{key[0]}/{key[1]}", "held": held, "error": str(exc)[:300]}})
            return
        metrics.ANNOTATION_WRITES.labels("ok" if present else "gone").inc()
        if present:
            self.gateway.held.written(key, held)
        else:
            self.gateway.held.gone(key)

    async def _mark_synced(self) -> None:
        await self.discovery.synced.wait()
        self.gateway.synced = True
        if self.dataplane is not None:
            self._push_now()  # now, not throttled: the fast path serves from the moment /readyz says ready
        if self.role is not None:
            self.role.share.set_ready(self.role.index, True)
        # Everything loaded so far (modules, the first lists) lives as long as the process: keep it
        # out of the garbage collector's full passes, whose pauses would land in streams' chunk gaps.
        gc.collect()
        gc.freeze()

    # --- the metrics listener -------------------------------------------------------------------------

    async def metrics_handler(self, req: Request, resp: Responder) -> None:
        if req.path == "/metrics":
            text = generate_latest(REGISTRY)
            if self.dataplane is not None:
                # One text: each sample says which data plane counted it.
                compiled = await self.dataplane.metrics()
                text = workers.merge_metrics([("python", text.decode()), ("compiled", compiled)], label="data_plane",
                                             openmetrics={"compiled"})
            resp.send(200, [(b"content-type", CONTENT_TYPE_LATEST.encode())], text)
        elif req.path == "/healthz":
            resp.send(200, JSON_HEADERS, b'{"status":"ok"}')
        elif req.path == "/readyz":
            status, body = self.gateway.readiness()
            resp.send(status, JSON_HEADERS, body)
        else:
            resp.send(404, JSON_HEADERS, b'{"error":{"message":"not found","type":"invalid_request_error",'
                                         b'"param":null,"code":"unknown_url"}}')

    # --- lifecycle ---------------------------------------------------------------------------------------

    async def start(self) -> None:
        s = self.settings
        binary = None
        if s.data_plane == "compiled":
            binary = dataplane.find_binary(s.dataplane_binary)
            if binary is None:
                raise Fatal(f"invalid MEP_GATEWAY_DATA_PLANE='compiled': {dataplane.BINARY} not found "
                            f"(MEP_GATEWAY_DATAPLANE_BINARY={s.dataplane_binary!r}, PATH, or beside {sys.executable})")
        try:
            if binary is not None:
                listener = socket.create_server((s.bind_address, s.port), backlog=2048,
                                                family=socket.AF_INET6 if ":" in s.bind_address else socket.AF_INET)
                self.api_port = listener.getsockname()[1]
            else:
                server = await self.api.listen(s.bind_address, s.port, reuse_port=self.role is not None)
                self.api_port = server.sockets[0].getsockname()[1]
            if self.role is not None:
                # The supervisor serves the metrics port and merges the workers' metrics from here.
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.bind(self.role.metrics_address)
                await self.metrics_server.listen("", 0, sock=sock)
            elif s.metrics_port:
                mserver = await self.metrics_server.listen(s.bind_address, s.metrics_port)
                self.metrics_port = mserver.sockets[0].getsockname()[1]
        except OSError as exc:
            raise Fatal(f"cannot listen on {s.bind_address} (MEP_GATEWAY_PORT={s.port}, "
                        f"MEP_GATEWAY_METRICS_PORT={s.metrics_port}): {exc.strerror or exc}") from None
        if binary is not None:
            loop = asyncio.get_running_loop()
            self.dataplane = dataplane.DataPlane(
                s, binary, lambda sock, preread: loop.create_task(self.api.adopt(sock, preread)))
            await self.dataplane.start(listener, workers.worker_count(s.workers))
            self.keys.on_read = self.push_snapshot
            self.push_snapshot()
            self._tasks.append(asyncio.ensure_future(self._watch_dataplane()))
        self.discovery.start()
        for coro in (self._refresh_keys(), self._write_annotations(), self._mark_synced()):
            self._tasks.append(asyncio.ensure_future(coro))
        fields = {"version": __version__, "port": self.api_port, "metrics_port": self.metrics_port,
                  "namespaces": s.namespace_list or "*", "pod": s.pod_name}
        if self.role is not None:
            fields["worker"] = self.role.index
        logger.info("modelendpoint-gateway started", extra={"fields": fields})

    async def _watch_dataplane(self) -> None:
        assert self.dataplane is not None
        code = await self.dataplane.wait()
        if not self.stop.is_set():
            logger.error("the compiled data plane exited on its own; stopping", extra={"fields": {"status": code}})
            self.exit_status = 1
            self.stop.set()

    async def drain(self) -> None:
        s = self.settings
        gw = self.gateway
        gw.draining = True
        if self.dataplane is not None:
            self.dataplane.drain()
        if self.role is not None:
            self.role.share.set_ready(self.role.index, False)
        self.api.start_drain()
        logger.info("draining", extra={"fields": {"in_flight": self.api.in_flight,
                                                   "timeout_s": s.drain_timeout_seconds}})
        waiting = asyncio.ensure_future(self.api.wait_idle(s.drain_timeout_seconds))
        forced = asyncio.ensure_future(self.force.wait())
        await asyncio.wait({waiting, forced}, return_when=asyncio.FIRST_COMPLETED)
        forced.cancel()
        finished = waiting.done() and waiting.result()
        waiting.cancel()
        # Held requests still waiting get their 503 now rather than a cut connection.
        gw.end_holds()
        await self.api.wait_idle(0 if self.force.is_set() else 2.0)
        self.api.close_all()
        # Take this gateway's held annotations off (the writer sees counts at zero).
        gw.wake.set()
        deadline = asyncio.get_running_loop().time() + 3.0
        while gw.held.due() and asyncio.get_running_loop().time() < deadline and not self.force.is_set():
            await asyncio.sleep(0.1)
        if self.dataplane is not None:
            # Its streams had the same drain timeout; a second signal stops it at once.
            await self.dataplane.stop(0 if self.force.is_set() else s.drain_timeout_seconds + 5)
        logger.info("stopped", extra={"fields": {"drained": bool(finished)}})

    async def close(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.discovery.stop()
        self.metrics_server.close_all()
        self.metrics_server.stop_listening()
        self.pool.close()
        if self.dataplane is not None:
            await self.dataplane.stop(0)

    def signal(self) -> None:
        if self.stop.is_set():
            self.force.set()
        self.stop.set()


async def connect() -> Any:
    """The Kubernetes client (kube.Kube), or Fatal naming what is missing."""
    from kubernetes.aio.config.config_exception import ConfigException

    from .kube import Kube

    try:
        return await Kube.connect()
    except (ConfigException, OSError, ValueError) as exc:
        raise Fatal(f"no Kubernetes configuration ($KUBECONFIG, ~/.kube/config or a service account): "
                    f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None


async def check_kubernetes() -> None:
    """Before forking workers: fail at once, in one line, without a Kubernetes configuration."""
    kube = await connect()
    await kube.close()


async def serve(settings: GatewaySettings, role: workers.WorkerRole | None = None) -> int:
    kube = await connect()
    service = Service(settings, kube, kube.secret_data, kube.annotate, role)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, service.signal)
    try:
        await service.start()
        await service.stop.wait()
        await service.drain()
    finally:
        await service.close()
        await kube.close()
    return service.exit_status


def run_loop(settings: GatewaySettings, main: Coroutine[Any, Any, int]) -> int:
    """Run ``main`` on uvloop (MEP_GATEWAY_EVENT_LOOP auto/uvloop) or asyncio's loop."""
    use_uvloop = settings.event_loop in ("auto", "uvloop")
    if use_uvloop:
        try:
            import uvloop
        except ImportError:
            if settings.event_loop == "uvloop":
                main.close()
                raise Fatal("invalid MEP_GATEWAY_EVENT_LOOP='uvloop': uvloop is not installed") from None
            use_uvloop = False
    if use_uvloop:
        return uvloop.run(main)
    return asyncio.run(main)


def run_workers(settings: GatewaySettings, count: int,
                run_worker: Callable[[workers.WorkerRole], int]) -> int:
    """MEP_GATEWAY_WORKERS above 1: the supervisor of ``count`` workers, each ``run_worker(role)``."""
    supervisor = workers.Supervisor(count, run_worker, bind_address=settings.bind_address, port=settings.port,
                                    metrics_port=settings.metrics_port)
    try:
        supervisor.bind()
    except OSError as exc:
        raise Fatal(f"cannot listen on {settings.bind_address} (MEP_GATEWAY_PORT={settings.port}, "
                    f"MEP_GATEWAY_METRICS_PORT={settings.metrics_port}): {exc.strerror or exc}") from None
    return supervisor.run()


def _worker(settings: GatewaySettings, role: workers.WorkerRole) -> int:
    try:
        return run_loop(settings, serve(settings, role))
    except Fatal as exc:
        print(f"modelendpoint-gateway: {exc}", file=sys.stderr)
        return 2


def _run(settings: GatewaySettings) -> int:
    count = workers.worker_count(settings.workers)
    if count == 1 or settings.data_plane == "compiled":
        return run_loop(settings, serve(settings))
    # What can fail at start fails before forking, in one line. The check runs on asyncio's own loop,
    # which leaves no threads behind (libuv's thread pool would not survive the fork).
    asyncio.run(check_kubernetes())
    return run_workers(settings, count, lambda role: _worker(settings, role))


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args and args[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    if args and args[0] == "--version":
        print(f"modelendpoint-gateway {__version__}")
        return 0
    if args:
        print(f"modelendpoint-gateway: unexpected argument {args[0]!r}; settings are MEP_GATEWAY_* "
              "environment variables (see --help)", file=sys.stderr)
        return 2
    try:
        settings = load_settings(os.environ)
    except SettingsError as exc:
        print(f"modelendpoint-gateway: {exc}", file=sys.stderr)
        return 2
    setup_logging(settings.log_level, settings.log_format)
    try:
        return _run(settings)
    except Fatal as exc:
        print(f"modelendpoint-gateway: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
