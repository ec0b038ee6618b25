"""Operator settings, from ``MEP_OPERATOR_*`` environment variables.

``load_settings(environ)`` validates them and raises :class:`SettingsError`
whose text is ONE line naming the bad variable; ``main()`` prints it and exits
with status 2. Every setting is documented in docs/operator.md.
"""

from __future__ import annotations

import random
import re
from collections.abc import Mapping
from typing import Literal

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

ENV_PREFIX = "MEP_OPERATOR_"
DEFAULT_RUNTIME_IMAGE = "ghcr.io/modelendpoint/modelendpoint-runtime:0.1.0"

_NAMESPACE_RE = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


class SettingsError(Exception):
    """A bad setting; ``str(err)`` is the single line printed before exiting."""


class OperatorSettings(BaseSettings):
    """Field ``x`` is read from ``MEP_OPERATOR_X``."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, case_sensitive=False, extra="ignore")

    # Where to watch: empty or "*" = every namespace (cluster-wide); else a comma list.
    namespaces: str = ""
    default_runtime_image: str = Field(default=DEFAULT_RUNTIME_IMAGE, min_length=1)
    default_image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"
    default_ingress_class: str | None = None
    cluster_domain: str = Field(default="cluster.local", min_length=1)

    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["json", "plain"] = "json"

    # HTTP listeners: Prometheus metrics and kopf's liveness probe (0 disables one).
    metrics_port: int = Field(default=9090, ge=0, le=65535)
    liveness_port: int = Field(default=8080, ge=0, le=65535)
    bind_address: str = "0.0.0.0"

    # kopf peering: replicas with the highest priority run, the others pause.
    # Unset priority: a random one per process, so that of two replicas exactly
    # one is active (kopf pauses ALL operators whose priorities are equal).
    # Bounds on concurrent work, so that a burst of thousands of objects neither floods
    # the API server nor the operator's memory: kopf's per-object workers per watched
    # kind (the watch stream waits for a free one), the reconciler's API requests.
    worker_limit: int = Field(default=64, ge=1, le=100000)
    max_api_requests: int = Field(default=16, ge=1, le=1000)

    # The autoscaler: how often it reads the replicas' load, and how many metrics
    # requests it has in flight at once (over all ModelEndpoints).
    autoscaling_interval_seconds: float = Field(default=5.0, ge=0.2, le=300)
    autoscaling_max_scrapes: int = Field(default=32, ge=1, le=10000)

    # The gateway is reachable from outside the cluster (the chart sets it as it sets the
    # gateway's MEP_GATEWAY_PUBLIC): a keyless ModelEndpoint without allowUnauthenticated is
    # then not routable there, and its Routable condition says so.
    gateway_public: bool = False
    standalone: bool = False
    peering_name: str = Field(default="modelendpoint-operator", min_length=1)
    peering_priority: int | None = Field(default=None, ge=0, le=2**31 - 1)
    peering_create: bool = True

    @field_validator("log_level", mode="before")
    @classmethod
    def _lower(cls, value):
        return value.lower() if isinstance(value, str) else value

    @field_validator("default_ingress_class", mode="before")
    @classmethod
    def _empty_is_unset(cls, value):
        if isinstance(value, str) and value.strip() == "":
            return None
        return value

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

    @property
    def clusterwide(self) -> bool:
        return self.namespaces in ("", "*")

    @property
    def namespace_list(self) -> list[str]:
        if self.clusterwide:
            return []
        return sorted({n.strip() for n in self.namespaces.split(",") if n.strip()})

    def effective_priority(self) -> int:
        if self.peering_priority is not None:
            return self.peering_priority
        return random.SystemRandom().randint(1, 2**31 - 1)


def load_settings(environ: Mapping[str, str]) -> OperatorSettings:
    """Validate the ``MEP_OPERATOR_*`` variables of ``environ``; one-line error on the first bad one."""
    values = {
        k[len(ENV_PREFIX):].lower(): v
        for k, v in environ.items()
        if k.upper().startswith(ENV_PREFIX)
    }
    known = set(OperatorSettings.model_fields)
    unknown = sorted(k for k in values if k not in known)
    if unknown:
        raise SettingsError(
            f"unknown setting {ENV_PREFIX}{unknown[0].upper()}; known settings: "
            + ", ".join(ENV_PREFIX + k.upper() for k in sorted(known))
        )
    try:
        # A prefix no variable has keeps pydantic-settings from also reading os.environ:
        # only the mapping given here counts (tests pass their own).
        return OperatorSettings(_env_prefix="__MEP_OPERATOR_UNUSED__", **values)  # type: ignore[arg-type]
    except ValidationError as exc:
        err = exc.errors()[0]
        field = str(err["loc"][0]) if err["loc"] else "?"
        var = ENV_PREFIX + field.upper()
        shown = values.get(field)
        msg = err["msg"]
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]
        raise SettingsError(f"invalid {var}={shown!r}: {msg}") from None
