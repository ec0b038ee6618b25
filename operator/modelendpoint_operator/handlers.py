"""kopf handlers: thin glue from watch events to the one reconcile path.

kopf watches the ModelEndpoints, their children (Deployment, Service, Ingress,
PVC labelled ``app.kubernetes.io/managed-by=modelendpoint-operator``) and the
runtime pods, and keeps the latest of each in its indexes. Every event only puts
the owning ModelEndpoint's key in the reconciler's queue
(:mod:`.reconciler`): a worker then makes that object's children and status right
from the indexes. Start-up connects the client, starts the workers, the
autoscaler loop (:mod:`.scaler`) and the peering gate that pauses both while
another replica is the active one.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import kopf

from . import constants as c
from . import k8s, manifests, metrics, peering, served_names
from . import status as st
from .reconciler import Key, Reconciler, Views
from .scaler import Scaler
from .spec import Endpoint

CHILD_SELECTOR = {c.LABEL_MANAGED_BY: c.MANAGED_BY_VALUE}
PEERING_POLL_SECONDS = 2.0
log = logging.getLogger(__name__)


def _state(memo: kopf.Memo) -> Reconciler:
    return memo["state"]


# --- indexes ------------------------------------------------------------------------


# The indexing functions are coroutines: kopf runs a plain function in a thread pool,
# one thread hop per watch event of every indexed object.
@kopf.index(c.GROUP, c.VERSION, c.PLURAL)
async def endpoints_idx(namespace: str | None, name: str, body: kopf.Body, **_: Any) -> dict[Key, dict[str, Any]]:
    meta = body["metadata"]
    return {(namespace or "", name): {
        "apiVersion": body.get("apiVersion", c.API_VERSION),
        "kind": body.get("kind", c.KIND),
        "metadata": {key: meta.get(key) for key in (
            "name", "namespace", "uid", "generation", "resourceVersion", "creationTimestamp",
            "deletionTimestamp", "annotations")},
        "spec": dict(body.get("spec") or {}),
        "status": dict(body.get("status") or {}),
    }}


@kopf.index(c.GROUP, c.VERSION, c.PLURAL)
async def served_names_idx(namespace: str | None, name: str, body: kopf.Body, **_: Any) -> dict[str, Key] | None:
    """Served model name -> the ModelEndpoints that claim it (for the Routable condition)."""
    served = _served_name(body)
    return {served: (namespace or "", name)} if served else None


def _served_name(body: Any) -> str | None:
    spec = body.get("spec") or {}
    return spec.get("servedModelName") or spec.get("model")


def _owner_key(namespace: str | None, labels: kopf.Labels) -> Key | None:
    owner = labels.get(c.LABEL_ENDPOINT)
    return (namespace, owner) if namespace and owner else None


async def _child_index(namespace: str | None, labels: kopf.Labels, body: kopf.Body, **_: Any) -> dict[Key, dict] | None:
    key = _owner_key(namespace, labels)
    if key is None:
        return None
    meta = body["metadata"]
    return {key: {
        "kind": body.get("kind"),
        "metadata": {k: meta.get(k) for k in ("name", "uid", "generation", "resourceVersion", "labels",
                                             "annotations", "ownerReferences")},
        "spec": dict(body.get("spec") or {}),
        "data": dict(body.get("data") or {}),  # ConfigMaps
        "status": dict(body.get("status") or {}),
    }}


def _index_name(api_version: str, kind: str) -> str:
    """The kopf index of a child kind: also the keyword its handlers receive it by."""
    return f"{k8s.plural(api_version, kind)}_idx"


@kopf.index("v1", "pods", labels=CHILD_SELECTOR)
async def pods_idx(namespace: str | None, labels: kopf.Labels, body: kopf.Body, **_: Any) -> dict[Key, dict] | None:
    key = _owner_key(namespace, labels)
    if key is None:
        return None
    status = body.get("status") or {}
    containers = (body.get("spec") or {}).get("containers") or []
    return {key: {
        "metadata": {k: body["metadata"].get(k) for k in ("name", "uid", "deletionTimestamp")},
        "status": {k: status.get(k) for k in ("phase", "conditions", "containerStatuses",
                                              "initContainerStatuses", "podIP") if status.get(k)},
        "ports": [p for ct in containers if ct.get("name") == c.RUNTIME_CONTAINER for p in ct.get("ports") or []],
    }}


def views_of(kwargs: dict[str, Any]) -> Views:
    children = {kind: kwargs[_index_name(api_version, kind)] for api_version, kind in manifests.CHILD_KINDS}
    return Views(kwargs["endpoints_idx"], children, kwargs["pods_idx"])


# --- lifecycle --------------------------------------------------------------------------


@kopf.on.startup()
async def startup(settings: kopf.OperatorSettings, memo: kopf.Memo, **kwargs: Any) -> None:
    state = _state(memo)
    ours = state.settings
    # kopf's own bookkeeping in annotations of our group, none in .status (ours alone). Only
    # event handlers are used, so kopf writes no handler progress on the objects.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=c.ANNOTATION_PREFIX)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=c.ANNOTATION_PREFIX, key="last-handled-configuration")
    settings.persistence.finalizer = f"{c.ANNOTATION_PREFIX}/finalizer"  # unused: no finalizers
    settings.posting.level = logging.WARNING
    settings.peering.mandatory = not ours.standalone
    # Bounded concurrency of kopf's per-object event processing (each worker holds the
    # object's body: this bounds memory in bursts); idle workers go after 2 s.
    settings.queueing.worker_limit = ours.worker_limit
    settings.queueing.idle_timeout = 2.0
    try:
        metrics.serve(ours.metrics_port, ours.bind_address)
    except OSError as exc:  # a busy port is a bad setting: stop, do not retry in 60 s
        raise kopf.PermanentError(f"cannot serve metrics on {ours.bind_address}:{ours.metrics_port} "
                                  f"(MEP_OPERATOR_METRICS_PORT): {exc.strerror}") from None
    state.kube = await k8s.Kube.connect(ours.max_api_requests)
    if ours.peering_create and not ours.standalone:
        await state.kube.ensure_peering(ours.peering_name, ours.namespace_list)
    state.views = views_of(kwargs)
    served_index: kopf.Index = kwargs["served_names_idx"]
    state.conditions = lambda ep, views: _routable(ep, views, served_index, ours.gateway_public)
    kube = state.kube
    state.scaler = Scaler(state.queue.add, lambda ep, *a: kube.post_event(ep.involved(), *a),
                          ours.autoscaling_interval_seconds, ours.autoscaling_max_scrapes)
    state.start_workers(ours.worker_limit)
    state.tasks.append(asyncio.create_task(state.scaler.run(lambda: _scraped(state), state.active),
                                           name="autoscaler"))
    if ours.standalone:
        state.active.set()
    else:
        state.tasks.append(asyncio.create_task(_watch_peering(state), name="peering-gate"))
    log.info("operator started: watching %s; default runtime image %s",
             "all namespaces" if ours.clusterwide else ",".join(ours.namespace_list), ours.default_runtime_image)


@kopf.on.cleanup()
async def cleanup(memo: kopf.Memo, **_: Any) -> None:
    state = _state(memo)
    for task in state.tasks:
        task.cancel()
    await asyncio.gather(*state.tasks, return_exceptions=True)
    if state.kube is not None:
        await state.kube.close()


async def _watch_peering(state: Reconciler) -> None:
    """Keep ``state.active`` in step with kopf's peering verdict (see :mod:`.peering`)."""
    ours, kube = state.settings, state.kube
    assert kube is not None
    targets = [None] if ours.clusterwide else ours.namespace_list
    while True:
        try:
            statuses = [await kube.peering_status(ours.peering_name, ns) for ns in targets]
            now_active = peering.active(statuses, state.identity, state.priority)
        except Exception as exc:  # noqa: BLE001 - unknown: keep the last verdict, try again
            log.warning("cannot read the peering object(s): %r", exc)
        else:
            if now_active and not state.active.is_set():
                log.info("active peer: reconciling and autoscaling")
                state.active.set()
            elif not now_active and state.active.is_set():
                log.info("another peer is active: pausing the reconcile queue and the autoscaler")
                state.active.clear()
        await asyncio.sleep(PEERING_POLL_SECONDS)


