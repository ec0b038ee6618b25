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
- A restore or status refresh that fails with a transient error is retried by
  the operator's retry loop with the same backoff (kopf never retries event
  handlers, and its timers would add a finalizer to every ModelEndpoint).

kopf indexes keep the latest ModelEndpoints, Deployments, children and pods
in memory, so status refreshes read nothing from the API server.
"""

from __future__ import annotations

import asyncio
import contextvars
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
class Retry:
    """Work an event handler could not finish (a transient error), due again at ``due``."""

    due: float  # time.monotonic()
    attempt: int
    full: bool  # True: reconcile (restore children); False: refresh the status only
    logger: logging.Logger  # the object's logger (kopf's, with the object in JSON logs)
    # The context of the kopf handler that failed: kopf.event() needs kopf's context
    # variables (its Event queue), which a task of our own would not have.
    context: contextvars.Context


@dataclass
class State:
    """Per-process memory (kopf's ``memo.state``).

    Every per-object entry is dropped when its object is deleted (``endpoint_event``,
    ``child_event``), so a long-running operator does not accumulate them.
    """

    settings: OperatorSettings
    kube: k8s.Kube | None = None
    locks: dict[Key, asyncio.Lock] = field(default_factory=dict)
    # Deployment uid -> metadata.generation after our last apply: a Deployment event
    # showing another generation means someone else changed its spec.
    applied: dict[str, int] = field(default_factory=dict)
    # uid of the ModelEndpoint -> the status we last wrote (fresher than the index).
    written: dict[str, dict[str, Any]] = field(default_factory=dict)
    # uid of the ModelEndpoint -> the generation whose children were last applied
    # successfully: status refreshes report it as observedGeneration.
    generations: dict[str, int] = field(default_factory=dict)
    # ModelEndpoints whose restore or status refresh failed transiently: retried by
    # the retry loop (kopf does not retry event handlers).
    pending: dict[Key, Retry] = field(default_factory=dict)
    views: "Views | None" = None  # kopf's (live) indexes, for the retry loop
    retry_task: asyncio.Task | None = None

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
    state.retry_task = asyncio.create_task(_retry_loop(state, logger))
    logger.info("operator started: watching %s; default runtime image %s",
                "all namespaces" if ours.clusterwide else ",".join(ours.namespace_list),
                ours.default_runtime_image)


@kopf.on.cleanup()
async def cleanup(memo: kopf.Memo, **_: Any) -> None:
    state = _state(memo)
    if state.retry_task is not None:
        state.retry_task.cancel()
    if state.kube is not None:
        await state.kube.close()


# --- reconciliation -----------------------------------------------------------


def _controlled_by(obj: dict, uid: str) -> bool:
    return any(ref.get("uid") == uid and ref.get("controller")
               for ref in (obj.get("metadata") or {}).get("ownerReferences") or [])


def _ours(obj: dict, uid: str) -> bool:
    """A child of the ModelEndpoint ``uid``: controlled by it, or, when someone removed
    its controller ownerReference by hand, written by our field manager (its
    managedFields say so). A same-named object of someone else is neither."""
    meta = obj.get("metadata") or {}
    if any(ref.get("controller") for ref in meta.get("ownerReferences") or []):
        return _controlled_by(obj, uid)
    return any(f.get("manager") == c.FIELD_MANAGER for f in meta.get("managedFields") or [])


def _remember(state: State, obj: dict) -> None:
    meta = obj.get("metadata") or {}
    if not meta.get("uid"):
        return
    if obj.get("kind") == "Deployment":
        state.applied[meta["uid"]] = int(meta.get("generation") or 0)


def _drifted(state: State, owner: dict, obj: dict) -> bool:
    """A child event shows a change we didn't make.

    Every child: a label, annotation or the ownerReference we set is changed or gone
    (these edits move no generation). Deployments: also its spec generation differs
    from the one our last apply left (an unknown Deployment, after a restart, is
    learnt: resume re-applies); comparing the generation, not the fields, keeps the
    frequent Deployment status events cheap. Other children: a field we set has
    another value in the live object.
    """
    meta = obj.get("metadata") or {}
    kind = obj.get("kind")
    if kind == "Deployment":
        generation = int(meta.get("generation") or 0)
        known = state.applied.get(meta.get("uid"))
        if known is None:
            state.applied[meta.get("uid")] = generation
        elif generation > known:  # older generations are stale events from before our apply
            return True
    desired = manifests.children(owner, state.settings).get(kind)
    if desired is None or desired["metadata"]["name"] != meta.get("name"):
        return False  # not wanted any more: the next reconcile deletes it
    if manifests.metadata_differs(desired, obj):
        return True
    return kind != "Deployment" and manifests.differs(desired, obj)


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
            if live is None or _ours(live, owner_uid):
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
            if live is not None and _ours(live, owner_uid):
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
                        failure: st.Failure | None, logger: logging.Logger,
                        applied_generation: int | None = None) -> None:
    uid = owner["metadata"]["uid"]
    old = state.written.get(uid) or owner.get("status") or {}
    if (owner.get("status") or {}).get("observedGeneration", -1) > old.get("observedGeneration", -1):
        old = owner["status"]
    new = st.compute_status(owner, deployment, pods, state.settings, failure,
                            applied_generation=applied_generation)
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
    generation = owner["metadata"].get("generation")
    started = time.monotonic()
    result = "ok"
    doing = "reading the referenced Secrets"
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
                            doing = f"deleting {kind} {meta['name']}"
                            logger.info("deleting %s %s: no longer in the spec", kind, meta["name"])
                            await state.kube.delete(*_api_version(kind), ns, meta["name"], meta["uid"])
                        continue
                    doing = f"applying {kind} {manifest['metadata']['name']}"
                    live = await _apply_child(state, manifest, uid)
                    _remember(state, live)
                    if kind == "Deployment":
                        deployment = live
                if generation is not None:
                    state.generations[uid] = int(generation)
            except SpecFailure as exc:
                failure = exc.failure
                result = "failed"
                metrics.RECONCILE_ERRORS.labels("permanent").inc()
            if deployment is None:
                deployment = views.deployment(key)
            doing = "writing the status"
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
            # Neither the spec nor a retry can fix it (401, 404, ...): say so in the status
            # (phase Failed) and stop retrying, like a spec that cannot work.
            result = "error"
            metrics.RECONCILE_ERRORS.labels("permanent").inc()
            failure = st.Failure("APIError", f"the API server answered {exc.status} to {doing}: "
                                 f"{k8s.error_message(exc)}")
            try:
                await _write_failure(state, owner, views, failure, logger)
            except kopf.TemporaryError:
                result = "retry"
                raise
            raise kopf.PermanentError(failure.message) from None
        except k8s.TRANSIENT_IO as exc:
            result = "retry"
            metrics.RECONCILE_ERRORS.labels("temporary").inc()
            raise kopf.TemporaryError(f"API unreachable: {exc!r}", delay=5) from None
        finally:
            metrics.RECONCILES.labels(trigger, result).inc()
            metrics.RECONCILE_SECONDS.observe(time.monotonic() - started)


async def _write_failure(state: State, owner: dict, views: Views, failure: st.Failure,
                         logger: logging.Logger) -> None:
    """Phase Failed after an API error; if even that write fails, kopf retries the reconcile."""
    key = (owner["metadata"]["namespace"], owner["metadata"]["name"])
    try:
        await _write_status(state, owner, views.deployment(key), views.pods_of(key), failure,
                            logger)
    except (ApiException, *k8s.TRANSIENT_IO) as exc:
        logger.warning("cannot write phase Failed (%s): %r", failure.message, exc)
        raise kopf.TemporaryError(failure.message, delay=5) from None


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
    state = _state(memo)
    state.views = Views.of(kwargs)
    try:
        await reconcile(owner, state, state.views, logger, trigger)
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
        forget_endpoint(_state(memo), body)


def forget_endpoint(state: State, body: kopf.Body | dict) -> None:
    """Drop what this process keeps about a deleted ModelEndpoint (no finalizer needed:
    the DELETED watch event is enough, and the garbage collector takes the children)."""
    meta = body["metadata"]
    key = (meta.get("namespace"), meta.get("name"))
    state.written.pop(meta.get("uid"), None)
    state.generations.pop(meta.get("uid"), None)
    state.pending.pop(key, None)
    lock = state.locks.get(key)
    if lock is not None and not lock.locked():
        state.locks.pop(key, None)


# --- children and pods --------------------------------------------------------


async def _child_event(event_type: str | None, body: kopf.Body, memo: kopf.Memo,
                       logger: logging.Logger, kwargs: dict) -> None:
    state = _state(memo)
    views = state.views = Views.of(kwargs)
    if event_type == "DELETED":
        state.applied.pop(body["metadata"].get("uid"), None)  # that Deployment is gone for good
    key = _owner_key(body["metadata"].get("namespace"), body["metadata"].get("labels") or {})
    if key is None:
        return
    owner = views.endpoint(key)
    if owner is None or owner["metadata"].get("deletionTimestamp"):
        return  # the owner is gone or going: the garbage collector takes the children
    if not _ours(dict(body), owner["metadata"]["uid"]) and event_type != "DELETED":
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
        except (ApiException, *k8s.TRANSIENT_IO) as exc:
            logger.warning("cannot check the owner of %s %s: %s (retrying)", kind,
                           body["metadata"]["name"],
                           k8s.error_message(exc) if isinstance(exc, ApiException) else repr(exc))
            _schedule(state, key, logger, full=True)
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
        await _restore(key, owner, state, views, logger, "child")
        return
    if kind == "Deployment":
        await _refresh_status(key, state, views, logger)


async def _restore(key: Key, owner: dict, state: State, views: Views, logger: logging.Logger,
                   trigger: str, attempt: int = 0) -> None:
    """Reconcile outside kopf's create/update handlers; a transient failure is retried."""
    try:
        await reconcile(owner, state, views, logger, trigger)
    except kopf.TemporaryError as exc:
        logger.warning("reconciling %s/%s failed (retrying): %s", key[0], key[1], exc)
        _schedule(state, key, logger, full=True, attempt=attempt)
    except kopf.PermanentError as exc:
        logger.warning("reconciling %s/%s failed: %s", key[0], key[1], exc)  # phase Failed


async def _refresh_status(key: Key, state: State, views: Views, logger: logging.Logger,
                          attempt: int = 0) -> None:
    async with state.lock(key):
        owner = views.endpoint(key)
        if owner is None or owner["metadata"].get("deletionTimestamp"):
            return
        uid = owner["metadata"]["uid"]
        current = state.written.get(uid) or owner.get("status") or {}
        if (current.get("phase") == "Failed"
                and current.get("observedGeneration") == owner["metadata"].get("generation")):
            return  # Failed sticks until the spec changes (the next reconcile decides)
        # The generation whose children were applied: ours since the start, else the one
        # the last status reported (after a restart). None: nothing applied yet, so no
        # status to refresh (the running reconcile writes it).
        applied = state.generations.get(uid, current.get("observedGeneration"))
        if applied is None:
            return
        try:
            await _write_status(state, owner, views.deployment(key), views.pods_of(key), None,
                                logger, applied_generation=applied)
        except ApiException as exc:
            if k8s.namespace_terminating(exc):
                return
            logger.warning("status update of %s/%s failed: %s", key[0], key[1],
                           k8s.error_message(exc))
            if k8s.is_transient(exc):
                _schedule(state, key, logger, full=False, attempt=attempt)
        except k8s.TRANSIENT_IO as exc:
            logger.warning("status update of %s/%s failed (retrying): %r", key[0], key[1], exc)
            _schedule(state, key, logger, full=False, attempt=attempt)


# --- retries of event handlers ------------------------------------------------
# kopf retries the create/update/resume handlers (TemporaryError) but never event
# handlers, and a kopf timer would put a finalizer on every ModelEndpoint. So what a
# child or pod event could not finish is kept in ``state.pending`` and redone by one
# loop with the reconcile's backoff (1 s doubling up to 60 s), until it succeeds or
# the ModelEndpoint is gone. It costs nothing while nothing fails.


def _schedule(state: State, key: Key, logger: logging.Logger, *, full: bool,
              attempt: int = 0) -> None:
    old = state.pending.get(key)
    full = full or (old is not None and old.full)
    state.pending[key] = Retry(time.monotonic() + _backoff(attempt), attempt, full, logger,
                               contextvars.copy_context())


async def _redo(key: Key, item: Retry, state: State, views: Views) -> None:
    owner = views.endpoint(key)
    if owner is None or owner["metadata"].get("deletionTimestamp"):
        return  # gone or going: nothing to retry
    if item.full:
        await _restore(key, owner, state, views, item.logger, "retry", item.attempt + 1)
    else:
        await _refresh_status(key, state, views, item.logger, item.attempt + 1)


async def retry_due(state: State, now: float | None = None) -> None:
    """Redo the pending work that is due (a restore, or a status refresh)."""
    now = time.monotonic() if now is None else now
    views = state.views
    if views is None:
        return
    tasks = []
    for key, item in list(state.pending.items()):
        if item.due > now:
            continue
        del state.pending[key]  # scheduled again if it fails again
        tasks.append(asyncio.create_task(_redo(key, item, state, views),
                                         context=item.context.copy()))
    # Side by side, like kopf's workers; the client's request limit bounds the load.
    await asyncio.gather(*tasks)


async def _retry_loop(state: State, logger: logging.Logger, period: float = 1.0) -> None:
    while True:
        await asyncio.sleep(period)
        try:
            await retry_due(state)
        except Exception:  # a bug must not end the loop: the next round tries again
            logger.exception("retrying failed work")


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
        state = _state(memo)
        state.views = Views.of(kwargs)
        await _refresh_status(key, state, state.views, logger)
