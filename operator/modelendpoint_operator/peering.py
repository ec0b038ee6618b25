"""Whether this operator process is the active one of its peers (pure; no I/O).

kopf pauses its own handlers when a peer with a higher (or an equal) priority is
alive in the peering object's status, and resumes when they are gone. The
operator's own loops (the work queue's retries, the autoscaler) must follow the
same verdict, or a paused replica would still scale and write. kopf keeps that
verdict private, so this module applies kopf's documented rule to the same
public data, the keep-alives kopf writes: ``status: {<identity>: {priority,
lifetime, lastseen}}`` of the ClusterKopfPeering (or of each namespace's
KopfPeering).
"""

from __future__ import annotations

import datetime
from collections.abc import Iterable, Mapping
from typing import Any


def _alive(entry: Mapping[str, Any], now: datetime.datetime) -> bool:
    try:
        seen = datetime.datetime.fromisoformat(str(entry["lastseen"]).replace("Z", "+00:00"))
        lifetime = float(entry.get("lifetime", 60))
    except (KeyError, ValueError, TypeError):
        return False
    if seen.tzinfo is None:
        seen = seen.replace(tzinfo=datetime.UTC)
    return seen + datetime.timedelta(seconds=lifetime) > now


def active(statuses: Iterable[Mapping[str, Any] | None], identity: str, priority: int,
           now: datetime.datetime | None = None) -> bool:
    """True unless a live peer in any of the peering objects outranks or equals us.

    A missing peering object (None) pauses kopf as well, so it counts as not active.
    """
    now = now or datetime.datetime.now(datetime.UTC)
    for status in statuses:
        if status is None:
            return False
        for peer, entry in status.items():
            if peer == identity or not isinstance(entry, Mapping) or not _alive(entry, now):
                continue
            try:
                theirs = int(entry.get("priority", 0))
            except (TypeError, ValueError):
                continue
            if theirs >= priority:
                return False
    return True