def _scraped(state: Reconciler) -> list[tuple[Endpoint, list[dict[str, Any]], int]]:
    assert state.views is not None
    views = state.views
    out = []
    for body in views.all_endpoints():
        spec = body.get("spec") or {}
        if not (spec.get("autoscaling") or "adapters" in spec) or body["metadata"].get("deletionTimestamp"):
            continue
        try:
            ep = Endpoint.from_body(body)
        except ValueError:
            continue
        deployment = views.deployment(ep.key)
        current = int(((deployment or {}).get("spec") or {}).get("replicas") or 0)
        out.append((ep, views.pods_of(ep.key), current))
    return out


def _routable(ep: Endpoint, views: Views, served_index: kopf.Index,
              gateway_public: bool = False) -> tuple[st.Condition, ...]:
    """Routable: False when another ModelEndpoint owns this one's served name (the gateway's rule),
    or when it has no key and did not opt in while the gateway is published."""
    name = ep.spec.served_name
    claims = []
    for key in set(served_index[name]) if name in served_index else ():
        body = views.endpoint(key)
        if body is not None:
            claims.append({**body, "status": {**(body.get("status") or {}),
                                              "servedModelName": _served_name(body)}})
    owner = served_names.owners(claims).get(name, ep.key)
    if owner == ep.key:
        if served_names.withheld_from_public_gateway(gateway_public, ep.spec.api_key_secret_ref is not None,
                                                     ep.spec.allow_unauthenticated):
            return (st.Condition("Routable", False, "KeyRequired", served_names.key_required_message(name)),)
        return (st.Condition("Routable", True, "ServedNameOwned",
                             f"the gateway routes model {name!r} here"),)
    return (st.Condition("Routable", False, "ServedNameConflict", served_names.conflict_message(name, owner)),)


