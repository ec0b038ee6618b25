"""Gateway settings, from ``MEP_GATEWAY_*`` environment variables.

``load_settings(environ)`` validates them and raises :class:`SettingsError`
whose text is ONE line naming the bad variable; ``main()`` prints it and exits
with status 2. An unknown ``MEP_GATEWAY_*`` variable is an error too (a typo
must not silently keep a default). Every setting is documented in
docs/gateway.md.
"""

from __future__ import annotations

import re
import socket
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

ENV_PREFIX = "MEP_GATEWAY_"

_NAMESPACE_RE = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
# A pod name is a DNS subdomain; it becomes part of an annotation key.
_POD_NAME_RE = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")


class SettingsError(Exception):
    """A bad setting; ``str(err)`` is the single line printed before exiting."""


class GatewaySettings(BaseSettings):
    """Field ``x`` is read from ``MEP_GATEWAY_X``."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, case_sensitive=False, extra="ignore")

    # Scope: empty or "*" = every namespace; else a comma-separated list.
    namespaces: str = ""

    # Listeners. The API (and /healthz, /readyz) on port; Prometheus on metrics_port (0: off).
    bind_address: str = "0.0.0.0"
    port: int = Field(default=8080, ge=1, le=65535)
    metrics_port: int = Field(default=9090, ge=0, le=65535)

    # This process' name in the wake annotation (the chart passes the pod name).
    pod_name: str = Field(default_factory=lambda: socket.gethostname().lower())

    # Holding requests for a model without a ready replica (waking from zero, loading).
    hold_timeout_seconds: float = Field(default=600.0, gt=0, le=86400)
    max_held_requests: int = Field(default=1000, ge=0, le=1_000_000)
    hold_keepalive_seconds: float = Field(default=10.0, gt=0, le=3600)
    retry_after_seconds: int = Field(default=5, ge=0, le=3600)

    # Forwarding: tries across replicas for a connection failure or a 503 before
    # the first byte went to the client; connect timeout; pooled connection idle
    # time (below the runtime's 5 s keep-alive so the replica never closes first).
    max_attempts: int = Field(default=3, ge=1, le=20)
    connect_timeout_seconds: float = Field(default=5.0, gt=0, le=300)
    upstream_idle_seconds: float = Field(default=4.0, gt=0, le=3600)
    max_idle_connections_per_replica: int = Field(default=64, ge=0, le=100_000)

    # Client side: request size limits and idle keep-alive connections.
    max_body_bytes: int = Field(default=32 * 1024 * 1024, ge=1024, le=2**31)
    max_header_bytes: int = Field(default=64 * 1024, ge=1024, le=16 * 1024 * 1024)
    client_idle_seconds: float = Field(default=120.0, gt=0, le=86400)
    # A client that reads nothing for this long while its socket is full is cut (the runtime's
    # WRITE_TIMEOUT_SECONDS, the same default): it would hold the replica's stream.
    client_write_timeout_seconds: float = Field(default=30.0, gt=0, le=86400)

    # API keys are re-read from their Secrets this often; keys older than three
    # periods without a successful read are not trusted (503, fail closed).
    key_refresh_seconds: float = Field(default=10.0, gt=0, le=300)

    # Reachable from outside the cluster (the chart sets it with gateway.ingress.enabled or a
    # LoadBalancer/NodePort Service): a ModelEndpoint without apiKeySecretRef is then served
    # only with allowUnauthenticated: true, the opt-in its own Ingress needs.
    public: bool = False

    # SIGTERM: in-flight requests (streams included) may finish for this long.
    drain_timeout_seconds: float = Field(default=60.0, ge=0, le=86400)

    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["json", "plain"] = "json"
    access_log: bool = True
    # Adds x-modelendpoint-replica: <namespace>/<pod> to responses (tests, debugging).
    replica_header: bool = False
    event_loop: Literal["auto", "uvloop", "asyncio"] = "auto"
    # Worker processes sharing the API port (SO_REUSEPORT), each a whole gateway; 0: one per usable CPU.
    # With data_plane compiled: the compiled data plane's threads (this process stays one).
    workers: int = Field(default=1, ge=0, le=64)
    # Who serves the API port: "python" (this process, every request) or "compiled": the binary
    # modelendpoint-gateway-dataplane serves plain requests for ready models and hands every other
    # connection to this process (dataplane.py). dataplane_binary: its path (empty: on PATH, else
    # beside this Python).
    data_plane: Literal["python", "compiled"] = "python"
    dataplane_binary: str = ""

    @field_validator("log_level", "log_format", "event_loop", "data_plane", mode="before")
    @classmethod
    def _lower(cls, value):
        return value.lower().strip() if isinstance(value, str) else value

    @field_validator("namespaces")
    @classmethod
    def _namespaces(cls, value: str) -> str:
        value = value.strip()
        if value in ("", "*"):
            return value
        for ns in (n.strip() for n in value.split(",")):
            if not _NAMESPACE_RE.match(ns) or len(ns) > 63:
                raise ValueError(f"{ns!r} is not a namespace name")
        return value

    @field_validator("pod_name")
    @classmethod
    def _pod_name(cls, value: str) -> str:
        value = value.strip()
        if not _POD_NAME_RE.match(value) or len(value) > 253:
            raise ValueError("not a pod name (lower-case letters, digits, '-' and '.')")
        return value

    @property
    def clusterwide(self) -> bool:
        return self.namespaces in ("", "*")

    @property
    def namespace_list(self) -> list[str]:
        if self.clusterwide:
            return []
        return sorted({n.strip() for n in self.namespaces.split(",") if n.strip()})


def load_settings(environ: Mapping[str, str]) -> GatewaySettings:
    """Validate the ``MEP_GATEWAY_*`` variables of ``environ``; one-line error on the first bad one."""
    values: dict[str, Any] = {k[len(ENV_PREFIX):].lower(): v for k, v in environ.items()
                              if k.upper().startswith(ENV_PREFIX)}
    known = set(GatewaySettings.model_fields)
    unknown = sorted(k for k in values if k not in known)
    if unknown:
        raise SettingsError(
            f"unknown setting {ENV_PREFIX}{unknown[0].upper()}; known settings: "
            + ", ".join(ENV_PREFIX + k.upper() for k in sorted(known)))
    try:
        # A prefix no variable has keeps pydantic-settings from also reading os.environ.
        return GatewaySettings(_env_prefix="__MEP_GATEWAY_UNUSED__", **values)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = str(err["loc"][0]) if err["loc"] else "?"
        var = ENV_PREFIX + field.upper()
        msg = err["msg"].removeprefix("Value error, ")
        raise SettingsError(f"invalid {var}={values.get(field)!r}: {msg}") from None
