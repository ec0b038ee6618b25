"""vLLM's async engine and OpenAI serving layer, built the way vLLM's own server builds them.

``parse_engine_args`` runs vLLM's own OpenAI-server argument parser over the
argv from :func:`settings.engine_argv`, so every engine and frontend option
keeps vLLM's defaults and validation. ``start_engine`` creates the AsyncLLM
engine and then lets vLLM's ``init_app_state`` construct its serving classes
(``OpenAIServingChat``, ``OpenAIServingCompletion``, ``OpenAIServingModels``)
on a state object the runtime's routes read from.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import threading
from dataclasses import dataclass
from typing import Any

from .settings import ConfigError, RuntimeSettings, engine_arg_error, engine_config_error, generation_overrides


class _ArgError(Exception):
    pass


def parse_engine_args(
    argv: list[str], engine_args: str = "", settings: RuntimeSettings | None = None
) -> argparse.Namespace:
    """vLLM's server Namespace for ``argv``; a bad option raises ConfigError (one line).

    With ``settings``, the generation defaults (the guide's temperature, the
    LIMIT_MAX_TOKENS default and ceiling) are merged into vLLM's
    ``override_generation_config`` after vLLM parsed the user's own value, in
    whatever syntax VLLM_EXTRA_ARGS gave it (JSON or ``--override-generation-config.key``).
    """
    from vllm.entrypoints.launchers.cli_args import make_arg_parser, validate_parsed_serve_args
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = make_arg_parser(FlexibleArgumentParser(prog="modelendpoint-runtime"))

    def _error(message: str):  # argparse would print usage and exit 2
        raise _ArgError(message)

    parser.error = _error  # type: ignore[method-assign]
    try:
        args = parser.parse_args(argv)
        validate_parsed_serve_args(args)
    except (_ArgError, TypeError, ValueError) as exc:
        raise engine_arg_error(str(exc), engine_args) from None
    if settings is not None:
        args.override_generation_config = generation_overrides(settings, args.override_generation_config)
    return args


async def _off_loop(fn: Any, /, *args: Any, **kwargs: Any) -> Any:
    """Run a blocking call in a daemon thread and await its result.

    Not ``asyncio.to_thread``: its pool threads are joined at interpreter
    exit, so a SIGTERM during a long load would wait for the load to end. A
    daemon thread can be abandoned; ``stop_engine_processes`` ends the engine
    process it waits on.
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future = loop.create_future()

    def settle(result: Any, exc: BaseException | None) -> None:
        if future.done():
            return
        if exc is not None:
            future.set_exception(exc)
        else:
            future.set_result(result)

    def work() -> None:
        try:
            result = fn(*args, **kwargs)
        except BaseException as exc:  # noqa: BLE001 - handed to the awaiting task
            loop.call_soon_threadsafe(settle, None, exc)
        else:
            loop.call_soon_threadsafe(settle, result, None)

    threading.Thread(target=work, name="engine-load", daemon=True).start()
    return await future


def stop_engine_processes(wait: float = 0.0) -> int:
    """Terminate the engine-core processes vLLM started from this process (a load being cancelled).

    vLLM's start-up waits on those processes; once they are gone it raises at
    once instead of finishing a model load nobody will use. Only this
    process's own children are touched. ``wait`` 0 (from the event loop)
    only signals them; otherwise wait that long for each, then kill it.
    """
    children = multiprocessing.active_children()
    for child in children:
        child.terminate()
    if wait > 0:
        for child in children:
            child.join(wait)
            if child.is_alive():
                child.kill()
    return len(children)


@dataclass
class Engine:
    """The running engine and vLLM's serving objects for the routes."""

    client: Any  # vllm.v1.engine.async_llm.AsyncLLM
    state: Any  # starlette State with openai_serving_chat / _completion / _models
    args: argparse.Namespace
    _stats_task: asyncio.Task | None = None

    @property
    def dead(self) -> bool:
        return bool(getattr(self.client, "errored", False))

    def start_stats_logging(self) -> None:
        """vLLM's periodic engine-stats line (throughput, KV-cache use), as vLLM's own server logs it."""
        if not getattr(self.state, "log_stats", False):
            return
        import vllm.envs as envs

        async def periodic() -> None:
            while True:
                await asyncio.sleep(envs.VLLM_LOG_STATS_INTERVAL)
                await self.client.do_log_stats()

        self._stats_task = asyncio.create_task(periodic())

    def shutdown(self) -> None:
        if self._stats_task is not None:
            self._stats_task.cancel()
        self.client.shutdown()


async def start_engine(args: argparse.Namespace) -> Engine:
    """Load the model and build vLLM's serving layer over it.

    Config creation and engine start-up block for a long time (weights,
    warm-up); they run in a daemon thread so the event loop keeps answering
    /health and /ready (503) meanwhile, and a shutdown need not wait for them. AsyncLLM created outside the loop
    starts its output-handler tasks lazily on the first request.
    """
    from starlette.datastructures import State
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.entrypoints.launchers.api_server.app_state import init_app_state
    from vllm.usage.usage_lib import UsageContext
    from vllm.v1.engine.async_llm import AsyncLLM

    engine_args = AsyncEngineArgs.from_cli_args(args)
    usage = UsageContext.OPENAI_API_SERVER
    try:
        vllm_config = await _off_loop(engine_args.create_engine_config, usage_context=usage)
    except (ValueError, TypeError) as exc:
        # Config validation (e.g. MAX_MODEL_LEN beyond the model's) is a bad
        # setting: report it on one line like any other.
        raise engine_config_error(str(exc)) from None

    client = await _off_loop(
        AsyncLLM.from_vllm_config,
        vllm_config=vllm_config,
        usage_context=usage,
        enable_log_requests=engine_args.enable_log_requests,
        aggregate_engine_logging=engine_args.aggregate_engine_logging,
        disable_log_stats=engine_args.disable_log_stats,
    )
    try:
        supported_tasks = await client.get_supported_tasks()
        state = State()
        await init_app_state(client, state, args, supported_tasks)
        if getattr(state, "openai_serving_chat", None) is None:
            raise ConfigError(f"invalid MODEL_NAME: {args.model} is not a text-generation model")
    except BaseException:
        client.shutdown()
        raise
    engine = Engine(client=client, state=state, args=args)
    engine.start_stats_logging()
    # As vLLM's server does after start-up: move everything allocated so far
    # (weights' Python objects, tokenizer, serving state) out of the garbage
    # collector's view, so full collections during serving stay short.
    from vllm.utils.gc_utils import freeze_gc_heap

    freeze_gc_heap()
    return engine
