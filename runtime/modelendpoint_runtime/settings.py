"""The runtime's own settings, from environment variables.

Only the runtime's own variables live here (the served name, auth, listeners,
limits, timeouts, logs); vLLM's options reach vLLM by the worker rule of
``engine_env`` instead, derived from vLLM's parser, with no table of ours.

Pure (no I/O besides reading the mapping it is given), so the whole surface
is unit-tested: ``load_settings(environ)`` validates the variables and raises
:class:`ConfigError` with ONE line naming the variable and the accepted
values. It runs before vLLM is even imported: a bad value of ours stops the
process within a second.
"""

from __future__ import annotations

import shlex
from collections.abc import Mapping
from typing import Literal

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class ConfigError(Exception):
    """A bad setting; ``str(err)`` is the single line printed before exiting."""


KEYS_ACCEPTED = "one key or several separated by commas (or newlines), none empty"

# What each variable accepts, in words: the one-line error quotes it.
ACCEPTED: dict[str, str] = {
    "MODEL_NAME": "a Hugging Face model id or a local model folder (required)",
    "OPENAI_SERVED_MODEL_NAME_OVERRIDE": "a non-empty model name",
    "OPENAI_RESPONSE_ROLE": "a non-empty role name, e.g. assistant",
    "RAW_OPENAI_OUTPUT": "1 or 0 (also true/false)",
    "API_KEY": KEYS_ACCEPTED,
    "API_KEY_FILE": f"the path of a readable file holding {KEYS_ACCEPTED}",
    "API_KEY_FILE_POLL_SECONDS": "a number of seconds > 0",
    "HOST": "an address to listen on, e.g. 0.0.0.0",
    "PORT": "an integer from 1 to 65535",
    "METRICS_PORT": "an integer from 1 to 65535, not PORT (or empty: no metrics listener)",
    "ENDPOINT_ID": "a non-empty id without '/'",
    "VLLM_EXTRA_ARGS": "vLLM options in shell syntax, e.g. '--seed 0 --max-num-batched-tokens 4096'",
    "LIMIT_N": "a positive integer",
    "LIMIT_BEST_OF": "a positive integer",
    "LIMIT_MAX_TOKENS": "a positive integer",
    "LIMIT_LOGPROBS": "an integer >= 0",
    "LIMIT_PROMPTS": "a positive integer",
    "LIMIT_MESSAGES": "a positive integer",
    "LIMIT_STOP": "an integer >= 0",
    "MAX_REQUEST_BODY_BYTES": "a positive integer (bytes)",
    "MAX_HEADER_BYTES": "an integer >= 1024 (bytes)",
    "MAX_CONNECTIONS": "a positive integer",
    "MAX_CONCURRENT_REQUESTS": "a positive integer",
    "READ_TIMEOUT_SECONDS": "a number of seconds > 0",
    "WRITE_TIMEOUT_SECONDS": "a number of seconds > 0",
    "RETRY_AFTER_SECONDS": "a positive integer (seconds)",
    "DRAIN_TIMEOUT_SECONDS": "a number of seconds >= 0",
    "LOG_LEVEL": "one of debug, info, warning, error",
    "LOG_PROMPTS": "1 or 0 (also true/false)",
    "ADAPTERS_FILE": 'the path of a readable JSON list of {"name", "source"} LoRA adapters (or empty: none)',
    "ADAPTERS_POLL_SECONDS": "a number of seconds > 0",
    "TOOL_STRICT_DEFAULT": "1 or 0 (also true/false)",
}


def parse_keys(text: str) -> tuple[str, ...]:
    """The keys of an API_KEY value or API_KEY_FILE content; ValueError (no key in it) when unusable.

    Commas or newlines separate keys; whitespace around each is ignored, and
    so is the file's final newline. Empty (or only whitespace), or an empty
    entry, is refused: a key Secret holding just a newline must never mean
    "no auth".
    """
    stripped = text.strip()
    if not stripped:
        raise ValueError("empty")
    keys = tuple(k.strip() for k in stripped.replace("\r", "").replace("\n", ",").split(","))
    if any(not k for k in keys):
        raise ValueError("an empty key in the list")
    return keys


