"""The one reconcile path: make a ModelEndpoint's children and status right.

Level-triggered, as Kubernetes controllers are: every trigger (the ModelEndpoint's
own watch events, a child's or a runtime pod's event, an autoscaler decision, a
retry) only puts the object's key in the :class:`WorkQueue`; a worker then
reconciles it from the current state in kopf's indexes. A reconcile compares each
desired child with the live one and applies only what differs (server-side
apply), deletes only stale children this ModelEndpoint controls, and writes the
status only when it changes. So it is idempotent and safe to run again at any
time, and an unchanged object costs no API request.

Why a queue of our own beside kopf: kopf retries its change handlers but never its
event handlers, and its timers and daemons put a finalizer on every object, which
this operator otherwise never needs (a finalizer blocks deletion while the
operator is down). The queue is the one retry policy: exponential backoff per
object, 1 s doubling up to 60 s, reset by a success. kopf's exception classes keep
their meaning: ``kopf.TemporaryError`` = retry after ``delay``, ``kopf.PermanentError``
= phase Failed, stop until the object changes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import kopf
from kubernetes.aio.client.exceptions import ApiException
from pydantic import ValidationError

from . import constants as c
from . import k8s, manifests, metrics
from . import status as st
from .settings import OperatorSettings
from .spec import Endpoint

log = logging.getLogger(__name__)

Key = tuple[str, str]
# Children replaced whole when an apply cannot repair them (stateless, cheap to re-create).
RECREATABLE = ("Service", "Ingress")
MAX_BACKOFF = 60.0


def backoff(failures: int) -> float:
    """Seconds before retry number ``failures`` (1 s, 2 s, 4 s ... 60 s)."""
    return float(min(MAX_BACKOFF, 2 ** max(0, failures - 1)))


class WorkQueue:
    """Keys to reconcile, as controller-runtime's queue: a key is queued at most once
    and processed by one worker at a time (added again while in progress, it runs once
    more afterwards), with per-key exponential backoff for retries."""

    def __init__(self) -> None:
        self._queue: asyncio.Queue[Key] = asyncio.Queue()
        self._queued: dict[Key, str] = {}  # key -> what enqueued it first (a metrics label)
        self._active: set[Key] = set()
        self._again: dict[Key, str] = {}
        self._timers: dict[Key, asyncio.TimerHandle] = {}
        self._failures: dict[Key, int] = {}

    def add(self, key: Key, trigger: str) -> None:
        if key in self._active:
            self._again.setdefault(key, trigger)
        elif key not in self._queued:
            self._queued[key] = trigger
            self._queue.put_nowait(key)

    def add_after(self, key: Key, delay: float, trigger: str) -> None:
        """``add`` in ``delay`` seconds (an earlier pending one stays)."""
        timer = self._timers.get(key)
        loop = asyncio.get_running_loop()
        if timer is not None and timer.when() <= loop.time() + delay:
            return
        if timer is not None:
            timer.cancel()
        self._timers[key] = loop.call_later(delay, self._fire, key, trigger)

    def _fire(self, key: Key, trigger: str) -> None:
        self._timers.pop(key, None)
        self.add(key, trigger)

    async def get(self) -> tuple[Key, str]:
        key = await self._queue.get()
        trigger = self._queued.pop(key, "endpoint")
        self._active.add(key)
        return key, trigger

    def done(self, key: Key) -> None:
        self._active.discard(key)
        trigger = self._again.pop(key, None)
        if trigger is not None:
            self.add(key, trigger)

    def failed(self, key: Key, delay: float | None = None) -> float:
        """Record a failure; the key comes back after ``delay`` or the backoff."""
        self._failures[key] = self._failures.get(key, 0) + 1
        wait = backoff(self._failures[key]) if delay is None else delay
        self.add_after(key, wait, "retry")
        return wait

    def succeeded(self, key: Key) -> None:
        self._failures.pop(key, None)

    def forget(self, key: Key) -> None:
        """The object is gone: drop its retry state."""
        self._failures.pop(key, None)
        timer = self._timers.pop(key, None)
        if timer is not None:
            timer.cancel()

    def __len__(self) -> int:
        return self._queue.qsize()


@dataclass
class Views:
    """kopf's indexes (live views, updated by kopf on every watch event)."""

    endpoints: kopf.Index
    children: dict[str, kopf.Index]  # by kind
    pods: kopf.Index

    @staticmethod
    def _all(index: kopf.Index, key: Key) -> list[dict[str, Any]]:
        return [dict(v) for v in index[key]] if key in index else []

    def endpoint(self, key: Key) -> dict[str, Any] | None:
        found = self._all(self.endpoints, key)
        return found[0] if found else None

    def all_endpoints(self) -> list[dict[str, Any]]:
        return [dict(v) for key in self.endpoints for v in self.endpoints[key]]

    def children_of(self, key: Key, kind: str) -> list[dict[str, Any]]:
        return self._all(self.children[kind], key)

    def child(self, key: Key, kind: str, name: str) -> dict[str, Any] | None:
        return next((x for x in self.children_of(key, kind) if x["metadata"]["name"] == name), None)

    def deployment(self, key: Key) -> dict[str, Any] | None:
        return self.child(key, "Deployment", key[1])

    def pods_of(self, key: Key) -> list[dict[str, Any]]:
        return self._all(self.pods, key)


