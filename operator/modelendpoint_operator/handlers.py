"""kopf handlers: thin glue between events and the pure/IO modules.

Triggers (see docs/operator.md, "Watching children"):
- ModelEndpoint create / update / resume: reconcile (apply every child with
  server-side apply, delete children the spec no longer wants, write status).
  kopf retries TemporaryError with backoff; PermanentError stops until the
  object changes.
- Children (Deployment, Service, Ingress, PVC labelled
  ``app.kubernetes.io/managed-by=modelendpoint-operator``): a deleted child,
  or one changed by someone else, is re-applied at once; Deployment changes
  also refresh the owner's status.
- Runtime pods (same label): refresh the owner's status (scheduling failures,
  image pull errors, crash loops).

kopf indexes keep the latest ModelEndpoints, Deployments, children and pods
in memory, so status refreshes read nothing from the API server.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import kopf
from kubernetes.aio.client.exceptions import ApiException

from . import constants as c
from . import k8s, manifests, metrics
from . import status as st
from .settings import OperatorSettings
from .spec import secret_refs

CHILD_SELECTOR = {c.LABEL_MANAGED_BY: c.MANAGED_BY_VALUE}
# Children replaced whole when an apply cannot repair them (stateless, cheap to re-create).
RECREATABLE = ("Service", "Ingress")
Key = tuple[str, str]


class SpecFailure(Exception):
    """A spec the API server accepted but that cannot work: phase Failed."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.failure = st.Failure(reason, message)


@dataclass
class State:
    """Per-process memory (kopf's ``memo.state``)."""

    settings: OperatorSettings
    kube: k8s.Kube | None = None
    locks: dict[Key, asyncio.Lock] = field(default_factory=dict)
    # Deployment uid -> metadata.generation after our last apply: a Deployment event
    # showing another generation means someone else changed its spec.
    applied: dict[str, int] = field(default_factory=dict)
    # uid of the ModelEndpoint -> the status we last wrote (fresher than the index).
    written: dict[str, dict[str, Any]] = field(default_factory=dict)

    def lock(self, key: Key) -> asyncio.Lock:
        if key not in self.locks:
            self.locks[key] = asyncio.Lock()
        return self.locks[key]


def _state(memo: kopf.Memo) -> State:
    return memo["state"]


# --- indexes ------------------------------------------------------------------


@kopf.index(c.GROUP, c.VERSION, c.PLURAL)
def endpoints_idx(namespace: str, name: str, body: kopf.Body, **_: Any) -> dict:
    meta = body["metadata"]
    return {(namespace, name): {
        "apiVersion": body.get("apiVersion", c.API_VERSION),
        "kind": body.get("kind", c.KIND),
        "metadata": {
            "name": name, "namespace": namespace, "uid": meta.get("uid"),
            "generation": meta.get("generation"),
            "deletionTimestamp": meta.get("deletionTimestamp"),
        },
        "spec": dict(body.get("spec") or {}),
        "status": dict(body.get("status") or {}),
    }}


def _owner_key(namespace: str | None, labels: kopf.Labels) -> Key | None:
    owner = labels.get(c.LABEL_ENDPOINT)
    return (namespace, owner) if namespace and owner else None


def _child_record(body: kopf.Body) -> dict:
    meta = body["metadata"]
    return {
        "kind": body.get("kind"),
        "metadata": {"name": meta.get("name"), "uid": meta.get("uid"),
                     "generation": meta.get("generation"),
                     "resourceVersion": meta.get("resourceVersion")},
        "status": dict(body.get("status") or {}),
    }


def _index_name(api_version: str, kind: str) -> str:
    """The kopf index of a child kind: also the keyword its handlers receive it by."""
    return f"{k8s.plural(api_version, kind)}_idx"


def _child_index(namespace: str, labels: kopf.Labels, body: kopf.Body, **_: Any) -> dict | None:
    key = _owner_key(namespace, labels)
    return {key: _child_record(body)} if key else None


@kopf.index("v1", "pods", labels=CHILD_SELECTOR)
def pods_idx(namespace: str, labels: kopf.Labels, body: kopf.Body, **_: Any) -> dict | None:
    key = _owner_key(namespace, labels)
    if not key:
        return None
    status = body.get("status") or {}
    return {key: {
        "metadata": {"name": body["metadata"].get("name"),
                     "deletionTimestamp": body["metadata"].get("deletionTimestamp")},
        "status": {k: status.get(k) for k in ("phase", "conditions", "containerStatuses",
                                                "initContainerStatuses") if status.get(k)},
    }}


