"""Bearer-key authentication with key rotation, from API_KEY or a key file re-read while serving.

``API_KEY`` holds one key or several separated by commas: during a rotation
both the old and the new key are accepted. ``API_KEY_FILE`` names a file
with the same content (commas or newlines), the way Kubernetes projects a
Secret into a pod; the runtime re-reads it every ``API_KEY_FILE_POLL_SECONDS``,
so a key removed from the Secret stops working without a restart.

Auth fails closed, always: set-but-empty at start is a bad setting (the
process does not start), and a file that later turns empty, loses an entry or
cannot be read refuses every request (503 ``api_keys_unavailable``, /ready
503) until it is right again. Never "no auth" once a key was configured.

Comparison is constant-time and always walks every configured key, so
neither timing nor the position of a match reveals anything about the keys.
Keys are never logged, nor is the file's content.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from collections.abc import Sequence

from .settings import ACCEPTED, ConfigError, RuntimeSettings, parse_keys

# Paths a probe reaches without a key: liveness and readiness. (/metrics needs
# the key here; METRICS_PORT serves it without one.)
PUBLIC_PATHS = frozenset({"/health", "/ready"})


def bearer_token(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, else None."""
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer":
        return None
    token = token.strip()
    return token or None


def key_matches(token: str | None, keys: Sequence[bytes]) -> bool:
    """Constant-time check of ``token`` against every configured key."""
    if token is None:
        return False
    candidate = token.encode("utf-8", "surrogateescape")
    ok = False
    for key in keys:
        # No short-circuit: every key is compared whatever the outcome.
        ok |= hmac.compare_digest(candidate, key)
    return ok


def encode_keys(keys: Sequence[str]) -> tuple[bytes, ...]:
    return tuple(k.encode("utf-8") for k in keys)


def read_key_file(path: str) -> tuple[str, ...]:
    """The keys in ``path``; ValueError saying why they are unusable (never quoting the content)."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
        raise ValueError(f"cannot read it ({reason})") from None
    try:
        return parse_keys(text)
    except ValueError as exc:
        raise ValueError(f"the file holds {exc}" if str(exc) != "empty" else "the file is empty") from None


class KeyRing:
    """The keys accepted now; what the Guard reads on every request (plain attributes: hot path).

    ``required``: a key is needed (API_KEY or API_KEY_FILE is set).
    ``keys``: the accepted keys; with ``required`` and no keys, every request
    is refused (``error`` says why, for the log).
    """

    def __init__(self, keys: Sequence[str] = (), required: bool | None = None) -> None:
        self.keys: tuple[bytes, ...] = encode_keys(keys)
        self.required = bool(keys) if required is None else required
        self.error: str | None = None
        self._source: tuple[str, ...] = tuple(keys)

    @property
    def usable(self) -> bool:
        return not self.required or bool(self.keys)

    def replace(self, keys: Sequence[str]) -> bool:
        """Accept exactly ``keys`` from now on; True if anything changed."""
        changed = tuple(keys) != self._source or self.error is not None
        self._source = tuple(keys)
        self.keys = encode_keys(keys)
        self.error = None
        return changed

    def fail(self, reason: str) -> bool:
        """Refuse every request from now on (fail closed); True if this is news."""
        changed = self.error != reason
        self.keys = ()
        self._source = ()
        self.error = reason
        return changed


def initial_keyring(settings: RuntimeSettings) -> KeyRing:
    """The keys at start; an unusable API_KEY_FILE is a bad setting (one line naming it)."""
    if settings.api_key_file is not None:
        try:
            keys = read_key_file(settings.api_key_file)
        except ValueError as exc:
            raise ConfigError(
                f"invalid API_KEY_FILE={settings.api_key_file!r}: {exc}; accepted values: {ACCEPTED['API_KEY_FILE']}"
            ) from None
        return KeyRing(keys, required=True)
    return KeyRing(settings.api_keys, required=settings.api_key is not None)


async def watch_key_file(ring: KeyRing, path: str, period: float, log: logging.Logger) -> None:
    """Re-read the key file every ``period`` seconds for good: rotation without a restart.

    The file is a few bytes on a local (Secret) volume: read on the event
    loop, no thread. Kubernetes swaps a Secret volume's content atomically, so
    a read never sees half an update; anything unusable fails closed.
    """
    while True:
        await asyncio.sleep(period)
        try:
            keys = read_key_file(path)
        except ValueError as exc:
            if ring.fail(str(exc)):
                log.error(
                    "API keys unusable: refusing every request",
                    extra={"fields": {"variable": "API_KEY_FILE", "path": path, "reason": str(exc)}},
                )
            continue
        if ring.replace(keys):
            log.info("API keys reloaded", extra={"fields": {"path": path, "keys": len(keys)}})
