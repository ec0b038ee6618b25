"""Entry point: ``modelendpoint-runtime``.

Order of events: validate settings and vLLM's engine arguments (a bad one
exits with code 2 and one line on stderr, before anything heavy happens),
start uvicorn (uvloop, httptools) so /health and /ready answer at once, load
the engine in the background, serve. SIGTERM drains: readiness turns 503, new
requests get 503, in-flight ones may finish for DRAIN_TIMEOUT_SECONDS, then
the server stops and the process exits 0. A second SIGTERM, or SIGINT, stops
at once (uvicorn's graceful shutdown).
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from types import FrameType

import uvicorn

from .settings import ConfigError, engine_argv, load_settings

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


def _fail(message: str, code: int) -> None:
    print(f"{PROG}: {message}", file=sys.stderr, flush=True)
    sys.exit(code)


def main() -> None:
    try:
        settings = load_settings(os.environ)
    except ConfigError as exc:
        _fail(str(exc), 2)
        return

    # Heavy imports (torch, vLLM) only once the settings are known good.
    from vllm.entrypoints.serve.utils.api_utils import cli_env_setup

    from .app import Runtime, create_app
    from .engine import parse_engine_args, start_engine
    from .logs import setup_logging

    try:
        args = parse_engine_args(engine_argv(settings), settings.vllm_extra_args)
    except ConfigError as exc:
        _fail(str(exc), 2)
        return
    cli_env_setup()  # vLLM's worker processes start with spawn
    from vllm.utils.system_utils import set_ulimit

    set_ulimit()  # as vLLM's server: room for many client connections (RLIMIT_NOFILE)
    setup_logging(settings.log_level)

    runtime = Runtime(settings)
    app = create_app(runtime, lambda: start_engine(args))
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
    server.run()
    if runtime.fatal is not None:
        _fail(runtime.fatal, 1)
    if not server.started and runtime.fatal is None:
        # uvicorn could not bind (it already logged why).
        sys.exit(1)


if __name__ == "__main__":
    main()
