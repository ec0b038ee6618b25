"""API keys: parsing a Secret's value, reading the caller's key, and a refreshed cache.

A ModelEndpoint's keys are the value of its ``apiKeySecretRef`` (a Secret
name and a key in it): one key, or several separated by commas or newlines
(rotation: all are accepted), surrounding whitespace ignored, as the runtime
reads them. An empty value or an empty entry is refused by the runtime; here
it opens nothing (fail closed) and is logged.

The gateway never lists or watches Secrets (its RBAC can only GET them by
name): :class:`KeyStore` reads each referenced Secret when first needed and
re-reads every ``refresh_seconds``, so a key removed from the Secret stops
working within one period. Keys that could not be re-read for three periods
are not trusted any more (503 ``keys_unavailable``: fail closed, but not a
401 that would blame the caller's key). Only SHA-256 digests of the keys are
kept; keys never reach a log line or a metric.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger(__name__)

# A comma or a newline, with any whitespace around it.
_SEPARATOR = re.compile(r"\s*[,\n]\s*")

Fetch = Callable[[str, str], Awaitable[Mapping[str, str] | None]]


class KeysUnavailable(Exception):
    """The keys of a Secret are not known well enough to decide (never read, or too stale)."""


def parse_keys(text: str) -> tuple[str, ...]:
    """The keys of a Secret value; ValueError for an empty value or an empty entry.

    Whitespace around the value and around each separator is ignored, so a
    value ending in a newline (``kubectl create secret --from-file``) or keys
    one per line after a comma are fine; two commas in a row are not.
    """
    stripped = text.strip()
    if not stripped:
        raise ValueError("the value is empty")
    entries = _SEPARATOR.split(stripped)
    if any(e == "" for e in entries):
        raise ValueError("it has an empty entry (two commas in a row, or one at an end)")
    return tuple(entries)


def digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()


@dataclass(frozen=True)
class KeySet:
    """Digests of the keys that open one ModelEndpoint (empty: nothing opens it)."""

    digests: frozenset[bytes] = frozenset()

    @classmethod
    def of(cls, keys: tuple[str, ...]) -> KeySet:
        return cls(frozenset(digest(k) for k in keys))

    def opens(self, token: str | None) -> bool:
        return token is not None and digest(token) in self.digests


def presented_key(authorization: str | None, x_api_key: str | None = None) -> str | None:
    """The caller's key: ``Authorization: Bearer <key>``, else ``x-api-key`` (Anthropic's SDK)."""
    if authorization:
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
    if x_api_key and x_api_key.strip():
        return x_api_key.strip()
    return None


@dataclass
class _Entry:
    data: Mapping[str, str] | None = None  # decoded Secret data; None: the Secret does not exist
    loaded_at: float | None = None         # monotonic time of the last successful read
    loading: asyncio.Future[None] | None = None
    parsed: dict[str, KeySet] = field(default_factory=dict)
    reported: set[str] = field(default_factory=set)


def decode_secret_data(secret: Mapping[str, Any]) -> dict[str, str]:
    """A Secret object's ``data`` (base64) and ``stringData`` as text."""
    out: dict[str, str] = {}
    for k, v in (secret.get("data") or {}).items():
        try:
            out[str(k)] = base64.b64decode(str(v)).decode("utf-8")
        except (ValueError, UnicodeDecodeError):
            out[str(k)] = ""
    for k, v in (secret.get("stringData") or {}).items():
        out[str(k)] = str(v)
    return out


