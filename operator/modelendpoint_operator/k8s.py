"""The operator's only Kubernetes I/O (besides kopf's own watching and peering).

Children are written with server-side apply under the operator's field
manager; reads are plain GETs. Every request is counted in the
``modelendpoint_operator_api_requests_total`` metric. Errors surface as the
client's ``ApiException``; :func:`is_transient` tells handlers whether to retry.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import logging
import os
from typing import Any

import aiohttp
from kubernetes.aio import client as kclient
from kubernetes.aio import config as kconfig
from kubernetes.aio.client.exceptions import ApiException

from . import constants as c
from . import metrics

logger = logging.getLogger(__name__)

APPLY = "application/apply-patch+yaml"
MERGE = "application/merge-patch+json"

# (apiVersion, kind) -> (path prefix, plural, namespaced)
_RESOURCES: dict[tuple[str, str], tuple[str, str, bool]] = {
    ("v1", "Service"): ("/api/v1", "services", True),
    ("v1", "PersistentVolumeClaim"): ("/api/v1", "persistentvolumeclaims", True),
    ("v1", "Secret"): ("/api/v1", "secrets", True),
    ("v1", "ConfigMap"): ("/api/v1", "configmaps", True),
    ("v1", "Pod"): ("/api/v1", "pods", True),
    ("apps/v1", "Deployment"): ("/apis/apps/v1", "deployments", True),
    ("networking.k8s.io/v1", "Ingress"): ("/apis/networking.k8s.io/v1", "ingresses", True),
    (c.API_VERSION, c.KIND): (f"/apis/{c.API_VERSION}", c.PLURAL, True),
    ("kopf.dev/v1", "ClusterKopfPeering"): ("/apis/kopf.dev/v1", "clusterkopfpeerings", False),
    ("kopf.dev/v1", "KopfPeering"): ("/apis/kopf.dev/v1", "kopfpeerings", True),
    ("v1", "Event"): ("/api/v1", "events", True),
}


def plural(api_version: str, kind: str) -> str:
    """The resource name of ``kind`` in URLs (and kopf's handler selectors)."""
    return _RESOURCES[(api_version, kind)][1]


def path_of(api_version: str, kind: str, namespace: str | None, name: str | None = None,
            subresource: str | None = None) -> str:
    prefix, plural, namespaced = _RESOURCES[(api_version, kind)]
    path = prefix
    if namespaced:
        path += f"/namespaces/{namespace}"
    path += f"/{plural}"
    if name:
        path += f"/{name}"
    if subresource:
        path += f"/{subresource}"
    return path


# Errors of the connection rather than answers of the API server: always worth retrying.
# aiohttp's own errors (ServerDisconnectedError, ClientPayloadError, ...) are not OSErrors.
TRANSIENT_IO = (aiohttp.ClientError, asyncio.TimeoutError, OSError)
# Anything a request to the API server can raise: an answer, or a lost connection.
API_ERRORS = (ApiException, aiohttp.ClientError, asyncio.TimeoutError, OSError)


def is_transient(exc: BaseException) -> bool:
    """Worth retrying as it is: throttling, server errors, timeouts, lost connections,
    conflicts. Not 403: a refusal (RBAC, an admission webhook, a ResourceQuota) is
    retried with backoff too, but shown in the status, which a transient error is not."""
    if isinstance(exc, ApiException):
        return exc.status in (0, 408, 409, 429) or (exc.status or 0) >= 500
    return isinstance(exc, TRANSIENT_IO)


def is_forbidden(exc: BaseException) -> bool:
    """A 403 other than a namespace being deleted."""
    return isinstance(exc, ApiException) and exc.status == 403 and not namespace_terminating(exc)


def namespace_terminating(exc: BaseException) -> bool:
    """The namespace is being deleted: nothing can be created there, and nothing needs to be."""
    return (isinstance(exc, ApiException) and exc.status == 403
            and "being terminated" in error_message(exc))


def error_message(exc: ApiException) -> str:
    """The API server's own message (it names the field), else the HTTP reason."""
    try:
        return json.loads(exc.body or "{}").get("message") or str(exc.reason)
    except (ValueError, AttributeError):
        return str(exc.body or exc.reason)


class Kube:
    """A thin async client: apply, get, delete, patch status."""

    def __init__(self, api: kclient.ApiClient, max_in_flight: int = 16) -> None:
        self.api = api
        self.in_flight = asyncio.Semaphore(max_in_flight)

    @classmethod
    async def connect(cls, max_in_flight: int = 16) -> Kube:
        configuration = kclient.Configuration()
        if os.environ.get("KUBERNETES_SERVICE_HOST") and not os.environ.get("KUBECONFIG"):
            kconfig.load_incluster_config(client_configuration=configuration)
        else:
            await kconfig.load_kube_config(client_configuration=configuration)
        configuration.connection_pool_maxsize = max_in_flight
        return cls(kclient.ApiClient(configuration), max_in_flight)

    async def close(self) -> None:
        await self.api.close()

    async def request(self, method: str, path: str, *, body: Any = None,
                      query: list[tuple[str, Any]] | None = None,
                      content_type: str | None = None, resource: str = "") -> dict[str, Any]:
        headers = {"Accept": "application/json"}
        if content_type:
            headers["Content-Type"] = content_type
        params = await self.api.param_serialize(
            method=method, resource_path=path, query_params=query or [],
            header_params=headers, body=body, auth_settings=["BearerToken"],
        )
        code = "error"
        try:
            async with self.in_flight:
                resp = await self.api.call_api(*params, _request_timeout=30)
                await resp.read()
            code = str(resp.status)
            data = self.api.response_deserialize(resp, {"2XX": "object"}).data
        except ApiException as exc:
            code = str(exc.status)
            raise
        finally:
            metrics.API_REQUESTS.labels(method, resource, code).inc()
        return data if isinstance(data, dict) else json.loads(data or "{}")

    async def apply(self, manifest: dict[str, Any], *, force: bool) -> dict[str, Any]:
        """Server-side apply ``manifest`` as the operator's field manager."""
        meta = manifest["metadata"]
        path = path_of(manifest["apiVersion"], manifest["kind"], meta.get("namespace"), meta["name"])
        query: list[tuple[str, Any]] = [("fieldManager", c.FIELD_MANAGER)]
        if force:
            query.append(("force", "true"))
        return await self.request("PATCH", path, body=manifest, query=query, content_type=APPLY,
                                  resource=manifest["kind"])

    async def get(self, api_version: str, kind: str, namespace: str | None,
                  name: str) -> dict[str, Any] | None:
        try:
            return await self.request("GET", path_of(api_version, kind, namespace, name),
                                      resource=kind)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    async def delete(self, api_version: str, kind: str, namespace: str, name: str,
                     uid: str | None = None) -> bool:
        """Delete (foreground-free) if present; with ``uid``, only that very object."""
        body: dict[str, Any] = {"apiVersion": "v1", "kind": "DeleteOptions",
                                "propagationPolicy": "Background"}
        if uid:
            body["preconditions"] = {"uid": uid}
        try:
            await self.request("DELETE", path_of(api_version, kind, namespace, name), body=body,
                               resource=kind)
            return True
        except ApiException as exc:
            if exc.status in (404, 409):
                return False
            raise

    async def secret_keys(self, namespace: str, name: str) -> set[str] | None:
        """The key names of a Secret (values are not kept), or None when it doesn't exist."""
        secret = await self.get("v1", "Secret", namespace, name)
        if secret is None:
            return None
        return set((secret.get("data") or {}).keys()) | set((secret.get("stringData") or {}).keys())

    async def patch_status(self, namespace: str, name: str, patch: dict[str, Any]) -> dict[str, Any]:
        path = path_of(c.API_VERSION, c.KIND, namespace, name, "status")
        return await self.request("PATCH", path, body={"status": patch}, content_type=MERGE,
                                  resource=c.KIND + "/status")

    async def post_event(self, involved: dict[str, Any], type: str, reason: str, message: str) -> None:
        """A core/v1 Event about ``involved`` (apiVersion, kind, name, namespace, uid), as
        ``kubectl describe`` shows them. Best effort: a failure is logged, never raised."""
        now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        body = {
            "apiVersion": "v1", "kind": "Event",
            "metadata": {"generateName": f"{involved['name']}.", "namespace": involved["namespace"]},
            "involvedObject": involved, "type": type, "reason": reason, "message": message[:1024],
            "source": {"component": c.OPERATOR_NAME}, "reportingComponent": c.OPERATOR_NAME,
            "reportingInstance": os.environ.get("POD_ID", c.OPERATOR_NAME),
            "firstTimestamp": now, "lastTimestamp": now, "count": 1,
        }
        try:
            await self.request("POST", path_of("v1", "Event", involved["namespace"]), body=body, resource="Event")
        except API_ERRORS as exc:
            logger.warning("cannot post the event %s %r: %r", reason, message, exc)

    async def peering_status(self, name: str, namespace: str | None) -> dict[str, Any] | None:
        """The keep-alives in a kopf peering object (``.status``), or None if it is missing."""
        kind = "KopfPeering" if namespace else "ClusterKopfPeering"
        body = await self.get("kopf.dev/v1", kind, namespace, name)
        return None if body is None else dict(body.get("status") or {})

    async def ensure_peering(self, name: str, namespaces: list[str]) -> None:
        """Create the kopf peering object(s) if missing (kopf needs them to exist)."""
        targets: list[tuple[str, str | None]] = (
            [("ClusterKopfPeering", None)] if not namespaces
            else [("KopfPeering", ns) for ns in namespaces]
        )
        for kind, ns in targets:
            metadata: dict[str, str] = {"name": name}
            if ns:
                metadata["namespace"] = ns
            body = {"apiVersion": "kopf.dev/v1", "kind": kind, "metadata": metadata}
            path = path_of("kopf.dev/v1", kind, ns)
            try:
                await self.request("POST", path, body=body, resource=kind)
                logger.info("created %s %s%s", kind, f"{ns}/" if ns else "", name)
            except ApiException as exc:
                if exc.status == 409:
                    continue
                logger.warning("could not create %s %s: %s (kopf peering needs it)", kind, name,
                               error_message(exc))
