"""The gateway's only Kubernetes I/O (the ``kubernetes.aio`` client).

- list and watch ModelEndpoints and runtime pods (the :class:`discovery.Source`);
- GET the API-key Secrets ModelEndpoints reference, by name (never list/watch);
- merge-patch this gateway's held-requests annotation on a ModelEndpoint.

RBAC this needs (docs/gateway.md): modelendpoints list/watch/patch, pods
list/watch, secrets get, in every namespace served.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import AsyncIterator, Mapping
from typing import Any

from kubernetes.aio import client as kclient
from kubernetes.aio import config as kconfig
from kubernetes.aio import watch as kwatch
from kubernetes.aio.client.exceptions import ApiException

from modelendpoint_operator import constants as c

from . import metrics
from .discovery import ENDPOINTS, PODS, Expired
from .keys import decode_secret_data

# Only the runtime pods of ModelEndpoints (the operator's label, and an owner).
POD_SELECTOR = f"{c.LABEL_MANAGED_BY}={c.MANAGED_BY_VALUE},{c.LABEL_ENDPOINT}"
LIST_PAGE = 500
MERGE = "application/merge-patch+json"
FIELD_MANAGER = "modelendpoint-gateway"


class Kube:
    """List/watch source, Secret reader and annotation writer on one API client.

    Requests go through ``ApiClient`` with their paths (as the operator's
    k8s.py does), not the generated ``CoreV1Api``/``CustomObjectsApi``
    classes: importing those builds pydantic validators for about a thousand
    methods, some 100 MiB of memory for the five calls made here. The watch
    stream is the library's ``kubernetes.aio.watch.Watch``.
    """

    def __init__(self, api: kclient.ApiClient) -> None:
        self.api = api

    @classmethod
    async def connect(cls, pool_size: int = 32) -> Kube:
        """$KUBECONFIG or ~/.kube/config; in a pod without KUBECONFIG, the service account."""
        configuration = kclient.Configuration()
        if os.environ.get("KUBERNETES_SERVICE_HOST") and not os.environ.get("KUBECONFIG"):
            kconfig.load_incluster_config(client_configuration=configuration)
        else:
            await kconfig.load_kube_config(client_configuration=configuration)
        configuration.connection_pool_maxsize = pool_size
        return cls(kclient.ApiClient(configuration))

    async def close(self) -> None:
        await self.api.close()

    async def _call(self, method: str, path: str, query: list[tuple[str, Any]] | None = None, *,
                    body: Any = None, content_type: str | None = None, timeout: float = 30.0) -> Any:
        """The raw aiohttp response (not read yet) of one request."""
        headers = {"Accept": "application/json"}
        if content_type:
            headers["Content-Type"] = content_type
        params = await self.api.param_serialize(method=method, resource_path=path, query_params=query or [],
                                                header_params=headers, body=body, auth_settings=["BearerToken"])
        resp = await self.api.call_api(*params, _request_timeout=timeout, _preload_content=False)
        return resp.response

    async def _json(self, method: str, path: str, query: list[tuple[str, Any]] | None = None,
                    **kw: Any) -> tuple[int, Any]:
        resp = await self._call(method, path, query, **kw)
        try:
            body = await resp.read()
        finally:
            resp.release()
        if resp.status >= 400 and resp.status != 404:
            raise ApiException(status=resp.status, reason=resp.reason, body=body.decode("utf-8", "replace"))
        return resp.status, (json.loads(body) if body else {})

    # --- list / watch -----------------------------------------------------------------------

    @staticmethod
    def collection(resource: str, namespace: str | None) -> tuple[str, list[tuple[str, Any]]]:
        """The collection path of ``resource`` in scope, and the query it always carries."""
        where = f"/namespaces/{namespace}" if namespace else ""
        if resource == ENDPOINTS:
            return f"/apis/{c.GROUP}/{c.VERSION}{where}/{c.PLURAL}", []
        if resource == PODS:
            return f"/api/v1{where}/pods", [("labelSelector", POD_SELECTOR)]
        raise ValueError(resource)

    async def list(self, resource: str, namespace: str | None) -> tuple[list[dict[str, Any]], str]:
        path, query = self.collection(resource, namespace)
        items: list[dict[str, Any]] = []
        cont: str | None = None
        while True:
            q = query + [("limit", LIST_PAGE)] + ([("continue", cont)] if cont else [])
            status, data = await self._json("GET", path, q, timeout=60.0)
            if status == 404:
                raise ApiException(status=404, reason=f"{path} not found (is the ModelEndpoint CRD installed?)")
            items.extend(data.get("items") or [])
            meta = data.get("metadata") or {}
            cont = meta.get("continue") or None
            if cont is None:
                return items, str(meta.get("resourceVersion") or "")

    async def watch(self, resource: str, namespace: str | None,
                    resource_version: str) -> AsyncIterator[tuple[str, dict[str, Any]]]:
        path, query = self.collection(resource, namespace)

        async def watch_request(*, watch: bool, resource_version: str, allow_watch_bookmarks: bool,
                                timeout_seconds: int, _request_timeout: float, _preload_content: bool) -> Any:
            """One watch request of the collection; the Watch helper reads its event lines."""
            q = query + [("watch", "true"), ("resourceVersion", resource_version),
                         ("allowWatchBookmarks", "true" if allow_watch_bookmarks else "false"),
                         ("timeoutSeconds", timeout_seconds)]
            resp = await self._call("GET", path, q, timeout=_request_timeout)
            if resp.status != 200:
                body = await resp.read()
                resp.release()
                raise ApiException(status=resp.status, reason=resp.reason, body=body.decode("utf-8", "replace"))
            return resp

        # The API server ends a watch after timeout_seconds; spread them like client-go does.
        timeout = random.randint(240, 360)
        w = kwatch.Watch(return_type="object")
        try:
            stream = w.stream(watch_request, resource_version=resource_version, allow_watch_bookmarks=True,
                              timeout_seconds=timeout, _request_timeout=float(timeout + 30))
            async for event in stream:
                yield str(event["type"]), event["raw_object"]
        except ApiException as exc:
            if exc.status == 410:
                raise Expired(str(exc.reason)) from None
            raise
        finally:
            await w.close()

    # --- Secrets ------------------------------------------------------------------------------

    async def secret_data(self, namespace: str, name: str) -> Mapping[str, str] | None:
        """The decoded data of a Secret, or None when it does not exist."""
        try:
            status, data = await self._json("GET", f"/api/v1/namespaces/{namespace}/secrets/{name}")
        except Exception:
            metrics.KEY_READS.labels("error").inc()
            raise
        if status == 404:
            metrics.KEY_READS.labels("not_found").inc()
            return None
        metrics.KEY_READS.labels("ok").inc()
        return decode_secret_data(data)

    # --- the held annotation ---------------------------------------------------------------------

    async def annotate(self, namespace: str, name: str, key: str, value: str | None) -> bool:
        """Set (or with None remove) one annotation; False when the ModelEndpoint is gone."""
        path = f"/apis/{c.GROUP}/{c.VERSION}/namespaces/{namespace}/{c.PLURAL}/{name}"
        status, _ = await self._json("PATCH", path, [("fieldManager", FIELD_MANAGER)],
                                     body={"metadata": {"annotations": {key: value}}}, content_type=MERGE,
                                     timeout=10.0)
        return status != 404
