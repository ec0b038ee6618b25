"""Entry point: ``modelendpoint-runtime``.

Order of events: validate settings, bind the listening socket (a bad HOST
or a PORT in use exits with code 2 and one line on stderr within a second,
before vLLM is even imported), validate vLLM's engine arguments (same), start
uvicorn (uvloop, httptools) on that socket so /health and /ready answer at
once, load the engine in the background, serve. SIGTERM drains: readiness
turns 503, new requests get 503, in-flight ones may finish for
DRAIN_TIMEOUT_SECONDS, then the server stops and the process exits 0. A
second SIGTERM, or SIGINT, stops at once (uvicorn's graceful shutdown).
SIGTERM while the model is still loading does not wait for the load: the
load is cancelled (see ``app.create_app``) and the process exits 0.
"""

from __future__ import annotations

import asyncio
import errno
import os
import signal
import socket
import sys
from types import FrameType

import uvicorn

from .settings import ACCEPTED, ConfigError, engine_argv, load_settings

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
        log.info("drained" if idle else "drain timeout", extra={"fields": {"in_flight": self.runtime.admission.in_flight}})
        self.should_exit = True


def bind_listener(host: str, port: int) -> socket.socket:
    """The server's listening socket, bound now; a bad HOST or a busy PORT raises ConfigError.

    Binding here, before the model loads, turns "address already in use"
    into a one-line error at start instead of a uvicorn traceback minutes
    later, once the weights are in memory. uvicorn serves on this socket
    (``server.run(sockets=[...])``); it calls ``listen`` itself.
    """
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as exc:
        raise ConfigError(f"invalid HOST={host!r} ({exc}); accepted values: {ACCEPTED['HOST']}") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        # As uvicorn does: a restarted server may rebind while old connections linger in TIME_WAIT.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise ConfigError(
                f"invalid PORT={port}: the port is already in use on {host}; accepted values: a free port, "
                f"{ACCEPTED['PORT']}"
            ) from None
        if exc.errno == errno.EACCES:
            raise ConfigError(f"invalid PORT={port}: permission denied (ports below 1024 need privileges)") from None
        raise ConfigError(
            f"invalid HOST={host!r}: cannot listen there ({exc.strerror}); accepted values: {ACCEPTED['HOST']}"
        ) from None
    return sock


def _fail(message: str, code: int) -> None:
    print(f"{PROG}: {message}", file=sys.stderr, flush=True)
    sys.exit(code)


def main() -> None:
    try:
        settings = load_settings(os.environ)
    except ConfigError as exc:
        _fail(str(exc), 2)
        return

    try:
        listener = bind_listener(settings.host, settings.port)
    except ConfigError as exc:
        _fail(str(exc), 2)
        return

    # Heavy imports (torch, vLLM) only once the settings are known good.
    from vllm.entrypoints.serve.utils.api_utils import cli_env_setup

    from .app import Runtime, create_app
    from .engine import parse_engine_args, start_engine, stop_engine_processes
    from .logs import setup_logging

    try:
        args = parse_engine_args(engine_argv(settings), settings.vllm_extra_args, settings)
    except ConfigError as exc:
        listener.close()
        _fail(str(exc), 2)
        return
    cli_env_setup()  # vLLM's worker processes start with spawn
    from vllm.utils.system_utils import set_ulimit

    set_ulimit()  # as vLLM's server: room for many client connections (RLIMIT_NOFILE)
    setup_logging(settings.log_level)

    runtime = Runtime(settings)
    app = create_app(runtime, lambda: start_engine(args), stop_engine_processes)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        loop="uvloop",
        http="httptools",
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
    server.run(sockets=[listener])
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
