"""Choosing a replica: least outstanding requests, or CHWBL on the prompt's start.

Pure: replicas carry their in-flight count (requests this gateway process has
sent them that have not finished); nothing here does I/O or keeps time.

- LeastRequests (the default): the replica with the fewest requests in
  flight; ties rotate, so an idle model's requests still spread.
- PrefixHash: consistent hashing with bounded load (Mirrokni, Thorup and
  Zadimoghaddam's CHWBL, as KubeAI uses it). Each replica sits ``replication``
  times on a hash ring; a request's prefix key hashes to a point, and the
  first replica clockwise from it takes the request if its in-flight count,
  this request included, stays within the bound
  ``ceil(meanLoadPercentage/100 * (total in flight + 1) / replicas)``; else the
  next distinct replica on the ring is asked. The least loaded replica always
  fits the bound, so a choice always exists, and requests sharing a prefix
  land on the same replica (whose prefix cache has it) until it is loaded
  beyond the bound. Every gateway replica builds the same ring (replica ids are
  pod names), so they agree on where a prefix goes.
"""

from __future__ import annotations

import bisect
import hashlib
import math
from collections.abc import Collection, Iterator, Mapping, Sequence


class Replica:
    """One ready runtime pod: where it is, and how many requests it has from us."""

    __slots__ = ("id", "host", "port", "in_flight", "netloc")

    def __init__(self, id: str, host: str, port: int) -> None:
        self.id = id  # "<namespace>/<pod name>"
        self.host = host
        self.port = port
        self.in_flight = 0
        # The Host header and log form: IPv6 addresses in brackets.
        self.netloc = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    def __repr__(self) -> str:
        return f"Replica({self.id!r}, {self.netloc}, in_flight={self.in_flight})"


def least_requests(replicas: Sequence[Replica], exclude: Collection[Replica] = (), start: int = 0) -> Replica | None:
    """The replica with the fewest requests in flight, not in ``exclude``; ties go to the first from ``start``."""
    n = len(replicas)
    best: Replica | None = None
    for i in range(n):
        r = replicas[(start + i) % n]
        if r in exclude:
            continue
        if best is None or r.in_flight < best.in_flight:
            best = r
    return best


def hash64(text: str) -> int:
    """A stable 64-bit hash (the same in every process, unlike ``hash()``)."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "big")


class Ring:
    """The consistent-hash ring of a replica set: ``replication`` points per replica id."""

    def __init__(self, ids: Collection[str], replication: int) -> None:
        points = sorted((hash64(f"{rid}#{i}"), rid) for rid in ids for i in range(replication))
        self._hashes = [h for h, _ in points]
        self._ids = [rid for _, rid in points]
        self.size = len(set(ids))

    def walk(self, point: int) -> Iterator[str]:
        """Distinct replica ids clockwise from ``point``, each once."""
        if not self._ids:
            return
        n = len(self._ids)
        i = bisect.bisect_left(self._hashes, point) % n
        seen: set[str] = set()
        for step in range(n):
            rid = self._ids[(i + step) % n]
            if rid not in seen:
                seen.add(rid)
                yield rid
                if len(seen) == self.size:
                    return


def load_bound(total_in_flight: int, replicas: int, mean_load_percentage: int) -> int:
    """The most requests (this one included) a replica may have to take a prefix."""
    return max(1, math.ceil(mean_load_percentage * (total_in_flight + 1) / (100 * replicas)))


def chwbl(ring: Ring, replicas: Mapping[str, Replica], key: str, mean_load_percentage: int,
          exclude: Collection[Replica] = ()) -> Replica | None:
    """The replica for prefix ``key`` under the bound; None only when every replica is excluded."""
    if not replicas:
        return None
    total = sum(r.in_flight for r in replicas.values())
    bound = load_bound(total, len(replicas), mean_load_percentage)
    fallback: Replica | None = None
    for rid in ring.walk(hash64(key)):
        r = replicas.get(rid)
        if r is None or r in exclude:
            continue
        if r.in_flight + 1 <= bound:
            return r
        if fallback is None or r.in_flight < fallback.in_flight:
            fallback = r
    # Only reachable when exclusions removed every replica within the bound (a retry).
    return fallback