@dataclass
class Views:
    """The indexes a handler got from kopf, read on the event loop only."""

    endpoints: kopf.Index
    children: dict[str, kopf.Index]  # by kind
    pods: kopf.Index

    @classmethod
    def of(cls, kwargs: dict[str, Any]) -> "Views":
        children = {kind: kwargs[_index_name(api_version, kind)]
                    for api_version, kind in manifests.CHILD_KINDS}
        return cls(kwargs["endpoints_idx"], children, kwargs["pods_idx"])

    @staticmethod
    def _all(index: kopf.Index, key: Key) -> list[dict]:
        return [dict(v) for v in index[key]] if key in index else []

    def endpoint(self, key: Key) -> dict | None:
        found = self._all(self.endpoints, key)
        return found[0] if found else None

    def children_of(self, key: Key, kind: str) -> list[dict]:
        return self._all(self.children[kind], key)

    def deployment(self, key: Key) -> dict | None:
        name = key[1]
        for d in self.children_of(key, "Deployment"):
            if d["metadata"]["name"] == name:
                return d
        return None

    def pods_of(self, key: Key) -> list[dict]:
        return self._all(self.pods, key)


# --- lifecycle ----------------------------------------------------------------


@kopf.on.startup()
async def startup(settings: kopf.OperatorSettings, memo: kopf.Memo, logger: logging.Logger,
                  **_: Any) -> None:
    state = _state(memo)
    ours = state.settings
    # kopf's own bookkeeping in annotations of our group, none in .status (ours alone).
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=c.ANNOTATION_PREFIX)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=c.ANNOTATION_PREFIX, key="last-handled-configuration")
    settings.persistence.finalizer = f"{c.ANNOTATION_PREFIX}/finalizer"  # unused: no delete handlers
    # Handler chatter stays in the logs; Events are posted for transitions and errors.
    settings.posting.level = logging.WARNING
    settings.peering.mandatory = not ours.standalone
    # Bounded concurrency: at most worker_limit objects of a kind are processed at once
    # (each worker holds the object's body: this bounds memory in bursts); idle workers
    # go after 2 s instead of kopf's 5 s. Transient errors of more than worker_limit
    # ModelEndpoints at once delay the others by at most the backoff (60 s).
    settings.queueing.worker_limit = ours.worker_limit
    settings.queueing.idle_timeout = 2.0
    state.kube = await k8s.Kube.connect(ours.max_api_requests)
    if ours.peering_create and not ours.standalone:
        await state.kube.ensure_peering(ours.peering_name, ours.namespace_list)
    metrics.serve(ours.metrics_port, ours.bind_address)
    logger.info("operator started: watching %s; default runtime image %s",
                "all namespaces" if ours.clusterwide else ",".join(ours.namespace_list),
                ours.default_runtime_image)


@kopf.on.cleanup()
async def cleanup(memo: kopf.Memo, **_: Any) -> None:
    state = _state(memo)
    if state.kube is not None:
        await state.kube.close()


# --- reconciliation -----------------------------------------------------------


def _controlled_by(obj: dict, uid: str) -> bool:
    return any(ref.get("uid") == uid and ref.get("controller")
               for ref in (obj.get("metadata") or {}).get("ownerReferences") or [])


def _remember(state: State, obj: dict) -> None:
    meta = obj.get("metadata") or {}
    if not meta.get("uid"):
        return
    if obj.get("kind") == "Deployment":
        state.applied[meta["uid"]] = int(meta.get("generation") or 0)


def _drifted(state: State, owner: dict, obj: dict) -> bool:
    """A child event shows a change we didn't make.

    Deployments: its spec generation differs from the one our last apply left
    (an unknown Deployment, after a restart, is learnt: resume re-applies).
    Other children: a field we set has another value in the live object.
    """
    meta = obj.get("metadata") or {}
    if obj.get("kind") == "Deployment":
        generation = int(meta.get("generation") or 0)
        known = state.applied.get(meta.get("uid"))
        if known is None:
            state.applied[meta.get("uid")] = generation
            return False
        return generation > known  # older generations are stale events from before our apply
    desired = manifests.children(owner, state.settings).get(obj.get("kind"))
    if desired is None or desired["metadata"]["name"] != meta.get("name"):
        return False  # not wanted any more: the next reconcile deletes it
    return manifests.differs(desired, obj)


