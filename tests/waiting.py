"""Wait-for-condition helper shared by the test tiers: poll, never sleep blindly."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_for(
    probe: Callable[[], T], *, timeout: float, what: str, interval: float = 0.25
) -> T:
    """Call ``probe`` until it returns something truthy; return that, or fail naming ``what``.

    Exceptions raised by ``probe`` count as "not yet" until the deadline, then
    the last one is reported.
    """
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while True:
        try:
            value = probe()
            if value:
                return value
        except Exception as exc:  # noqa: BLE001 - "not yet"; reported on timeout
            last_error = exc
        if time.monotonic() >= deadline:
            detail = f": last error: {last_error!r}" if last_error else ""
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}{detail}")
        time.sleep(interval)
