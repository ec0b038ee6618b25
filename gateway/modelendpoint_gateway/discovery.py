"""Discovery by watch: list, then watch from the list's resourceVersion, re-list on 410.

One loop per (resource, namespace) -- or per resource cluster-wide -- feeds
the routing table as events arrive, so a replica that turns ready or unready
changes the routing within the latency of a watch event (milliseconds), and
nothing is read from the API server on the request path. A watch that ends
(the API server closes watches after a while) continues from the last
resourceVersion seen (bookmarks keep it fresh); one whose resourceVersion has
expired (410 Gone) is replaced by a new full list, which also repairs any
event missed meanwhile. Errors back off from 0.5 s to 30 s.

The API server is reached through a :class:`Source` (kube.py: the
``kubernetes.aio`` client); tests use a fake one.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import AsyncIterator, Callable
from typing import Any, Protocol

from . import metrics, table
from .router import Model, Router

logger = logging.getLogger(__name__)

ENDPOINTS = "modelendpoints"
PODS = "pods"


class Expired(Exception):
    """The watch's resourceVersion is too old (HTTP 410 Gone): list again."""


class Source(Protocol):
    async def list(self, resource: str, namespace: str | None) -> tuple[list[dict[str, Any]], str]:
        """Every object of ``resource`` in scope, and the list's resourceVersion."""

    def watch(self, resource: str, namespace: str | None,
              resource_version: str) -> AsyncIterator[tuple[str, dict[str, Any]]]:
        """(type, object) events after ``resource_version``; ends when the server ends the watch;
        raises :class:`Expired` for 410."""


Changes = list[tuple[Model, bool]]


class Discovery:
    """Keeps a Router's table equal to the API server's ModelEndpoints and runtime pods in scope."""

    def __init__(self, source: Source, router: Router, namespaces: list[str],
                 on_change: Callable[[Changes], None] = lambda changes: None,
                 backoff_max: float = 30.0) -> None:
        self.source = source
        self.router = router
        self.scopes: list[str | None] = list(namespaces) or [None]
        self.on_change = on_change
        self.backoff_max = backoff_max
        self._pending = {(r, ns) for r in (ENDPOINTS, PODS) for ns in self.scopes}
        self.synced = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        for resource in (ENDPOINTS, PODS):
            for ns in self.scopes:
                self._tasks.append(asyncio.ensure_future(self._run(resource, ns)))

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()

    # --- applying objects --------------------------------------------------------------

    def _apply_list(self, resource: str, namespace: str | None, items: list[dict[str, Any]]) -> None:
        t = self.router.table
        if resource == ENDPOINTS:
            changed = t.replace_endpoints((table.parse_endpoint(o) for o in items), namespace)
        else:
            pods = (table.parse_pod(o) for o in items)
            changed = t.replace_pods((p for p in pods if p is not None), namespace)
        self._changed(changed)
        self._pending.discard((resource, namespace))
        if not self._pending and not self.synced.is_set():
            self.synced.set()
            logger.info("routing table complete", extra={"fields": {
                "modelendpoints": len(t.endpoints), "pods": len(t.pods), "served_names": len(t.owner_of_name)}})

    def apply_event(self, resource: str, kind: str, obj: dict[str, Any]) -> None:
        t = self.router.table
        meta = obj.get("metadata") or {}
        key = (str(meta.get("namespace") or ""), str(meta.get("name") or ""))
        if resource == ENDPOINTS:
            if kind == "DELETED":
                changed = t.delete_endpoint(key)
            else:
                changed = t.upsert_endpoint(table.parse_endpoint(obj))
        else:
            pod = table.parse_pod(obj) if kind != "DELETED" else None
            changed = t.delete_pod(key) if pod is None else t.upsert_pod(pod)
        self._changed(changed)

    def _changed(self, keys: set[table.Key]) -> None:
        if keys:
            changes = self.router.sync(keys)
            if changes:
                self.on_change(changes)

    # --- the loops ------------------------------------------------------------------------

    async def _run(self, resource: str, namespace: str | None) -> None:
        backoff = 0.5
        where = namespace or "*"
        while True:
            try:
                items, rv = await self.source.list(resource, namespace)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - any failure: back off and list again
                metrics.WATCH_RESTARTS.labels(resource, "list_error").inc()
                logger.warning("list failed; retrying", extra={"fields": {
                    "resource": resource, "namespace": where, "error": str(exc)[:300], "retry_s": backoff}})
                await asyncio.sleep(backoff * random.uniform(0.8, 1.2))
                backoff = min(backoff * 2, self.backoff_max)
                continue
            self._apply_list(resource, namespace, items)
            backoff = 0.5
            # Watch from the list's version until it expires; then list again.
            while True:
                try:
                    async for kind, obj in self.source.watch(resource, namespace, rv):
                        metrics.WATCH_EVENTS.labels(resource).inc()
                        new_rv = (obj.get("metadata") or {}).get("resourceVersion")
                        if new_rv:
                            rv = str(new_rv)
                        if kind in ("ADDED", "MODIFIED", "DELETED"):
                            self.apply_event(resource, kind, obj)
                    backoff = 0.5
                    metrics.WATCH_RESTARTS.labels(resource, "timeout").inc()
                except asyncio.CancelledError:
                    raise
                except Expired:
                    metrics.WATCH_RESTARTS.labels(resource, "expired").inc()
                    logger.info("watch expired (410); listing again",
                                extra={"fields": {"resource": resource, "namespace": where}})
                    break
                except Exception as exc:  # noqa: BLE001 - a broken watch: back off, watch again
                    metrics.WATCH_RESTARTS.labels(resource, "error").inc()
                    logger.warning("watch failed; resuming", extra={"fields": {
                        "resource": resource, "namespace": where, "error": str(exc)[:300], "retry_s": backoff}})
                    await asyncio.sleep(backoff * random.uniform(0.8, 1.2))
                    backoff = min(backoff * 2, self.backoff_max)
