"""Bearer-key authentication with key rotation.

``API_KEY`` holds one key or several separated by commas: during a rotation
both the old and the new key are accepted. Comparison is constant-time and
always walks every configured key, so neither timing nor the position of a
match reveals anything about the keys.
"""

from __future__ import annotations

import hmac
from collections.abc import Sequence

# Paths a probe or scraper reaches without a key: liveness and readiness.
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
