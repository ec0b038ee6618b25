"""vLLM's async engine and OpenAI serving layer, built the way vLLM's own server builds them.

:func:`engine_args` applies the worker rule (``engine_env``) to vLLM's own
OpenAI-server parser: the runtime's own options (``--model``,
``--served-model-name``, ``--response-role``), then every variable named
like a vLLM option, then ``VLLM_EXTRA_ARGS``, so every engine and frontend
option keeps vLLM's defaults and validation. ``start_engine`` creates the
AsyncLLM engine and then lets vLLM's ``init_app_state`` construct its serving
classes (``OpenAIServingChat``, ``OpenAIServingCompletion``,
``OpenAIServingResponses``, ``AnthropicServingMessages``,
``ServingTokenization``, the pooling ones, ``OpenAIServingModels``) on a
state object the runtime's routes read from.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any, NoReturn

from .engine_env import (
    EnvArgs,
    attribute,
    derive_options,
    engine_config_error,
    environment_argv,
    extra_tokens,
    long_flags,
    one_line,
    redact,
)
from .settings import ACCEPTED, ConfigError, RuntimeSettings, generation_overrides

PROG = "modelendpoint-runtime"


class _ArgError(Exception):
    pass


def build_parser() -> argparse.ArgumentParser:
    """vLLM's own OpenAI-server parser, with abbreviations off and no exits.

    ``allow_abbrev=False``: argparse would otherwise take any unambiguous
    prefix (``--served-model x``) for the full option, past any check of
    ours. Errors raise instead of printing usage and exiting.
    """
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = make_arg_parser(FlexibleArgumentParser(prog=PROG, allow_abbrev=False))

    def _error(message: str) -> NoReturn:  # argparse would print usage and exit 2
        raise _ArgError(message)

    def _exit(status: int = 0, message: str | None = None) -> NoReturn:
        raise _ArgError(message or "the parser tried to exit")

    parser.error = _error
    parser.exit = _exit
    return parser


# vLLM options the runtime sets itself, from its own variables.
OWNED: dict[str, str] = {
    "model": "MODEL_NAME",
    "served_model_name": "OPENAI_SERVED_MODEL_NAME_OVERRIDE",
    "response_role": "OPENAI_RESPONSE_ROLE",
    "api_key": "API_KEY or API_KEY_FILE",
    "host": "HOST",
    "port": "PORT",
}
# Options of make_arg_parser itself (vLLM's launcher), not of its engine or frontend.
_LAUNCHER = ("model_tag", "config", "headless", "api_server_count", "grpc")
# Frontend options that only add routes the runtime does not mount.
_UNMOUNTED = ("tokens_only", "enable_scale_out", "enable_tokenizer_info_endpoint")
# In FrontendArgs, but it configures pooling models' scoring, not the HTTP server.
_NOT_HTTP = ("enable_flash_late_interaction",)


def refused_options() -> dict[str, str]:
    """vLLM dests the runtime refuses, as a variable or in VLLM_EXTRA_ARGS: ``{dest: why}``.

    Derived from vLLM's own classes: ``BaseFrontendArgs`` is vLLM's frontend
    *without* "host, port, and server-specific arguments like SSL, CORS, and
    HTTP server settings", which its subclass ``FrontendArgs`` adds; the
    runtime is that HTTP server, so those options would be silently ignored
    (or, like ``--api-key``, bypass the runtime's auth). Refusing them says so
    at start instead.
    """
    from vllm.entrypoints.launchers.cli_args import BaseFrontendArgs, FrontendArgs

    refused = {dest: f"is set by the runtime; use {var} instead" for dest, var in OWNED.items()}
    http_server = {f.name for f in fields(FrontendArgs)} - {f.name for f in fields(BaseFrontendArgs)}
    for dest in sorted(http_server - set(_NOT_HTTP)):
        refused.setdefault(dest, "is an option of vLLM's own HTTP server, which the runtime replaces")
    for dest in _LAUNCHER:
        refused.setdefault(dest, "is an option of vLLM's launcher, which the runtime replaces")
    refused["model_tag"] = "(a positional argument) names a model; the model is MODEL_NAME"
    for dest in _UNMOUNTED:
        refused.setdefault(dest, "adds routes the runtime does not serve")
    return refused


def owned_argv(settings: RuntimeSettings) -> list[str]:
    return [
        f"--model={settings.model_name}",
        f"--served-model-name={settings.served_model_name}",
        f"--response-role={settings.openai_response_role}",
    ]


@dataclass
class EngineArgs:
    """vLLM's parsed arguments, and which variable set each option (for one-line errors)."""

    args: argparse.Namespace
    sources: dict[str, str] = field(default_factory=dict)  # dest -> variable (or VLLM_EXTRA_ARGS)
    flag_dests: dict[str, str] = field(default_factory=dict)  # every long option -> dest

    def config_error(self, message: str) -> ConfigError:
        """An engine-config validation error at load time, naming the variable behind it."""
        return engine_config_error(message, self.sources, self.flag_dests)

    def log_fields(self) -> dict[str, Any]:
        """For the start-up log line: every option a variable set, its parsed value and source."""
        return {
            dest: {"value": redact(dest, getattr(self.args, dest, None)), "from": source}
            for dest, source in sorted(self.sources.items())
        }


def _parse(parser: argparse.ArgumentParser, argv: list[str], namespace: argparse.Namespace | None = None):
    return parser.parse_args(argv, namespace)


class _Unset(list):
    """Pre-filled into every dest to see which ones VLLM_EXTRA_ARGS sets.

    A list, so that ``append`` actions (which copy what is there) still work;
    compared by identity.
    """


def _dests_set_by(parser: argparse.ArgumentParser, argv: list[str]) -> tuple[argparse.Namespace, set[str]]:
    """Parse ``argv`` alone; the dests it set, however it spelled them (``-asc``, ``--no-x``,
    ``--x.key``, a one-dash prefix)."""
    unset = _Unset()
    namespace = argparse.Namespace(**{a.dest: unset for a in parser._actions if a.dest != argparse.SUPPRESS})
    # vLLM warns about deprecated options whose value differs from their default.
    deprecated = getattr(parser, "_deprecated", None)
    if deprecated is not None:
        parser._deprecated = set()  # type: ignore[attr-defined]
    try:
        parsed = _parse(parser, argv, namespace)
    finally:
        if deprecated is not None:
            parser._deprecated = deprecated  # type: ignore[attr-defined]
    # A positional with nargs="?" always "matches" (nothing) and gets its default.
    positional_defaults = {a.dest: a.default for a in parser._actions if not a.option_strings}
    return parsed, {
        dest
        for dest, value in vars(parsed).items()
        if value is not unset and not (dest in positional_defaults and value == positional_defaults[dest])
    }


def _bad_variable(parser: argparse.ArgumentParser, env: EnvArgs, message: str) -> ConfigError:
    """The variable whose own tokens vLLM's parser refuses (each parsed alone)."""
    for var, argv in env.by_var.items():
        try:
            _parse(parser, argv)
        except Exception as exc:  # noqa: BLE001 - vLLM's types and validators raise their own
            return ConfigError(f"invalid {var}: {one_line(str(exc))}")
    return ConfigError(f"invalid engine options: {one_line(message)}")


# vLLM's --generation-config value for "vLLM's neutral defaults" (plus --override-generation-config).
GUIDE_GENERATION_CONFIG = "vllm"


def engine_args(
    environ: Mapping[str, str], settings: RuntimeSettings, parser: argparse.ArgumentParser | None = None
) -> EngineArgs:
    """vLLM's Namespace for this environment; a bad or refused option raises ConfigError (one line).

    Order, each later one winning: the runtime's own options, the variables
    of the worker rule, VLLM_EXTRA_ARGS. The generation defaults (the guide's
    temperature, the LIMIT_MAX_TOKENS default and ceiling) are merged under
    ``--override-generation-config`` from the variable and from
    VLLM_EXTRA_ARGS, in whatever syntax it was given (JSON or
    ``--override-generation-config.key value``).
    """
    from vllm.entrypoints.launchers.cli_args import validate_parsed_serve_args

    parser = parser or build_parser()
    refused = refused_options()
    options = derive_options(parser, ACCEPTED)
    env = environment_argv(environ, options, refused)
    base = owned_argv(settings) + env.argv
    try:
        base_args = _parse(parser, base)
    except Exception as exc:  # noqa: BLE001 - vLLM's types and validators raise their own
        raise _bad_variable(parser, env, str(exc)) from None

    extra = extra_tokens(settings.vllm_extra_args)
    try:
        extra_args, extra_dests = _dests_set_by(parser, extra)
    except Exception as exc:  # noqa: BLE001 - vLLM's types and validators raise their own
        raise ConfigError(f"invalid VLLM_EXTRA_ARGS: {one_line(str(exc))}") from None
    flag_dests = {flag: a.dest for a in parser._actions for flag in long_flags(a)}
    dest_flag = {dest: flag for flag, dest in reversed(list(flag_dests.items()))}
    for dest in sorted(extra_dests & set(refused)):
        name = dest_flag.get(dest, dest)
        raise ConfigError(f"invalid VLLM_EXTRA_ARGS: vLLM's {name} {refused[dest]}")

    try:
        args = _parse(parser, base + extra) if extra else base_args
    except Exception as exc:  # noqa: BLE001 - vLLM's types and validators raise their own
        raise ConfigError(f"invalid VLLM_EXTRA_ARGS: {one_line(str(exc))}") from None
    sources = dict(env.sources)
    sources.update({dest: "VLLM_EXTRA_ARGS" for dest in extra_dests})
    # vLLM's cross-checks (--enable-auto-tool-choice needs --tool-call-parser, the
    # chat template exists, ...): first on the variables alone, so a failure there
    # is theirs, then with VLLM_EXTRA_ARGS.
    checks = ((base_args, env.sources, "engine options"), (args, sources, "VLLM_EXTRA_ARGS"))
    for candidate, known, fallback in checks:
        try:
            validate_parsed_serve_args(candidate)
        except Exception as exc:  # noqa: BLE001 - vLLM's types and validators raise their own
            message = one_line(str(exc))
            var = attribute(message, known, flag_dests) or fallback
            raise ConfigError(f"invalid {var}: {message}") from None

    user = dict(base_args.override_generation_config or {})
    if "override_generation_config" in extra_dests:
        user.update(extra_args.override_generation_config or {})
    args.override_generation_config = generation_overrides(settings, user)
    if "generation_config" not in sources:
        # The guide's tables are the defaults of omitted sampling parameters, whatever the
        # model's generation_config.json suggests (vLLM's "auto"); vLLM still reads that file
        # for the model's special tokens. GENERATION_CONFIG=auto gives the model's back.
        args.generation_config = GUIDE_GENERATION_CONFIG
    if settings.adapters_file is not None and not getattr(args, "enable_lora", False):
        raise ConfigError(
            f"invalid ADAPTERS_FILE={settings.adapters_file!r}: LoRA adapters need ENABLE_LORA=true "
            "(vLLM's --enable-lora); the operator sets both"
        )
    return EngineArgs(args=args, sources=sources, flag_dests=flag_dests)


def parse_engine_args(
    argv: list[str], engine_args: str = "", settings: RuntimeSettings | None = None
) -> argparse.Namespace:
    """vLLM's server Namespace for a plain ``argv`` (hack/microbench_runtime.py builds vLLM's own app with it).

    No variables, no refusals: the runtime itself uses :func:`engine_args`.
    """
    from vllm.entrypoints.launchers.cli_args import validate_parsed_serve_args

    parser = build_parser()
    try:
        args = _parse(parser, argv + extra_tokens(engine_args))
        validate_parsed_serve_args(args)
    except Exception as exc:  # noqa: BLE001 - vLLM's types and validators raise their own
        raise ConfigError(f"invalid engine options: {one_line(str(exc))}") from None
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
    state: Any  # starlette State with vLLM's serving objects (openai_serving_chat, serving_embedding, ...)
    args: argparse.Namespace
    tasks: tuple[str, ...] = ()  # vLLM's supported tasks: "generate", "embed", "classify", ...
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


async def start_engine(
    args: argparse.Namespace, config_error: Callable[[str], ConfigError] | None = None
) -> Engine:
    """Load the model and build vLLM's serving layer over it.

    ``config_error`` turns vLLM's config validation message into the one
    line naming the variable (``EngineArgs.config_error``).

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
        raise (config_error or _config_error)(str(exc)) from None

    client = await _off_loop(
        AsyncLLM.from_vllm_config,
        vllm_config=vllm_config,
        usage_context=usage,
        enable_log_requests=engine_args.enable_log_requests,
        aggregate_engine_logging=engine_args.aggregate_engine_logging,
        disable_log_stats=engine_args.disable_log_stats,
    )
    try:
        supported_tasks = tuple(await client.get_supported_tasks())
        state = State()
        # Every serving object of vLLM's server (chat, completions, Responses,
        # Anthropic Messages, tokenizer, and for a pooling model embeddings,
        # score/rerank, classify), exactly as vLLM builds them; those the model
        # does not serve stay None, and their routes answer 400.
        await init_app_state(client, state, args, supported_tasks)
    except BaseException:
        client.shutdown()
        raise
    engine = Engine(client=client, state=state, args=args, tasks=supported_tasks)
    engine.start_stats_logging()
    # As vLLM's server does after start-up: move everything allocated so far
    # (weights' Python objects, tokenizer, serving state) out of the garbage
    # collector's view, so full collections during serving stay short.
    from vllm.utils.gc_utils import freeze_gc_heap

    freeze_gc_heap()
    return engine


def _config_error(message: str) -> ConfigError:
    return ConfigError(f"invalid engine configuration: {one_line(message)}")