async def _apply_child(state: State, manifest: dict, owner_uid: str) -> dict:
    kube = state.kube
    kind, name = manifest["kind"], manifest["metadata"]["name"]
    try:
        return await kube.apply(manifest, force=False)
    except ApiException as exc:
        if exc.status == 409:
            # Fields we own were changed by someone else (a hand edit): take them back,
            # but only on our own child, never on a same-named object of someone else.
            live = await kube.get(manifest["apiVersion"], kind, manifest["metadata"]["namespace"],
                                  name)
            if live is None or _controlled_by(live, owner_uid):
                metrics.CHILDREN_RESTORED.labels(kind).inc()
                return await kube.apply(manifest, force=True)
            raise SpecFailure("NameInUse", f"a {kind} named {name!r} already exists and is not "
                              "owned by this ModelEndpoint; rename one of them") from None
        if exc.status == 422 and kind in RECREATABLE:
            # A hand edit can leave list entries we cannot take back by apply (a Service
            # port keyed by a changed port number, say); these children are cheap to
            # re-create, so our own one is replaced whole.
            live = await kube.get(manifest["apiVersion"], kind, manifest["metadata"]["namespace"],
                                  name)
            if live is not None and _controlled_by(live, owner_uid):
                await kube.delete(manifest["apiVersion"], kind, manifest["metadata"]["namespace"],
                                  name, live["metadata"]["uid"])
                metrics.CHILDREN_RESTORED.labels(kind).inc()
                try:
                    return await kube.apply(manifest, force=True)
                except ApiException as again:
                    exc = again
        if exc.status in (400, 422):
            raise SpecFailure("InvalidSpec", f"the API server rejected {kind} {name}: "
                              f"{k8s.error_message(exc)}") from None
        raise


async def _check_secrets(state: State, owner: dict) -> None:
    ns = owner["metadata"]["namespace"]
    for var, name, key in secret_refs(owner.get("spec") or {}):
        keys = await state.kube.secret_keys(ns, name)
        field_name = "hfTokenSecretRef" if var == "HF_TOKEN" else "apiKeySecretRef"
        if keys is None:
            raise SpecFailure("SecretNotFound", f"spec.{field_name}: Secret {name!r} does not exist "
                              f"in namespace {ns!r} ({var} comes from it)")
        if key not in keys:
            raise SpecFailure("SecretKeyNotFound", f"spec.{field_name}: Secret {name!r} has no key "
                              f"{key!r} (it has: {', '.join(sorted(keys)) or 'no keys'})")


async def _write_status(state: State, owner: dict, deployment: dict | None, pods: list[dict],
                        failure: st.Failure | None, logger: logging.Logger) -> None:
    uid = owner["metadata"]["uid"]
    old = state.written.get(uid) or owner.get("status") or {}
    if (owner.get("status") or {}).get("observedGeneration", -1) > old.get("observedGeneration", -1):
        old = owner["status"]
    new = st.compute_status(owner, deployment, pods, state.settings, failure)
    if not st.status_changed(old, new):
        return
    ns, name = owner["metadata"]["namespace"], owner["metadata"]["name"]
    try:
        await state.kube.patch_status(ns, name, st.status_patch(old, new))
    except ApiException as exc:
        if exc.status == 404:  # deleted meanwhile
            return
        raise
    state.written[uid] = new
    metrics.STATUS_UPDATES.labels(new["phase"]).inc()
    if old.get("phase") != new["phase"]:
        warn = new["phase"] in ("Degraded", "Failed")
        kopf.event(owner, type="Warning" if warn else "Normal", reason=new["phase"],
                   message=new["message"])
        log = logger.warning if warn else logger.info
        log("phase %s -> %s: %s", old.get("phase") or "(none)", new["phase"], new["message"])


