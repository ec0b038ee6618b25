"""LoRA adapters from ADAPTERS_FILE, loaded and unloaded in-process while the model serves.

The operator writes ``spec.adapters`` into a ConfigMap the pod mounts
(``ADAPTERS_FILE``, a JSON list of ``{"name", "source"}``; ``source`` a
Hugging Face id or a path on the model-cache volume) and sets
``ENABLE_LORA=true``. The runtime:

* reads the file at start: unreadable or malformed is a bad setting (one
  line naming ADAPTERS_FILE, exit 2), before the model loads;
* loads every listed adapter once the engine is up, before ``/ready`` turns
  200 (a replica that starts later serves the current list from its first
  request); one that fails does not hold readiness back;
* re-reads the file every ``ADAPTERS_POLL_SECONDS`` and loads added
  adapters, unloads removed ones and reloads one whose source changed, with
  vLLM's own runtime LoRA loading (``OpenAIServingModels.load_lora_adapter``,
  which also checks the adapter in the engine): no restart. A file that
  turns unreadable or malformed later changes nothing (logged);
* retries a failed adapter every :data:`RETRY_SECONDS`; one adapter failing
  leaves the others serving;
* reports each adapter's state and vLLM's error on ``GET /adapters``.

Unloading follows vLLM's own ``/v1/unload_lora_adapter``: the name stops
being served at once; requests already running with it finish; its weights
leave the engine's adapter cache (``MAX_CPU_LORAS``) when space is needed.

:func:`parse_adapters` is pure; :class:`Adapters` drives vLLM's serving
models object (the seam the unit tests replace).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass
from typing import Any

from .settings import ACCEPTED, ConfigError

RETRY_SECONDS = 60.0
LOADED, LOADING, FAILED = "loaded", "loading", "failed"


@dataclass(frozen=True)
class AdapterSpec:
    name: str
    source: str


def parse_adapters(text: str, served: str) -> tuple[AdapterSpec, ...]:
    """The adapters of an ADAPTERS_FILE's content; ValueError saying what is wrong.

    A JSON list of objects with non-empty string ``name`` and ``source``;
    names unique and not the served model's name (the CRD checks the same).
    Unknown keys are ignored, so the operator may add some later.
    """
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise ValueError(f"not JSON ({exc})") from None
    if not isinstance(data, list):
        raise ValueError("not a JSON list")
    found: list[AdapterSpec] = []
    names: set[str] = set()
    for i, item in enumerate(data):
        if not isinstance(item, dict):
            raise ValueError(f"item {i} is not an object")
        name, source = item.get("name"), item.get("source")
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"item {i} has no name")
        if not isinstance(source, str) or not source.strip():
            raise ValueError(f"adapter {name!r} has no source")
        if name in names:
            raise ValueError(f"adapter {name!r} is listed twice")
        if name == served:
            raise ValueError(f"adapter {name!r} has the served model's name")
        names.add(name)
        found.append(AdapterSpec(name, source.strip()))
    return tuple(found)


def read_adapters(path: str, served: str) -> tuple[AdapterSpec, ...]:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
        raise ValueError(f"cannot read it ({reason})") from None
    return parse_adapters(text, served)


@dataclass
class AdapterStatus:
    name: str
    source: str
    state: str
    error: str | None = None
    retry_at: float = 0.0  # monotonic time of the next attempt, when failed

    def report(self) -> dict[str, Any]:
        return {"name": self.name, "source": self.source, "state": self.state, "error": self.error}


class Adapters:
    """The adapters the file lists and what became of each on this replica."""

    def __init__(self, path: str | None, served: str, poll_seconds: float = 5.0,
                 log: logging.Logger | None = None) -> None:  # fmt: skip
        self.path = path
        self.served = served
        self.poll_seconds = poll_seconds
        self.log = log or logging.getLogger(__name__)
        self.wanted: tuple[AdapterSpec, ...] = ()
        self.status: dict[str, AdapterStatus] = {}
        self.file_error: str | None = None

    def read_at_start(self) -> None:
        """The file's adapters at start; a bad file is a bad setting (ConfigError, one line)."""
        if self.path is None:
            return
        try:
            self.wanted = read_adapters(self.path, self.served)
        except ValueError as exc:
            raise ConfigError(
                f"invalid ADAPTERS_FILE={self.path!r}: {exc}; accepted values: {ACCEPTED['ADAPTERS_FILE']}"
            ) from None
        for spec in self.wanted:
            self.status[spec.name] = AdapterStatus(spec.name, spec.source, LOADING)

    def state_of(self, name: str) -> AdapterStatus | None:
        return self.status.get(name)

    def report(self) -> dict[str, Any]:
        """``GET /adapters``: the listed adapters, in the file's order, and why the file is unusable if it is."""
        order = {spec.name: i for i, spec in enumerate(self.wanted)}
        entries = sorted(self.status.values(), key=lambda s: order.get(s.name, len(order)))
        body: dict[str, Any] = {"adapters": [s.report() for s in entries]}
        if self.file_error is not None:
            body["file_error"] = self.file_error
        return body

    def reread(self) -> bool:
        """Read the file again; False (and the current list kept) if it is unusable."""
        if self.path is None:
            return False
        try:
            wanted = read_adapters(self.path, self.served)
        except ValueError as exc:
            if self.file_error != str(exc):
                self.log.error("adapters file unusable: keeping the current adapters",
                               extra={"fields": {"variable": "ADAPTERS_FILE", "path": self.path,
                                                 "reason": str(exc)}})  # fmt: skip
            self.file_error = str(exc)
            return False
        self.file_error = None
        self.wanted = wanted
        return True

    async def reconcile(self, models: Any) -> None:
        """Make what ``models`` (vLLM's ``OpenAIServingModels``) serves match the list: unload, then load."""
        from vllm.entrypoints.serve.lora.protocol import UnloadLoRAAdapterRequest

        wanted = {spec.name: spec for spec in self.wanted}
        for name, status in list(self.status.items()):
            spec = wanted.get(name)
            if spec is not None and spec.source == status.source:
                continue
            if status.state == LOADED:
                await models.unload_lora_adapter(UnloadLoRAAdapterRequest(lora_name=name))
                self.log.info("adapter unloaded", extra={"fields": {"adapter": name, "source": status.source}})
            del self.status[name]
        now = time.monotonic()
        for spec in self.wanted:
            current = self.status.get(spec.name)
            if current is None:
                current = self.status[spec.name] = AdapterStatus(spec.name, spec.source, LOADING)
            elif current.state == LOADED or (current.state == FAILED and now < current.retry_at):
                continue
            await self._load(models, current)

    async def _load(self, models: Any, status: AdapterStatus) -> None:
        from vllm.entrypoints.serve.engine.protocol import ErrorResponse
        from vllm.entrypoints.serve.lora.protocol import LoadLoRAAdapterRequest

        status.state = LOADING
        started = time.perf_counter()
        try:
            result = await models.load_lora_adapter(LoadLoRAAdapterRequest(lora_name=status.name,
                                                                           lora_path=status.source))  # fmt: skip
            error = result.error.message if isinstance(result, ErrorResponse) else None
        except Exception as exc:  # noqa: BLE001 - vLLM's loader raises its own; reported per adapter
            error = f"{type(exc).__name__}: {exc}"
        fields: dict[str, Any] = {"adapter": status.name, "source": status.source}
        if error is None:
            status.state, status.error = LOADED, None
            fields["load_s"] = round(time.perf_counter() - started, 2)
            self.log.info("adapter loaded", extra={"fields": fields})
        else:
            status.state, status.error = FAILED, " ".join(error.split())[:1000]
            status.retry_at = time.monotonic() + RETRY_SECONDS
            self.log.error("adapter failed to load", extra={"fields": {**fields, "reason": status.error}})

    async def watch(self, models: Any) -> None:
        """Re-read the file every ``poll_seconds`` and reconcile, for good."""
        while True:
            await asyncio.sleep(self.poll_seconds)
            self.reread()
            try:
                await self.reconcile(models)
            except Exception as exc:  # noqa: BLE001 - keep watching; the next round retries
                self.log.error("adapters reconcile failed", exc_info=exc)