@dataclass
class Written:
    """The status this process last wrote, until kopf's index shows that version."""

    resource_version: str
    status: dict[str, Any]
    at: float


class SpecFailure(Exception):
    """A spec the API server accepted but that cannot work: phase Failed."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.failure = st.Failure(reason, message)


@dataclass
class Reconciler:
    """Everything one operator process keeps (kopf's ``memo.state``)."""

    settings: OperatorSettings
    identity: str = ""  # kopf's peering identity of this process
    priority: int = 0  # and its peering priority
    kube: k8s.Kube | None = None
    views: Views | None = None
    queue: WorkQueue = field(default_factory=WorkQueue)
    # Freshest status per ModelEndpoint uid: kopf's index may lag behind our own write.
    written: dict[str, Written] = field(default_factory=dict)
    # Replica counts decided by the autoscaler (scaler.Scaler), read by the reconcile.
    scaler: Any = None
    # Set while this process is the active peer (kopf peering); workers wait for it.
    active: asyncio.Event = field(default_factory=asyncio.Event)
    tasks: list[asyncio.Task[Any]] = field(default_factory=list)
    # Extra conditions (e.g. Routable), decided from all the ModelEndpoints in view.
    conditions: Callable[[Endpoint, Views], tuple[st.Condition, ...]] = lambda ep, views: ()

    # --- the queue's workers ----------------------------------------------------

    def start_workers(self, count: int) -> None:
        for i in range(count):
            self.tasks.append(asyncio.create_task(self._worker(), name=f"reconcile-worker-{i}"))

    async def _worker(self) -> None:
        while True:
            key, trigger = await self.queue.get()
            try:
                await self.active.wait()
                await self._run(key, trigger)
            finally:
                self.queue.done(key)

    async def _run(self, key: Key, trigger: str) -> None:
        started = time.monotonic()
        result = "ok"
        try:
            await self.reconcile(key)
            self.queue.succeeded(key)
        except kopf.TemporaryError as exc:
            result = "retry"
            metrics.RECONCILE_ERRORS.labels("temporary").inc()
            wait = self.queue.failed(key, None if exc.delay is None else float(exc.delay))
            log.warning("reconciling %s/%s failed, retrying in %.0fs: %s", key[0], key[1], wait, exc)
        except kopf.PermanentError as exc:
            result = "failed"
            metrics.RECONCILE_ERRORS.labels("permanent").inc()
            self.queue.succeeded(key)
            log.warning("reconciling %s/%s failed: %s", key[0], key[1], exc)
        except Exception:  # a bug must not end the worker: log it, retry with backoff
            result = "error"
            metrics.RECONCILE_ERRORS.labels("temporary").inc()
            self.queue.failed(key)
            log.exception("reconciling %s/%s raised", key[0], key[1])
        finally:
            metrics.RECONCILES.labels(trigger, result).inc()
            metrics.RECONCILE_SECONDS.observe(time.monotonic() - started)

    def forget(self, uid: str | None, key: Key) -> None:
        """Drop what this process keeps about a deleted ModelEndpoint."""
        if uid:
            self.written.pop(uid, None)
        self.queue.forget(key)
        if self.scaler is not None:
            self.scaler.forget(key)

    # --- the reconcile ------------------------------------------------------------

    def freshest_status(self, ep: Endpoint, body: dict[str, Any]) -> dict[str, Any]:
        """Our last write until the index has caught up with it (or a minute has passed)."""
        mine = self.written.get(ep.uid)
        if mine is None:
            return ep.status
        indexed = (body.get("metadata") or {}).get("resourceVersion")
        if indexed == mine.resource_version or time.monotonic() - mine.at > 60:
            del self.written[ep.uid]
            return ep.status
        return mine.status

    async def reconcile(self, key: Key) -> None:
        assert self.views is not None and self.kube is not None
        views = self.views
        body = views.endpoint(key)
        if body is None or body["metadata"].get("deletionTimestamp"):
            return  # gone or going: the garbage collector takes the children
        try:
            ep = Endpoint.from_body(body)
        except ValidationError as exc:
            # Only an object stored before a schema change can fail here.
            await self._write_failure_of_unparsable(body, exc)
            raise kopf.PermanentError(f"the spec does not parse: {exc.errors()[0]['msg']}") from None
        previous = self.freshest_status(ep, body)
        replicas = self.scaler.replicas(ep, views.deployment(key)) if (
            ep.spec.autoscaling is not None and self.scaler is not None) else None
        if ep.spec.autoscaling is None and self.scaler is not None:
            self.scaler.forget_track(key)
        failure: st.Failure | None = None
        retry: kopf.TemporaryError | None = None
        applied_deployment: dict[str, Any] | None = None
        try:
            applied_deployment = await self._apply_children(
                ep, manifests.children(ep, self.settings, replicas), views,
                restoring=previous.get("observedGeneration") == ep.generation)
            applied = True
        except SpecFailure as exc:
            failure, applied = exc.failure, False
        except _ApplyError as exc:
            applied = False
            if k8s.namespace_terminating(exc.cause):
                return  # the namespace is being deleted: nothing to do, nothing can be written
            failure, retry_message = classify(exc.doing, exc.cause)
            if retry_message is not None:
                retry = kopf.TemporaryError(retry_message, delay=None)
        deployment = applied_deployment or views.deployment(key)
        new = st.compute_status(
            ep, deployment, views.pods_of(key), self.settings, failure,
            applied_generation=None if applied else previous.get("observedGeneration"),
            desired=replicas, previous=previous, extra=self.conditions(ep, views),
            autoscaling=self.scaler.status(ep) if (ep.spec.autoscaling is not None and self.scaler) else None,
            adapters=self.scaler.adapter_status(ep) if self.scaler is not None else None)
        await self._write_status(ep, previous, new)
        if retry is not None:
            raise retry
        if failure is not None and failure.phase == "Failed":
            if failure.reason in c.RECHECKED_FAILURES:
                raise kopf.TemporaryError(failure.message, delay=c.FAILED_RECHECK_SECONDS)
            raise kopf.PermanentError(failure.message)

    async def _apply_children(self, ep: Endpoint, desired: dict[str, dict[str, Any] | None], views: Views,
                              restoring: bool) -> dict[str, Any] | None:
        """Apply what differs, in CHILD_KINDS order; the Deployment as applied, if it was.

        ``restoring``: the children were already right for this generation, so a
        difference now is someone else's doing (counted as a restore).
        """
        assert self.kube is not None
        plan = []
        for api_version, kind in manifests.CHILD_KINDS:
            manifest = desired[kind]
            stale = [x for x in views.children_of(ep.key, kind)
                     if _controlled_by(x, ep.uid) and (manifest is None or x["metadata"]["name"] !=
                                                        manifest["metadata"]["name"])
                     and not _mounted_by_name(ep, kind, x["metadata"]["name"])]
            live = views.child(ep.key, kind, manifest["metadata"]["name"]) if manifest else None
            plan.append((api_version, kind, manifest, live, stale))
        if any(m is not None and manifests.needs_apply(m, live) for _, _, m, live, _ in plan):
            await self._check_secrets(ep)
        deployment = None
        for api_version, kind, manifest, live, stale in plan:
            for old in stale:
                name = old["metadata"]["name"]
                log.info("deleting %s %s/%s: no longer in the spec", kind, ep.namespace, name)
                await self._call(f"deleting {kind} {name}", self.kube.delete(
                    api_version, kind, ep.namespace, name, old["metadata"]["uid"]))
            if manifest is None or not manifests.needs_apply(manifest, live):
                continue
            child = f"{kind} {ep.namespace}/{manifest['metadata']['name']}"
            # Same generation, same manifest, yet it differs: someone else's doing. A different
            # manifest is the operator's own (an autoscaler decision, a new operator version).
            if restoring and (live is None or manifests.applied_digest(live) == manifests.applied_digest(manifest)):
                log.info("%s was %s by someone else: restoring it", child, "deleted" if live is None else "changed")
                metrics.CHILDREN_RESTORED.labels(kind).inc()
            result = await self._apply_child(manifest, ep.uid, known=live is not None)
            log.info("applied %s (generation %d of ModelEndpoint %s/%s)", child, ep.generation, ep.namespace, ep.name)
            if kind == "Deployment":
                deployment = result
        return deployment

    async def _call(self, doing: str, call: Awaitable[Any]) -> Any:
        try:
            return await call
        except k8s.API_ERRORS as exc:
            raise _ApplyError(doing, exc) from None

    async def _apply_child(self, manifest: dict[str, Any], owner_uid: str, known: bool = False) -> dict[str, Any]:
        """Server-side apply one child. ``known``: it is among this ModelEndpoint's children already."""
        assert self.kube is not None
        kube = self.kube
        kind, name, ns = manifest["kind"], manifest["metadata"]["name"], manifest["metadata"]["namespace"]
        doing = f"applying {kind} {name}"
        if not known:
            # An apply that conflicts with none of a same-named object's fields would adopt it: our
            # labels and controller ownerReference added, and the garbage collector deleting it
            # with the ModelEndpoint (a user's PVC and its data). Look first.
            existing = await self._call(doing, kube.get(manifest["apiVersion"], kind, ns, name))
            if existing is not None and not _ours(existing, owner_uid):
                raise _name_in_use(kind, name)
        try:
            return await kube.apply(manifest, force=False)
        except ApiException as exc:
            if exc.status == 409:
                # Fields we own were changed by someone else (a hand edit): take them back,
                # but only on our own child, never on a same-named object of someone else.
                live = await self._call(doing, kube.get(manifest["apiVersion"], kind, ns, name))
                if live is None or _ours(live, owner_uid):
                    return await self._call(doing, kube.apply(manifest, force=True))
                raise _name_in_use(kind, name) from None
            if exc.status == 422 and kind in RECREATABLE:
                # A hand edit can leave list entries apply cannot take back (a Service port
                # keyed by a changed port number, say); these children are cheap to
                # re-create, so our own one is replaced whole.
                live = await self._call(doing, kube.get(manifest["apiVersion"], kind, ns, name))
                if live is not None and _ours(live, owner_uid):
                    await self._call(doing, kube.delete(manifest["apiVersion"], kind, ns, name,
                                                        live["metadata"]["uid"]))
                    try:
                        return await kube.apply(manifest, force=True)
                    except ApiException as again:
                        exc = again
            if exc.status in (400, 422):
                raise SpecFailure("InvalidSpec", f"the API server rejected {kind} {name}: "
                                  f"{k8s.error_message(exc)}") from None
            raise _ApplyError(doing, exc) from None
        except k8s.TRANSIENT_IO as exc:
            raise _ApplyError(doing, exc) from None

    async def _check_secrets(self, ep: Endpoint) -> None:
        """A referenced Secret or key that is missing is a Failed spec, found before any pod
        starts (the kubelet would only say so as a pod that never starts)."""
        assert self.kube is not None
        for field_name, var, ref in (("hfTokenSecretRef", "HF_TOKEN", ep.spec.hf_token_secret_ref),
                                     ("apiKeySecretRef", "API_KEY_FILE", ep.spec.api_key_secret_ref)):
            if ref is None:
                continue
            keys = await self._call(f"reading Secret {ref.name}", self.kube.secret_keys(ep.namespace, ref.name))
            if keys is None:
                raise SpecFailure("SecretNotFound", f"spec.{field_name}: Secret {ref.name!r} does not exist "
                                  f"in namespace {ep.namespace!r} ({var} comes from it)")
            if ref.key not in keys:
                raise SpecFailure("SecretKeyNotFound", f"spec.{field_name}: Secret {ref.name!r} has no key "
                                  f"{ref.key!r} (it has: {', '.join(sorted(keys)) or 'no keys'})")

    async def _write_status(self, ep: Endpoint, previous: dict[str, Any], new: dict[str, Any]) -> None:
        assert self.kube is not None
        if not st.status_changed(previous, new):
            return
        try:
            result = await self.kube.patch_status(ep.namespace, ep.name, st.status_patch(previous, new))
        except ApiException as exc:
            if k8s.namespace_terminating(exc) or exc.status == 404:
                return  # going or gone
            raise kopf.TemporaryError(f"writing the status: {exc.status} {k8s.error_message(exc)}") from None
        except k8s.TRANSIENT_IO as exc:
            raise kopf.TemporaryError(f"writing the status: {exc!r}") from None
        self.written[ep.uid] = Written(str(result.get("metadata", {}).get("resourceVersion")),
                                       dict(result.get("status") or new), time.monotonic())
        metrics.STATUS_UPDATES.labels(new["phase"]).inc()
        if new["phase"] != previous.get("phase"):
            warning = new["phase"] in ("Degraded", "Failed")
            await self.kube.post_event(ep.involved(), "Warning" if warning else "Normal", new["phase"],
                                       new.get("message") or new["phase"])

    async def _write_failure_of_unparsable(self, body: dict[str, Any], exc: ValidationError) -> None:
        assert self.kube is not None
        meta = body["metadata"]
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err.get("loc", ()))
        message = f"spec.{where}: {err.get('msg')}"
        try:
            await self.kube.patch_status(meta["namespace"], meta["name"], {
                "phase": "Failed", "message": message, "observedGeneration": meta.get("generation")})
        except k8s.API_ERRORS:
            log.warning("cannot write phase Failed for %s/%s: %s", meta["namespace"], meta["name"], message)