# --- events: every one just queues the owner ------------------------------------------


@kopf.on.event(c.GROUP, c.VERSION, c.PLURAL)
async def endpoint_event(type: str, body: kopf.Body, memo: kopf.Memo, **kwargs: Any) -> None:
    state = _state(memo)
    endpoints_idx: kopf.Index = kwargs["endpoints_idx"]
    served_names_idx: kopf.Index = kwargs["served_names_idx"]
    meta = body["metadata"]
    key: Key = (meta["namespace"], meta["name"])
    metrics.ENDPOINTS.set(len(endpoints_idx))
    if type == "DELETED":
        state.forget(meta.get("uid"), key)
    else:
        state.queue.add(key, "endpoint")
    # Who owns a served name changes only when a claimant comes, goes or changes its name:
    # then the others claiming the old or the new name are reconciled too (their Routable
    # condition). Not on every event: many endpoints sharing one name would each queue all
    # the others, every time.
    served, announced = _served_name(body), (body.get("status") or {}).get("servedModelName")
    if type in ("ADDED", "DELETED") or body["metadata"].get("deletionTimestamp") or served != announced:
        for name in {served, announced}:
            if name and name in served_names_idx:
                for other in set(served_names_idx[name]):
                    if other != key:
                        state.queue.add(other, "endpoint")


async def child_event(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    key = _owner_key(body["metadata"].get("namespace"), body["metadata"].get("labels") or {})
    if key is not None:
        _state(memo).queue.add(key, "child")


def _watch_children() -> None:
    """Register, per child kind, its kopf index and its event handler.

    kopf indexes one resource per index, so each kind has its own, named
    ``<plural>_idx`` (deployments_idx, services_idx, ingresses_idx,
    persistentvolumeclaims_idx): handlers receive it as that keyword (views_of).
    """
    for api_version, kind in manifests.CHILD_KINDS:
        plural = k8s.plural(api_version, kind)
        kopf.index(api_version, plural, id=_index_name(api_version, kind), labels=CHILD_SELECTOR)(_child_index)
        kopf.on.event(api_version, plural, id=f"{plural}_event", labels=CHILD_SELECTOR)(child_event)


_watch_children()


@kopf.on.event("v1", "pods", labels=CHILD_SELECTOR)
async def pod_event(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    key = _owner_key(body["metadata"].get("namespace"), body["metadata"].get("labels") or {})
    if key is not None:
        _state(memo).queue.add(key, "pod")
