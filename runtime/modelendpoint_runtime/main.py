"""Entry point: ``modelendpoint-runtime``.

Order of events: validate the runtime's own settings, read API_KEY_FILE and
ADAPTERS_FILE, bind
the listening sockets (PORT, and METRICS_PORT when set): a bad value, a
bad HOST or a port in use exits with code 2 and one line on stderr within a
second, before vLLM is even imported. Then build vLLM's parser and apply the
worker rule (every variable named like a vLLM option, VLLM_EXTRA_ARGS last;
same one-line exit 2), start uvicorn (uvloop, httptools with the runtime's
connection limits) on those sockets so /health and /ready answer at once,
load the engine in the background, serve. SIGTERM drains: readiness turns
503, new requests get 503, in-flight ones may finish for
DRAIN_TIMEOUT_SECONDS, then the server stops and the process exits 0. A
second SIGTERM, or SIGINT, stops at once (uvicorn's graceful shutdown).
SIGTERM while the model is still loading does not wait for the load: the
load is cancelled (see ``app.create_app``) and the process exits 0.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
from types import FrameType

import uvicorn

from .adapters import Adapters
from .auth import initial_keyring
from .server import ConnectionLimits, bind_listener, protocol_class
from .settings import ConfigError, load_settings

PROG = "modelendpoint-runtime"


class DrainingServer(uvicorn.Server):
    """uvicorn.Server whose SIGTERM drains before shutting down."""

    def __init__(self, config: uvicorn.Config, runtime) -> None:
        super().__init__(config)
        self.runtime = runtime
        self._drain_task: asyncio.Task | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        loop = self.runtime.loop
        if sig == signal.SIGTERM and not self.runtime.admission.draining and loop is not None:
            # Not recorded in uvicorn's captured signals on purpose: uvicorn
            # re-raises those after shutdown, which would turn our clean
            # exit 0 into death by SIGTERM.
            self.runtime.begin_drain()
            loop.call_soon_threadsafe(self._start_drain)
            return
        super().handle_exit(sig, frame)

    def _start_drain(self) -> None:
        self._drain_task = asyncio.ensure_future(self._drain())

    async def _drain(self) -> None:
        from .app import log

        timeout = self.runtime.settings.drain_timeout_seconds
        in_flight = self.runtime.admission.in_flight
        log.info("draining", extra={"fields": {"in_flight": in_flight, "timeout_s": timeout}})
        idle = await self.runtime.admission.wait_idle(timeout)
        left = self.runtime.admission.in_flight
        log.info("drained" if idle else "drain timeout", extra={"fields": {"in_flight": left}})
        self.should_exit = True


def _fail(message: str, code: int) -> None:
    print(f"{PROG}: {message}", file=sys.stderr, flush=True)
    sys.exit(code)


def main() -> None:
    listeners: list[socket.socket] = []

    def fail(message: str, code: int) -> None:
        for sock in listeners:
            sock.close()
        _fail(message, code)

    try:
        settings = load_settings(os.environ)
        keyring = initial_keyring(settings)
        adapters = Adapters(settings.adapters_file, settings.served_model_name, settings.adapters_poll_seconds)
        adapters.read_at_start()
        listeners.append(bind_listener(settings.host, settings.port))
        if settings.metrics_port is not None:
            listeners.append(bind_listener(settings.host, settings.metrics_port, "METRICS_PORT"))
    except ConfigError as exc:
        fail(str(exc), 2)
        return

    # Heavy imports (torch, vLLM) only once our own settings are known good.
    from vllm.entrypoints.serve.utils.api_utils import cli_env_setup

    from .app import Runtime, create_app, log
    from .engine import engine_args, start_engine, stop_engine_processes
    from .logs import setup_logging

    try:
        parsed = engine_args(os.environ, settings)
    except ConfigError as exc:
        fail(str(exc), 2)
        return
    cli_env_setup()  # vLLM's worker processes start with spawn
    from vllm.utils.system_utils import set_ulimit

    set_ulimit()  # as vLLM's server: room for many client connections (RLIMIT_NOFILE)
    setup_logging(settings.log_level)
    # What vLLM was given, for whoever wonders whether a variable reached it.
    log.info("engine options", extra={"fields": {"options": parsed.log_fields()}})

    adapters.log = log
    runtime = Runtime(settings, keyring=keyring, adapters=adapters)
    app = create_app(runtime, lambda: start_engine(parsed.args, parsed.config_error), stop_engine_processes)
    limits = ConnectionLimits(
        max_header_bytes=settings.max_header_bytes,
        max_connections=settings.max_connections,
        read_timeout=settings.read_timeout_seconds,
        write_timeout=settings.write_timeout_seconds,
        retry_after=settings.retry_after_seconds,
    )
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        loop="uvloop",
        http=protocol_class(limits, runtime.metrics),
        ws="none",
        lifespan="on",
        access_log=False,  # our Guard writes one JSON line per request instead
        log_level=settings.log_level if settings.log_level != "info" else "warning",
        # After the drain, whatever still runs (drain timeout passed) gets a
        # few seconds before uvicorn cancels it.
        timeout_graceful_shutdown=5,
        timeout_keep_alive=5,
    )
    server = DrainingServer(config, runtime)

    def _on_fatal() -> None:
        server.should_exit = True

    runtime.on_fatal = _on_fatal
    server.run(sockets=listeners)
    if runtime.loading:
        # Stopped while the model was loading, and the load did not end when
        # its engine process was stopped (still reading the config, say): its
        # thread cannot be interrupted, and a normal interpreter exit would
        # wait for it. Stop whatever engine process it may have started since.
        stop_engine_processes(wait=5)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    if runtime.fatal is not None:
        _fail(runtime.fatal, 1)
    if not server.started and runtime.fatal is None:
        sys.exit(1)


if __name__ == "__main__":
    main()
