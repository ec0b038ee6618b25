"""Held requests and the wake annotation: the state machine (pure, with an injected clock).

contract.md, "Wake and held requests": the gateway tells the operator how many
requests it holds for a ModelEndpoint with one annotation per gateway pod,

    held.gateway.serving.modelendpoint.dev/<gateway pod name> = {"held": N, "at": "<RFC 3339 UTC>"}

written with a JSON merge patch when it starts holding for a model, refreshed
every 5 s while it holds any, and removed (null) when it holds none. The
operator counts entries at most 15 s old; one with held > 0 on a ModelEndpoint
at zero replicas makes its autoscaler start a replica at once. This is the one
wake mechanism (``kubectl annotate`` with the same key wakes a model by hand).

:class:`HeldCounts` decides which writes are due; the writer in app.py does
them and reports back (``written`` / ``failed``). A failed write is retried
on the next tick (at most every ``retry_seconds``), so a brief API outage
delays a wake by a tick, not a refresh period.
"""

from __future__ import annotations

import datetime
import json
import re
from collections.abc import Callable
from dataclasses import dataclass

from modelendpoint_operator import constants as c

ANNOTATION_PREFIX = f"held.gateway.{c.GROUP}"
REFRESH_SECONDS = 5.0
RETRY_SECONDS = 1.0

Key = tuple[str, str]


def annotation_key(pod_name: str, worker: int | None = None) -> str:
    """This gateway's annotation key; the name part is at most 63 characters and ends alphanumeric.

    One worker of several (MEP_GATEWAY_WORKERS) adds ``-w<index>`` to the pod
    name: each worker holds and counts its own requests, and the operator adds
    up every fresh entry.
    """
    suffix = "" if worker is None else f"-w{worker}"
    name = pod_name[:63 - len(suffix)]
    name = (re.sub(r"[^A-Za-z0-9]+$", "", name) or "gateway") + suffix
    return f"{ANNOTATION_PREFIX}/{name}"


def rfc3339(epoch: float) -> str:
    return datetime.datetime.fromtimestamp(epoch, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def annotation_value(held: int, epoch: float) -> str:
    return json.dumps({"held": held, "at": rfc3339(epoch)}, separators=(",", ":"))


@dataclass
class _State:
    held: int = 0
    written_at: float | None = None    # monotonic time of the last successful write with held > 0
    written_held: int = 0
    present: bool = False              # our annotation is (believed to be) on the object
    failed_at: float | None = None


class HeldCounts:
    """How many requests this process holds per ModelEndpoint, and which annotation writes are due."""

    def __init__(self, clock: Callable[[], float], refresh_seconds: float = REFRESH_SECONDS,
                 retry_seconds: float = RETRY_SECONDS) -> None:
        self.clock = clock
        self.refresh_seconds = refresh_seconds
        self.retry_seconds = retry_seconds
        self._state: dict[Key, _State] = {}
        self.total = 0

    def held(self, key: Key) -> int:
        st = self._state.get(key)
        return st.held if st else 0

    def add(self, key: Key) -> bool:
        """One more request held for ``key``; True when it is the first (a write is due at once)."""
        st = self._state.setdefault(key, _State())
        st.held += 1
        self.total += 1
        return st.held == 1

    def remove(self, key: Key) -> bool:
        """One held request for ``key`` ended (forwarded, timed out, gone); True when none is left."""
        st = self._state.get(key)
        if st is None or st.held == 0:
            return False
        st.held -= 1
        self.total -= 1
        return st.held == 0

    def due(self) -> list[tuple[Key, int | None]]:
        """The writes to make now: (key, held count) to set, (key, None) to remove."""
        now = self.clock()
        out: list[tuple[Key, int | None]] = []
        for key, st in list(self._state.items()):
            if st.failed_at is not None and now - st.failed_at < self.retry_seconds:
                continue
            if st.held > 0:
                if st.written_at is None or now - st.written_at >= self.refresh_seconds:
                    out.append((key, st.held))
            elif st.present:
                out.append((key, None))
            else:
                del self._state[key]
        return out

    def written(self, key: Key, held: int | None) -> None:
        st = self._state.setdefault(key, _State())
        st.failed_at = None
        if held is None:
            st.present = False
            st.written_at = None
            if st.held == 0:
                del self._state[key]
        else:
            st.present = True
            st.written_at = self.clock()
            st.written_held = held

    def failed(self, key: Key) -> None:
        st = self._state.setdefault(key, _State())
        st.failed_at = self.clock()

    def gone(self, key: Key) -> None:
        """The ModelEndpoint was deleted: nothing to write on it any more."""
        st = self._state.get(key)
        if st is not None:
            st.present = False
            st.written_at = self.clock() if st.held else None
            if st.held == 0:
                del self._state[key]
