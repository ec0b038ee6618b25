"""Configuration from environment variables, and its translation to vLLM engine arguments.

Everything here is pure (no I/O besides reading the mapping it is given), so
the whole surface is unit-tested: ``load_settings(environ)`` validates the
variables and raises :class:`ConfigError` with ONE line naming the variable
and the accepted values; ``engine_argv(settings)`` turns them into the
command-line arguments vLLM's own OpenAI server parser understands, so every
vLLM engine argument stays reachable through ``VLLM_EXTRA_ARGS``.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Mapping
from typing import Literal

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class ConfigError(Exception):
    """A bad setting; ``str(err)`` is the single line printed before exiting."""


# What each variable accepts, in words: the one-line error quotes it.
ACCEPTED: dict[str, str] = {
    "MODEL_NAME": "a Hugging Face model id or a local model folder (required)",
    "OPENAI_SERVED_MODEL_NAME_OVERRIDE": "a non-empty model name",
    "OPENAI_RESPONSE_ROLE": "a non-empty role name, e.g. assistant",
    "RAW_OPENAI_OUTPUT": "1 or 0 (also true/false)",
    "API_KEY": "one key or several separated by commas, none empty",
    "HOST": "an address to listen on, e.g. 0.0.0.0",
    "PORT": "an integer from 1 to 65535",
    "ENDPOINT_ID": "a non-empty id without '/'",
    "MAX_MODEL_LEN": "a positive integer",
    "DTYPE": "one of auto, half, float16, bfloat16, float, float32",
    "TENSOR_PARALLEL_SIZE": "a positive integer",
    "GPU_MEMORY_UTILIZATION": "a number greater than 0 and at most 1",
    "QUANTIZATION": "a vLLM quantization method name, e.g. awq, gptq, fp8",
    "ENFORCE_EAGER": "1 or 0 (also true/false)",
    "TRUST_REMOTE_CODE": "1 or 0 (also true/false)",
    "MAX_NUM_SEQS": "a positive integer",
    "VLLM_EXTRA_ARGS": "extra vLLM engine arguments in shell syntax, e.g. '--seed 0 --max-num-batched-tokens 4096'",
    "LIMIT_N": "a positive integer",
    "LIMIT_BEST_OF": "a positive integer",
    "LIMIT_MAX_TOKENS": "a positive integer",
    "LIMIT_LOGPROBS": "an integer >= 0",
    "MAX_REQUEST_BODY_BYTES": "a positive integer (bytes)",
    "MAX_CONCURRENT_REQUESTS": "a positive integer",
    "RETRY_AFTER_SECONDS": "a positive integer (seconds)",
    "DRAIN_TIMEOUT_SECONDS": "a number of seconds >= 0",
    "LOG_LEVEL": "one of debug, info, warning, error",
    "LOG_PROMPTS": "1 or 0 (also true/false)",
}

# Options the runtime sets itself from its own variables: passing them again in
# VLLM_EXTRA_ARGS would make /models and the served name disagree.
_RESERVED_ENGINE_OPTIONS: dict[str, str] = {
    "--model": "MODEL_NAME",
    "--served-model-name": "OPENAI_SERVED_MODEL_NAME_OVERRIDE",
    "--response-role": "OPENAI_RESPONSE_ROLE",
    "--api-key": "API_KEY",
    "--host": "HOST",
    "--port": "PORT",
}


class RuntimeSettings(BaseSettings):
    """All runtime settings; field ``x`` is read from the variable ``X``."""

    model_config = SettingsConfigDict(case_sensitive=False, extra="ignore")

    model_name: str = Field(min_length=1)
    openai_served_model_name_override: str | None = None
    openai_response_role: str = Field(default="assistant", min_length=1)
    raw_openai_output: bool = True
    api_key: SecretStr | None = None
    host: str = Field(default="0.0.0.0", min_length=1)
    port: int = Field(default=8000, ge=1, le=65535)
    endpoint_id: str | None = None

    # vLLM engine arguments, named the way the guide's worker takes them.
    max_model_len: int | None = Field(default=None, gt=0)
    dtype: Literal["auto", "half", "float16", "bfloat16", "float", "float32"] = "auto"
    tensor_parallel_size: int = Field(default=1, gt=0)
    gpu_memory_utilization: float | None = Field(default=None, gt=0, le=1)
    quantization: str | None = None
    enforce_eager: bool = False
    trust_remote_code: bool = False
    max_num_seqs: int | None = Field(default=None, gt=0)
    vllm_extra_args: str = ""

    # Caps on request parameters (beyond them: 400).
    limit_n: int = Field(default=16, gt=0)
    limit_best_of: int = Field(default=16, gt=0)
    limit_max_tokens: int = Field(default=32768, gt=0)
    limit_logprobs: int = Field(default=20, ge=0)

    max_request_body_bytes: int = Field(default=8 * 1024 * 1024, gt=0)
    max_concurrent_requests: int = Field(default=256, gt=0)
    retry_after_seconds: int = Field(default=1, gt=0)
    drain_timeout_seconds: float = Field(default=30.0, ge=0)

    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_prompts: bool = False

    @field_validator(
        "openai_served_model_name_override", "quantization", "endpoint_id", "api_key", mode="before"
    )
    @classmethod
    def _empty_is_unset(cls, value):
        # Kubernetes manifests often carry `VAR: ""` for "not set".
        if isinstance(value, str) and value.strip() == "":
            return None
        return value

    @field_validator("log_level", "dtype", mode="before")
    @classmethod
    def _lower(cls, value):
        return value.lower() if isinstance(value, str) else value

    @field_validator("endpoint_id")
    @classmethod
    def _endpoint_id(cls, value: str | None) -> str | None:
        if value is not None and "/" in value:
            raise ValueError("contains '/'")
        return value

    @field_validator("api_key")
    @classmethod
    def _keys(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and any(k.strip() == "" for k in value.get_secret_value().split(",")):
            raise ValueError("empty key in the list")
        return value

    @property
    def served_model_name(self) -> str:
        """The one name /models lists and requests must use."""
        return self.openai_served_model_name_override or self.model_name

    @property
    def api_keys(self) -> tuple[str, ...]:
        """The accepted keys (rotation: several at once); empty means no auth."""
        if self.api_key is None:
            return ()
        return tuple(k.strip() for k in self.api_key.get_secret_value().split(","))


def load_settings(environ: Mapping[str, str]) -> RuntimeSettings:
    """Validate the environment; raise ConfigError with one line on the first bad variable."""
    # Only our own variables are passed in, so the process environment (and any
    # .env file) cannot leak in behind the caller's back in tests.
    names = {name.lower() for name in ACCEPTED}
    values = {k.lower(): v for k, v in environ.items() if k.lower() in names}
    try:
        settings = RuntimeSettings.model_validate(values)
    except ValidationError as exc:
        raise ConfigError(_one_line(exc, environ)) from None
    engine_argv(settings)  # VLLM_EXTRA_ARGS errors surface at load time too
    return settings


def _one_line(exc: ValidationError, environ: Mapping[str, str]) -> str:
    err = exc.errors()[0]
    field = str(err["loc"][0]) if err.get("loc") else "?"
    var = field.upper()
    accepted = ACCEPTED.get(var, "see docs/runtime.md")
    if err.get("type") == "missing":
        return f"{var} is not set; accepted values: {accepted}"
    # Never echo secrets back, even a malformed one.
    shown = "<redacted>" if var == "API_KEY" else repr(_lookup(environ, var))
    return f"invalid {var}={shown}; accepted values: {accepted}"


def _lookup(environ: Mapping[str, str], var: str) -> str | None:
    for key, value in environ.items():
        if key.upper() == var:
            return value
    return None


def _flag(value: object) -> str:
    return str(value)


def engine_argv(settings: RuntimeSettings) -> list[str]:
    """The vLLM OpenAI-server command-line arguments these settings stand for.

    Parsed later by vLLM's own parser (``make_arg_parser``), so defaults and
    validation of every engine argument stay vLLM's. VLLM_EXTRA_ARGS goes last:
    anything not covered by a named variable can be passed there.
    """
    argv = [
        "--model", settings.model_name,
        "--served-model-name", settings.served_model_name,
        "--response-role", settings.openai_response_role,
        "--dtype", settings.dtype,
        "--tensor-parallel-size", _flag(settings.tensor_parallel_size),
    ]  # fmt: skip
    if settings.max_model_len is not None:
        argv += ["--max-model-len", _flag(settings.max_model_len)]
    if settings.gpu_memory_utilization is not None:
        argv += ["--gpu-memory-utilization", _flag(settings.gpu_memory_utilization)]
    if settings.quantization is not None:
        argv += ["--quantization", settings.quantization]
    if settings.enforce_eager:
        argv.append("--enforce-eager")
    if settings.trust_remote_code:
        argv.append("--trust-remote-code")
    if settings.max_num_seqs is not None:
        argv += ["--max-num-seqs", _flag(settings.max_num_seqs)]
    argv += extra_engine_args(settings.vllm_extra_args)
    return argv


def extra_engine_args(raw: str) -> list[str]:
    """Split VLLM_EXTRA_ARGS (shell syntax) and refuse options the runtime owns."""
    try:
        extra = shlex.split(raw)
    except ValueError as exc:
        raise ConfigError(f"invalid VLLM_EXTRA_ARGS ({exc}); accepted values: {ACCEPTED['VLLM_EXTRA_ARGS']}") from None
    for arg in extra:
        option = arg.split("=", 1)[0].replace("_", "-")
        if option in _RESERVED_ENGINE_OPTIONS:
            raise ConfigError(
                f"invalid VLLM_EXTRA_ARGS: {option} is set by the runtime; "
                f"use {_RESERVED_ENGINE_OPTIONS[option]} instead"
            )
    return extra


# The guide's default sampling temperature (its parameter tables say 0.7;
# vLLM's own default is 1.0, or the model's generation_config.json).
GUIDE_DEFAULT_TEMPERATURE = 0.7


def generation_overrides(settings: RuntimeSettings, user: Mapping[str, object] | None = None) -> dict[str, object]:
    """vLLM's ``--override-generation-config`` value: the guide's defaults, the cap, then the user's.

    vLLM itself applies this dict: its keys become the default sampling
    parameters of every request that does not set them (the serving layer's
    ``default_sampling_params``), so no request mapping of ours is needed.

    * ``temperature`` 0.7, the guide's default; a value the user passes with
      ``--override-generation-config`` in VLLM_EXTRA_ARGS wins.
    * ``max_new_tokens`` = LIMIT_MAX_TOKENS: vLLM uses it as the default
      ``max_tokens`` *and* as a server-wide ceiling, still clamped to what the
      context leaves. Without it, a request omitting ``max_tokens`` would get
      the whole rest of the context and bypass the cap. A user's smaller value
      is kept; a larger one cannot lift the cap.
    """
    merged: dict[str, object] = {"temperature": GUIDE_DEFAULT_TEMPERATURE}
    merged.update(user or {})
    requested = merged.get("max_new_tokens")
    cap = settings.limit_max_tokens
    if not isinstance(requested, int) or isinstance(requested, bool) or requested <= 0 or requested > cap:
        merged["max_new_tokens"] = cap
    return merged


# Named variables and the vLLM option each one becomes: an argparse error about
# the option is reported under the variable the user actually set.
OPTION_TO_VAR: dict[str, str] = {
    "--model": "MODEL_NAME",
    "--served-model-name": "OPENAI_SERVED_MODEL_NAME_OVERRIDE",
    "--response-role": "OPENAI_RESPONSE_ROLE",
    "--dtype": "DTYPE",
    "--tensor-parallel-size": "TENSOR_PARALLEL_SIZE",
    "--max-model-len": "MAX_MODEL_LEN",
    "--gpu-memory-utilization": "GPU_MEMORY_UTILIZATION",
    "--quantization": "QUANTIZATION",
    "--enforce-eager": "ENFORCE_EAGER",
    "--trust-remote-code": "TRUST_REMOTE_CODE",
    "--max-num-seqs": "MAX_NUM_SEQS",
}

_OPTION_RE = re.compile(r"(--[a-z0-9][a-z0-9-]*)")


def engine_arg_error(message: str, engine_args: str = "") -> ConfigError:
    """Turn vLLM's argparse message into our one line, naming the variable behind it.

    An option that came from VLLM_EXTRA_ARGS is reported under VLLM_EXTRA_ARGS even if a
    named variable also maps to it: that is where the bad value was written.
    """
    message = " ".join(message.split())
    match = _OPTION_RE.search(message)
    option = match.group(1) if match else None
    var = OPTION_TO_VAR.get(option, "VLLM_EXTRA_ARGS") if option else "VLLM_EXTRA_ARGS"
    if option and option in engine_args.replace("_", "-"):
        var = "VLLM_EXTRA_ARGS"
    if var == "VLLM_EXTRA_ARGS":
        return ConfigError(f"invalid VLLM_EXTRA_ARGS: {message}")
    return ConfigError(f"invalid {var}: {message}; accepted values: {ACCEPTED[var]}")


def engine_config_error(message: str) -> ConfigError:
    """vLLM's engine-config validation message as one line naming the variable.

    Such messages name the engine field (``max_model_len``), not the option;
    the first named field decides the variable, else VLLM_EXTRA_ARGS.
    """
    message = " ".join(message.split())
    lowered = message.lower()
    for option, var in OPTION_TO_VAR.items():
        field_name = option.removeprefix("--").replace("-", "_")
        if field_name in lowered and var not in ("MODEL_NAME", "OPENAI_SERVED_MODEL_NAME_OVERRIDE", "OPENAI_RESPONSE_ROLE"):
            return ConfigError(f"invalid {var}: {message}")
    return ConfigError(f"invalid engine configuration (MODEL_NAME or VLLM_EXTRA_ARGS): {message}")