class KeyStore:
    """Secrets' keys by (namespace, secret name), read on first use and refreshed."""

    def __init__(self, fetch: Fetch, refresh_seconds: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.fetch = fetch
        self.refresh_seconds = refresh_seconds
        self.clock = clock
        self.entries: dict[tuple[str, str], _Entry] = {}
        self.errors = 0
        # Called after each successful read of a Secret (the compiled data plane's snapshot follows keys).
        self.on_read: Callable[[], None] | None = None

    @property
    def max_age(self) -> float:
        return 3 * self.refresh_seconds

    async def keys(self, namespace: str, secret: str, field_name: str) -> KeySet:
        """The keys in ``secret[field_name]``; reads the Secret first if it was never read."""
        entry = self.entries.get((namespace, secret))
        if entry is None:
            entry = self.entries[(namespace, secret)] = _Entry()
        if entry.loaded_at is None:
            await self._load(namespace, secret, entry)
        assert entry.loaded_at is not None
        if self.clock() - entry.loaded_at > self.max_age:
            raise KeysUnavailable(f"{namespace}/{secret} not read for {self.clock() - entry.loaded_at:.0f} s")
        return self._keyset(namespace, secret, field_name, entry)

    def fresh(self, namespace: str, secret: str, field_name: str) -> KeySet | None:
        """The keys as last read, if that read is recent enough to be trusted (no I/O); else None."""
        entry = self.entries.get((namespace, secret))
        if entry is None or entry.loaded_at is None or self.clock() - entry.loaded_at > self.max_age:
            return None
        return self._keyset(namespace, secret, field_name, entry)

    def _keyset(self, namespace: str, secret: str, field_name: str, entry: _Entry) -> KeySet:
        cached = entry.parsed.get(field_name)
        if cached is not None:
            return cached
        value = None if entry.data is None else entry.data.get(field_name)
        problem = ""
        keys = KeySet()
        if entry.data is None:
            problem = "the Secret does not exist"
        elif value is None:
            problem = f"the Secret has no key {field_name!r}"
        else:
            try:
                keys = KeySet.of(parse_keys(value))
            except ValueError as exc:
                problem = f"its value is not a key list: {exc}"
        if problem and field_name not in entry.reported:
            entry.reported.add(field_name)
            logger.error("API keys of Secret %s/%s (key %r) open nothing: %s", namespace, secret, field_name, problem)
        entry.parsed[field_name] = keys
        return keys

    async def _load(self, namespace: str, secret: str, entry: _Entry) -> None:
        if entry.loading is None:
            entry.loading = asyncio.ensure_future(self._read(namespace, secret, entry))
        loading = entry.loading
        try:
            await asyncio.shield(loading)
        except Exception as exc:  # noqa: BLE001 - any failure to read: unknown keys
            raise KeysUnavailable(f"{namespace}/{secret}: {exc}") from None
        if entry.loaded_at is None:
            raise KeysUnavailable(f"{namespace}/{secret} could not be read")

    async def _read(self, namespace: str, secret: str, entry: _Entry) -> None:
        try:
            data = await self.fetch(namespace, secret)
        except Exception as exc:
            self.errors += 1
            logger.warning("could not read Secret %s/%s for API keys: %s", namespace, secret, exc)
            raise
        finally:
            entry.loading = None
        if data != entry.data or entry.loaded_at is None:
            entry.data = dict(data) if data is not None else None
            entry.parsed.clear()
            entry.reported.clear()
        entry.loaded_at = self.clock()
        if self.on_read is not None:
            self.on_read()

    def retain(self, refs: set[tuple[str, str]]) -> None:
        """Forget Secrets no ModelEndpoint references any more."""
        for ref in [r for r in self.entries if r not in refs]:
            del self.entries[ref]

    def touch(self, refs: set[tuple[str, str]]) -> list[tuple[str, str]]:
        """Entries for refs not known yet (read them soon, before a request needs them)."""
        new = [r for r in refs if r not in self.entries]
        for r in new:
            self.entries[r] = _Entry()
        return new

    async def refresh(self, namespace: str, secret: str) -> None:
        entry = self.entries.get((namespace, secret))
        if entry is None or entry.loading is not None:
            return
        entry.loading = asyncio.ensure_future(self._read(namespace, secret, entry))
        try:
            await asyncio.shield(entry.loading)
        except Exception:  # noqa: BLE001 - logged and counted in _read; the old keys age out
            pass

    async def refresh_all(self, concurrency: int = 8) -> None:
        """Re-read every Secret in use (a few at a time)."""
        sem = asyncio.Semaphore(concurrency)

        async def one(ref: tuple[str, str]) -> None:
            async with sem:
                await self.refresh(*ref)

        await asyncio.gather(*(one(r) for r in list(self.entries)))