class RuntimeSettings(BaseSettings):
    """The runtime's own settings; field ``x`` is read from the variable ``X``."""

    model_config = SettingsConfigDict(case_sensitive=False, extra="ignore")

    model_name: str = Field(min_length=1)
    openai_served_model_name_override: str | None = None
    openai_response_role: str = Field(default="assistant", min_length=1)
    raw_openai_output: bool = True
    # Set means set: an empty API_KEY or API_KEY_FILE is refused, never "no auth".
    api_key: SecretStr | None = None
    api_key_file: str | None = None
    api_key_file_poll_seconds: float = Field(default=5.0, gt=0)
    host: str = Field(default="0.0.0.0", min_length=1)
    port: int = Field(default=8000, ge=1, le=65535)
    metrics_port: int | None = Field(default=None, ge=1, le=65535)
    endpoint_id: str | None = None
    vllm_extra_args: str = ""

    # Caps on request parameters (beyond them: 400).
    limit_n: int = Field(default=16, gt=0)
    limit_best_of: int = Field(default=16, gt=0)
    limit_max_tokens: int = Field(default=32768, gt=0)
    limit_logprobs: int = Field(default=20, ge=0)
    limit_prompts: int = Field(default=64, gt=0)
    limit_messages: int = Field(default=2048, gt=0)
    limit_stop: int = Field(default=16, ge=0)

    # What a client may hold: bytes, connections, time (slow clients).
    max_request_body_bytes: int = Field(default=8 * 1024 * 1024, gt=0)
    max_header_bytes: int = Field(default=32 * 1024, ge=1024)
    max_connections: int = Field(default=1024, gt=0)
    max_concurrent_requests: int = Field(default=256, gt=0)
    read_timeout_seconds: float = Field(default=30.0, gt=0)
    write_timeout_seconds: float = Field(default=30.0, gt=0)
    retry_after_seconds: int = Field(default=1, gt=0)
    drain_timeout_seconds: float = Field(default=30.0, ge=0)

    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_prompts: bool = False

    # LoRA adapters served beside the model, re-read while serving (adapters.py).
    adapters_file: str | None = None
    adapters_poll_seconds: float = Field(default=5.0, gt=0)
    # Function tools without an explicit "strict" are treated as strict: true.
    tool_strict_default: bool = True

    @field_validator("openai_served_model_name_override", "endpoint_id", "metrics_port", "adapters_file",
                     mode="before")  # fmt: skip
    @classmethod
    def _empty_is_unset(cls, value):
        # Kubernetes manifests often carry `VAR: ""` for "not set".
        if isinstance(value, str) and value.strip() == "":
            return None
        return value

    @field_validator("log_level", mode="before")
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
        if value is not None:
            parse_keys(value.get_secret_value())  # ValueError: the one-line error, redacted
        return value

    @field_validator("api_key_file")
    @classmethod
    def _key_file(cls, value: str | None) -> str | None:
        if value is not None and value.strip() == "":
            raise ValueError("empty")
        return value

    @field_validator("vllm_extra_args")
    @classmethod
    def _shell_syntax(cls, value: str) -> str:
        shlex.split(value)  # ValueError: unbalanced quotes
        return value

    @model_validator(mode="after")
    def _consistent(self) -> RuntimeSettings:
        if self.metrics_port is not None and self.metrics_port == self.port:
            raise _FieldError("metrics_port", "equals PORT")
        if self.api_key is not None and self.api_key_file is not None:
            raise _FieldError("api_key_file", "API_KEY is set too; set only one of them")
        return self

    @property
    def served_model_name(self) -> str:
        """The one name /models lists and requests must use."""
        return self.openai_served_model_name_override or self.model_name

    @property
    def auth_configured(self) -> bool:
        """API_KEY or API_KEY_FILE is set: every route but the probes needs a key, always."""
        return self.api_key is not None or self.api_key_file is not None

    @property
    def api_keys(self) -> tuple[str, ...]:
        """The literal API_KEY's keys (rotation: several at once); empty without API_KEY."""
        if self.api_key is None:
            return ()
        return parse_keys(self.api_key.get_secret_value())


class _FieldError(ValueError):
    """A cross-field check, reported under one variable."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(reason)
        self.field = field
        self.reason = reason


def load_settings(environ: Mapping[str, str]) -> RuntimeSettings:
    """Validate the environment; raise ConfigError with one line on the first bad variable."""
    # Only our own variables are passed in, so the process environment (and any
    # .env file) cannot leak in behind the caller's back in tests.
    names = {name.lower() for name in ACCEPTED}
    values = {k.lower(): v for k, v in environ.items() if k.lower() in names}
    try:
        return RuntimeSettings.model_validate(values)
    except ValidationError as exc:
        raise ConfigError(_one_line(exc, environ)) from None


# Variables whose values are never echoed, even malformed ones.
_SECRET = frozenset({"API_KEY"})


def _one_line(exc: ValidationError, environ: Mapping[str, str]) -> str:
    err = exc.errors()[0]
    field = str(err["loc"][0]) if err.get("loc") else "?"
    reason = None
    cause = (err.get("ctx") or {}).get("error")
    if isinstance(cause, _FieldError):
        field, reason = cause.field, cause.reason
    var = field.upper()
    accepted = ACCEPTED.get(var, "see docs/runtime.md")
    if err.get("type") == "missing":
        return f"{var} is not set; accepted values: {accepted}"
    value = _lookup(environ, var)
    shown = "<redacted>" if var in _SECRET else repr(value)
    if var == "API_KEY" and value is not None:
        reason = "set but empty" if value.strip() == "" else "an empty key in the list"
    elif var == "API_KEY_FILE" and value is not None and value.strip() == "":
        reason = "set but empty"
    detail = f": {reason}" if reason else ""
    return f"invalid {var}={shown}{detail}; accepted values: {accepted}"


def _lookup(environ: Mapping[str, str], var: str) -> str | None:
    for key, value in environ.items():
        if key.upper() == var:
            return value
    return None


# The guide's default sampling temperature (its parameter tables say 0.7;
# vLLM's own default is 1.0, or the model's generation_config.json).
GUIDE_DEFAULT_TEMPERATURE = 0.7


def generation_overrides(settings: RuntimeSettings, user: Mapping[str, object] | None = None) -> dict[str, object]:
    """vLLM's ``--override-generation-config`` value: the guide's defaults, the cap, then the user's.

    vLLM itself applies this dict: its keys become the default sampling
    parameters of every request that does not set them (the serving layer's
    ``default_sampling_params``), so no request mapping of ours is needed.

    * ``temperature`` 0.7, the guide's default; a value the user passes (the
      ``OVERRIDE_GENERATION_CONFIG`` variable, or ``--override-generation-config``
      in VLLM_EXTRA_ARGS) wins.
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
