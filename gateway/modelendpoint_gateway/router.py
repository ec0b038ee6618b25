"""Live routing state: one :class:`Model` per ModelEndpoint in scope, kept in step with the table.

The table (table.py) says who serves which name and which pods are ready; a
Model adds what lives across table changes: the replicas' in-flight counts,
the CHWBL ring, and a future that waiting (held) requests await until the
Model changes. No I/O.
"""

from __future__ import annotations

import asyncio
from collections.abc import Collection, Iterable

from . import balancer, table
from .table import Key


class Model:
    """A ModelEndpoint as the request path sees it."""

    __slots__ = ("key", "info", "replicas", "by_id", "ring", "state", "_rr", "_changed", "deleted")

    def __init__(self, info: table.EndpointInfo) -> None:
        self.key = info.key
        self.info = info
        self.replicas: list[balancer.Replica] = []
        self.by_id: dict[str, balancer.Replica] = {}
        self.ring: balancer.Ring | None = None
        self.state = table.serving_state(info, 0)
        self._rr = 0
        self._changed: asyncio.Future[None] | None = None
        self.deleted = False

    @property
    def served_name(self) -> str:
        return self.info.served_name or ""

    def is_adapter_name(self, name: str) -> bool:
        """Whether ``name`` (a name this Model owns or a request asks for) is one of its adapters'."""
        return name != self.served_name and name in self.info.adapters

    def changed(self) -> asyncio.Future[None]:
        """Resolves at the next change of this Model (replicas, state, spec, deletion)."""
        if self._changed is None or self._changed.done():
            self._changed = asyncio.get_event_loop().create_future()
        return self._changed

    def notify(self) -> None:
        if self._changed is not None and not self._changed.done():
            self._changed.set_result(None)
        self._changed = None

    def update(self, info: table.EndpointInfo, pods: list[table.PodInfo]) -> bool:
        """Take the new spec/status and ready pods; True when anything a request sees changed."""
        old_info = self.info
        changed = info != old_info
        self.info = info
        fresh: dict[str, balancer.Replica] = {}
        for p in pods:
            assert p.host is not None and p.port is not None
            rid = f"{p.namespace}/{p.name}"
            old = self.by_id.get(rid)
            if old is not None and old.host == p.host and old.port == p.port:
                fresh[rid] = old
            else:
                fresh[rid] = balancer.Replica(rid, p.host, p.port)
        ids_changed = fresh.keys() != self.by_id.keys()
        if ids_changed or any(fresh[k] is not self.by_id[k] for k in fresh):
            changed = True
        self.by_id = fresh
        self.replicas = list(fresh.values())
        if info.strategy == table.PREFIX_HASH:
            if self.ring is None or ids_changed or info.prefix_hash.replication != old_info.prefix_hash.replication:
                self.ring = balancer.Ring(list(fresh), info.prefix_hash.replication)
        else:
            self.ring = None
        state = table.serving_state(info, len(self.replicas))
        changed = changed or state != self.state
        self.state = state
        return changed

    def choose(self, prefix: str | None, exclude: Collection[balancer.Replica] = ()) -> balancer.Replica | None:
        """The replica for the next request (None: no ready replica outside ``exclude``)."""
        if not self.replicas:
            return None
        if self.ring is not None and prefix is not None:
            return balancer.chwbl(self.ring, self.by_id, prefix, self.info.prefix_hash.mean_load_percentage,
                                  exclude)
        self._rr += 1
        return balancer.least_requests(self.replicas, exclude, self._rr)

    @property
    def listed(self) -> bool:
        """In GET /models: ready, or scaled to zero and woken on demand."""
        return self.state in (table.READY, table.WAKEABLE)


class Router:
    """Models by key, by served name and by ModelEndpoint name, in step with a Table."""

    def __init__(self, tbl: table.Table | None = None) -> None:
        self.table = tbl or table.Table()
        self.models: dict[Key, Model] = {}

    def sync(self, keys: Iterable[Key]) -> list[tuple[Model, bool]]:
        """Refresh the Models of ``keys`` from the table; (model, deleted) for each one that changed."""
        out: list[tuple[Model, bool]] = []
        for key in keys:
            info = self.table.endpoints.get(key)
            model = self.models.get(key)
            if info is None:
                if model is not None:
                    del self.models[key]
                    model.deleted = True
                    model.notify()
                    out.append((model, True))
                continue
            if model is None:
                model = self.models[key] = Model(info)
                model.update(info, self.table.ready_pods(key))
                out.append((model, False))
                continue
            if model.update(info, self.table.ready_pods(key)):
                model.notify()
                out.append((model, False))
        return out

    def by_served_name(self, name: str) -> Model | None:
        """The Model that owns ``name``: its served name, or the name of one of its adapters."""
        key = self.table.owner_of_name.get(name)
        return self.models.get(key) if key is not None else None

    def by_endpoint_name(self, name: str) -> Model | None:
        key = self.table.owner_of_endpoint_name.get(name)
        return self.models.get(key) if key is not None else None

    def routed(self) -> list[Model]:
        """The Models that own their served name, by name."""
        return [m for name, m in self.names() if name == m.served_name]

    def names(self) -> list[tuple[str, Model]]:
        """Every routed name (served names and adapters' names) with the Model that owns it, by name."""
        return [(name, self.models[k]) for name, k in sorted(self.table.owner_of_name.items()) if k in self.models]

    def secret_refs(self) -> set[tuple[str, str]]:
        return {(m.info.namespace, m.info.key_secret) for m in self.models.values() if m.info.key_secret}