async def reconcile(owner: dict, state: State, views: Views, logger: logging.Logger,
                    trigger: str) -> None:
    """Apply the children of ``owner`` and write its status (idempotent, level-based)."""
    ns, name, uid = (owner["metadata"]["namespace"], owner["metadata"]["name"],
                     owner["metadata"]["uid"])
    key = (ns, name)
    started = time.monotonic()
    result = "ok"
    async with state.lock(key):
        try:
            failure = None
            deployment = None
            try:
                await _check_secrets(state, owner)
                desired = manifests.children(owner, state.settings)
                for _, kind in manifests.CHILD_KINDS:
                    manifest = desired[kind]
                    if manifest is None:
                        for stale in views.children_of(key, kind):
                            meta = stale["metadata"]
                            logger.info("deleting %s %s: no longer in the spec", kind, meta["name"])
                            await state.kube.delete(*_api_version(kind), ns, meta["name"], meta["uid"])
                        continue
                    live = await _apply_child(state, manifest, uid)
                    _remember(state, live)
                    if kind == "Deployment":
                        deployment = live
            except SpecFailure as exc:
                failure = exc.failure
                result = "failed"
                metrics.RECONCILE_ERRORS.labels("permanent").inc()
            if deployment is None:
                deployment = views.deployment(key)
            await _write_status(state, owner, deployment, views.pods_of(key), failure, logger)
            if failure is not None:
                raise kopf.PermanentError(failure.message)
        except ApiException as exc:
            if k8s.namespace_terminating(exc):
                result = "skipped"
                logger.debug("namespace %s is being deleted: nothing to reconcile", ns)
                return
            if k8s.is_transient(exc):
                result = "retry"
                metrics.RECONCILE_ERRORS.labels("temporary").inc()
                raise kopf.TemporaryError(f"{exc.status} {k8s.error_message(exc)}", delay=5) from None
            result = "error"
            metrics.RECONCILE_ERRORS.labels("permanent").inc()
            raise kopf.PermanentError(f"{exc.status} {k8s.error_message(exc)}") from None
        except (OSError, asyncio.TimeoutError) as exc:
            result = "retry"
            metrics.RECONCILE_ERRORS.labels("temporary").inc()
            raise kopf.TemporaryError(f"API unreachable: {exc!r}", delay=5) from None
        finally:
            metrics.RECONCILES.labels(trigger, result).inc()
            metrics.RECONCILE_SECONDS.observe(time.monotonic() - started)


def _api_version(kind: str) -> tuple[str, str]:
    for api_version, k in manifests.CHILD_KINDS:
        if k == kind:
            return api_version, kind
    raise KeyError(kind)


def _backoff(retry: int) -> float:
    return float(min(60, 2 ** min(retry, 6)))


async def _reconcile_endpoint(body: kopf.Body, memo: kopf.Memo, logger: logging.Logger,
                              retry: int, trigger: str, kwargs: dict) -> None:
    owner = {
        "apiVersion": body.get("apiVersion", c.API_VERSION), "kind": body.get("kind", c.KIND),
        "metadata": dict(body["metadata"]), "spec": dict(body.get("spec") or {}),
        "status": dict(body.get("status") or {}),
    }
    try:
        await reconcile(owner, _state(memo), Views.of(kwargs), logger, trigger)
    except kopf.TemporaryError as exc:
        raise kopf.TemporaryError(str(exc), delay=_backoff(retry)) from None


@kopf.on.create(c.GROUP, c.VERSION, c.PLURAL)
async def on_create(body: kopf.Body, memo: kopf.Memo, logger: logging.Logger, retry: int,
                    **kwargs: Any) -> None:
    await _reconcile_endpoint(body, memo, logger, retry, "create", kwargs)


@kopf.on.update(c.GROUP, c.VERSION, c.PLURAL)
async def on_update(body: kopf.Body, memo: kopf.Memo, logger: logging.Logger, retry: int,
                    **kwargs: Any) -> None:
    await _reconcile_endpoint(body, memo, logger, retry, "update", kwargs)


@kopf.on.resume(c.GROUP, c.VERSION, c.PLURAL)
async def on_resume(body: kopf.Body, memo: kopf.Memo, logger: logging.Logger, retry: int,
                    **kwargs: Any) -> None:
    await _reconcile_endpoint(body, memo, logger, retry, "resume", kwargs)


@kopf.on.event(c.GROUP, c.VERSION, c.PLURAL)
async def endpoint_event(type: str | None, body: kopf.Body, memo: kopf.Memo,
                         endpoints_idx: kopf.Index, **_: Any) -> None:
    metrics.ENDPOINTS.set(len(endpoints_idx))
    if type == "DELETED":
        state = _state(memo)
        state.written.pop(body["metadata"].get("uid"), None)
        lock = state.locks.get((body["metadata"].get("namespace"), body["metadata"].get("name")))
        if lock is not None and not lock.locked():
            state.locks.pop((body["metadata"]["namespace"], body["metadata"]["name"]), None)


# --- children and pods --------------------------------------------------------