def classify(doing: str, cause: BaseException) -> tuple[st.Failure | None, str | None]:
    """(the status failure, the retry's reason) of an API error while ``doing`` something.

    Transient (5xx, 429, conflicts, lost connections): retried, not shown. 403 (RBAC, an
    admission webhook, a ResourceQuota): phase Degraded with the API server's message,
    retried with backoff. Anything else (401, 404, ...): phase Failed, no retry.
    """
    detail = k8s.error_message(cause) if isinstance(cause, ApiException) else repr(cause)
    if isinstance(cause, ApiException) and k8s.is_forbidden(cause):
        message = f"the API server refused {doing}: {detail}"
        return st.Failure("Forbidden", message, phase="Degraded"), message
    if k8s.is_transient(cause) or not isinstance(cause, ApiException):
        return None, f"{doing}: {detail}"
    return st.Failure("APIError", f"the API server answered {cause.status} to {doing}: {detail}"), None


class _ApplyError(Exception):
    """An API error while doing something to a child; ``doing`` says what, for the status."""

    def __init__(self, doing: str, cause: BaseException) -> None:
        super().__init__(f"{doing}: {cause!r}")
        self.doing = doing
        self.cause = cause


def _mounted_by_name(ep: Endpoint, kind: str, name: str) -> bool:
    """Our former cache PVC, now named in ``modelCache.claimName`` (to keep it): not stale."""
    cache = ep.spec.model_cache
    return kind == "PersistentVolumeClaim" and cache is not None and cache.claim_name == name


def _name_in_use(kind: str, name: str) -> SpecFailure:
    return SpecFailure("NameInUse", f"a {kind} named {name!r} already exists and is not "
                       "owned by this ModelEndpoint; rename one of them")


def _controlled_by(obj: dict[str, Any], uid: str) -> bool:
    return any(ref.get("uid") == uid and ref.get("controller")
               for ref in (obj.get("metadata") or {}).get("ownerReferences") or [])


def _ours(obj: dict[str, Any], uid: str) -> bool:
    """A child of the ModelEndpoint ``uid``: controlled by it, or, when someone removed
    its controller ownerReference by hand, written by our field manager (its
    managedFields say so). A same-named object of someone else is neither."""
    meta = obj.get("metadata") or {}
    if any(ref.get("controller") for ref in meta.get("ownerReferences") or []):
        return _controlled_by(obj, uid)
    return any(f.get("manager") == c.FIELD_MANAGER for f in meta.get("managedFields") or [])
