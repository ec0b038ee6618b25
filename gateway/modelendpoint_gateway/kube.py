"""The gateway's only Kubernetes I/O (the ``kubernetes.aio`` client).

- list and watch ModelEndpoints and runtime pods (the :class:`discovery.Source`);
- GET the API-key Secrets ModelEndpoints reference, by name (never list/watch);
- merge-patch this gateway's held-requests annotation on a ModelEndpoint.

RBAC this needs (docs/gateway.md): modelendpoints get/list/watch/patch, pods
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
    """List/watch source, Secret reader and annotation writer on one API client."""

    def __init__(self, api: kclient.ApiClient) -> None:
        self.api = api
        self.core = kclient.CoreV1Api(api)
        self.custom = kclient.CustomObjectsApi(api)

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

    # --- list / watch -----------------------------------------------------------------------

    def _list_fn(self, resource: str, namespace: str | None) -> tuple[Any, tuple[Any, ...], dict[str, Any]]:
        """(the list method that can watch, its positional arguments, extra keyword arguments)."""
        if resource == ENDPOINTS:
            if namespace:
                return self.custom.list_namespaced_custom_object, (c.GROUP, c.VERSION, namespace, c.PLURAL), {}
            return self.custom.list_cluster_custom_object, (c.GROUP, c.VERSION, c.PLURAL), {}
        if resource == PODS:
            sel = {"label_selector": POD_SELECTOR}
            if namespace:
                return self.core.list_namespaced_pod, (namespace,), sel
            return self.core.list_pod_for_all_namespaces, (), sel
        raise ValueError(resource)

    async def list(self, resource: str, namespace: str | None) -> tuple[list[dict[str, Any]], str]:
        fn, args, kwargs = self._list_fn(resource, namespace)
        raw = getattr(fn.__self__, fn.__name__ + "_without_preload_content")
        items: list[dict[str, Any]] = []
        cont: str | None = None
        while True:
            resp = await raw(*args, limit=LIST_PAGE, _continue=cont, _request_timeout=60.0, **kwargs)
            try:
                body = await resp.read()
                if resp.status != 200:
                    raise ApiException(status=resp.status, reason=resp.reason, data=body)
            finally:
                resp.release()
            data = json.loads(body)
            items.extend(data.get("items") or [])
            meta = data.get("metadata") or {}
            cont = meta.get("continue") or None
            if cont is None:
                return items, str(meta.get("resourceVersion") or "")

    async def watch(self, resource: str, namespace: str | None,
                    resource_version: str) -> AsyncIterator[tuple[str, dict[str, Any]]]:
        fn, args, kwargs = self._list_fn(resource, namespace)
        # The API server ends a watch after timeout_seconds; spread them like client-go does.
        timeout = random.randint(240, 360)
        w = kwatch.Watch(return_type="object")
        try:
            stream = w.stream(fn, *args, resource_version=resource_version, allow_watch_bookmarks=True,
                              timeout_seconds=timeout, _request_timeout=float(timeout + 30), **kwargs)
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
            resp = await self.core.read_namespaced_secret_without_preload_content(name, namespace,
                                                                                   _request_timeout=30.0)
            try:
                body = await resp.read()
                if resp.status == 404:
                    metrics.KEY_READS.labels("not_found").inc()
                    return None
                if resp.status != 200:
                    raise ApiException(status=resp.status, reason=resp.reason, data=body)
            finally:
                resp.release()
        except Exception:
            metrics.KEY_READS.labels("error").inc()
            raise
        metrics.KEY_READS.labels("ok").inc()
        return decode_secret_data(json.loads(body))

    # --- the held annotation ---------------------------------------------------------------------

    async def annotate(self, namespace: str, name: str, key: str, value: str | None) -> bool:
        """Set (or with None remove) one annotation; False when the ModelEndpoint is gone."""
        body = {"metadata": {"annotations": {key: value}}}
        try:
            await self.custom.patch_namespaced_custom_object(
                c.GROUP, c.VERSION, namespace, c.PLURAL, name, body, field_manager=FIELD_MANAGER,
                _content_type=MERGE, _request_timeout=10.0)
        except ApiException as exc:
            if exc.status == 404:
                return False
            raise
        return True