async def _child_event(event_type: str | None, body: kopf.Body, memo: kopf.Memo,
                       logger: logging.Logger, kwargs: dict) -> None:
    state = _state(memo)
    views = Views.of(kwargs)
    key = _owner_key(body["metadata"].get("namespace"), body["metadata"].get("labels") or {})
    if key is None:
        return
    owner = views.endpoint(key)
    if owner is None or owner["metadata"].get("deletionTimestamp"):
        return  # the owner is gone or going: the garbage collector takes the children
    if not _controlled_by(dict(body), owner["metadata"]["uid"]) and event_type != "DELETED":
        return  # a labelled object that isn't this owner's child
    kind = body.get("kind")
    if event_type == "DELETED":
        desired = manifests.children(owner, state.settings).get(kind)
        if desired is None or desired["metadata"]["name"] != body["metadata"].get("name"):
            return  # deleted because the spec no longer wants it (by us)
        # The garbage collector deletes the children of a deleted ModelEndpoint; its own
        # DELETED event may not have reached the index yet: ask the API server.
        try:
            live = await state.kube.get(c.API_VERSION, c.KIND, key[0], key[1])
        except (ApiException, OSError, asyncio.TimeoutError) as exc:
            logger.warning("cannot check the owner of %s %s: %s", kind, body["metadata"]["name"],
                           k8s.error_message(exc) if isinstance(exc, ApiException) else repr(exc))
            return
        if (live is None or live["metadata"].get("uid") != owner["metadata"]["uid"]
                or live["metadata"].get("deletionTimestamp")):
            return
    async with state.lock(key):
        restore = event_type == "DELETED" or _drifted(state, owner, dict(body))
    if restore:
        logger.info("%s %s was %s by someone else: restoring it", kind, body["metadata"]["name"],
                    "deleted" if event_type == "DELETED" else "changed")
        if event_type == "DELETED":
            metrics.CHILDREN_RESTORED.labels(kind).inc()
            state.applied.pop(body["metadata"].get("uid"), None)
        try:
            await reconcile(owner, state, views, logger, "child")
        except (kopf.TemporaryError, kopf.PermanentError) as exc:
            logger.warning("restoring %s %s failed: %s", kind, body["metadata"]["name"], exc)
        return
    if kind == "Deployment":
        await _refresh_status(key, state, views, logger)


async def _refresh_status(key: Key, state: State, views: Views, logger: logging.Logger) -> None:
    async with state.lock(key):
        owner = views.endpoint(key)
        if owner is None or owner["metadata"].get("deletionTimestamp"):
            return
        current = state.written.get(owner["metadata"]["uid"]) or owner.get("status") or {}
        if (current.get("phase") == "Failed"
                and current.get("observedGeneration") == owner["metadata"].get("generation")):
            return  # Failed sticks until the spec changes (the next reconcile decides)
        try:
            await _write_status(state, owner, views.deployment(key), views.pods_of(key), None, logger)
        except ApiException as exc:
            if not k8s.namespace_terminating(exc):
                logger.warning("status update of %s/%s failed: %s", key[0], key[1],
                               k8s.error_message(exc))
        except (OSError, asyncio.TimeoutError) as exc:
            # The next event of the Deployment or a pod writes it again.
            logger.warning("status update of %s/%s failed: %r", key[0], key[1], exc)


async def child_event(type: str | None, body: kopf.Body, memo: kopf.Memo,
                      logger: logging.Logger, **kwargs: Any) -> None:
    await _child_event(type, body, memo, logger, kwargs)


def _watch_children() -> None:
    """Register, per child kind, its kopf index and its event handler.

    kopf indexes one resource per index, so each kind has its own, named
    ``<plural>_idx`` (deployments_idx, services_idx, ingresses_idx,
    persistentvolumeclaims_idx): handlers receive it as that keyword (Views.of).
    """
    for api_version, kind in manifests.CHILD_KINDS:
        plural = k8s.plural(api_version, kind)
        kopf.index(api_version, plural, id=_index_name(api_version, kind),
                   labels=CHILD_SELECTOR)(_child_index)
        kopf.on.event(api_version, plural, id=f"{plural}_event",
                      labels=CHILD_SELECTOR)(child_event)


_watch_children()


@kopf.on.event("v1", "pods", labels=CHILD_SELECTOR)
async def pod_event(body: kopf.Body, memo: kopf.Memo, logger: logging.Logger,
                    **kwargs: Any) -> None:
    key = _owner_key(body["metadata"].get("namespace"), body["metadata"].get("labels") or {})
    if key is not None:
        await _refresh_status(key, _state(memo), Views.of(kwargs), logger)
