"""The one reconcile path and its queue, driven through a fake ``k8s.Kube`` (our I/O seam).

No API server: the fake records applies, deletes, status patches and Events and can
fail a request once; kopf's indexes are plain dicts of lists (kopf.Index is a mapping
of key -> collection). So these tests show which children a reconcile applies or
deletes, what it writes, and how each kind of error ends.
"""

from __future__ import annotations

import asyncio
import copy
import json
from typing import Any

import aiohttp
import kopf
import pytest
from kubernetes.aio.client.exceptions import ApiException

from modelendpoint_operator import constants as c
from modelendpoint_operator import handlers as h
from modelendpoint_operator import k8s, manifests, metrics
from modelendpoint_operator import reconciler as r
from modelendpoint_operator.scaler import Scaler
from modelendpoint_operator.settings import load_settings

SETTINGS = load_settings({})
KEY = ("ns", "llm")


def _owner(generation: int = 1, status: dict | None = None, **spec: Any) -> dict:
    return {"apiVersion": "serving.modelendpoint.dev/v1alpha1", "kind": "ModelEndpoint",
            "metadata": {"name": "llm", "namespace": "ns", "uid": "u1", "generation": generation,
                         "resourceVersion": "1", "creationTimestamp": "2026-01-01T00:00:00Z"},
            "spec": {"model": "m", "gpus": 0, **spec}, "status": dict(status or {})}


def _api_error(status: int, message: str = "boom") -> ApiException:
    exc = ApiException(status=status, reason="x")
    exc.body = json.dumps({"message": message})
    return exc


class FakeKube:
    """k8s.Kube's interface; ``fail[(verb, kind)]`` is raised once by that request."""

    def __init__(self, live: dict[tuple[str, str], dict] | None = None) -> None:
        self.fail: dict[tuple[str, str], BaseException] = {}
        self.applied: list[tuple[str, bool]] = []
        self.deleted: list[tuple[str, str]] = []
        self.status: list[dict] = []
        self.events: list[tuple[str, str]] = []
        self.live = dict(live or {})  # (kind, name) -> object that GET returns
        self.version = 1

    def _maybe_fail(self, verb: str, kind: str) -> None:
        exc = self.fail.pop((verb, kind), None)
        if exc is not None:
            raise exc

    async def apply(self, manifest: dict, *, force: bool) -> dict:
        self._maybe_fail("apply", manifest["kind"])
        self.applied.append((manifest["kind"], force))
        obj = copy.deepcopy(manifest)
        obj["metadata"].update(uid=f"{manifest['kind']}-uid", generation=1, resourceVersion="7")
        obj["status"] = {}
        self.live[(manifest["kind"], manifest["metadata"]["name"])] = obj
        return obj

    async def get(self, api_version: str, kind: str, namespace: str, name: str) -> dict | None:
        self._maybe_fail("get", kind)
        return self.live.get((kind, name))

    async def delete(self, api_version: str, kind: str, namespace: str, name: str, uid: str | None = None) -> bool:
        self._maybe_fail("delete", kind)
        self.deleted.append((kind, name))
        return self.live.pop((kind, name), None) is not None

    async def secret_keys(self, namespace: str, name: str) -> set[str] | None:
        self._maybe_fail("get", "Secret")
        secret = self.live.get(("Secret", name))
        return None if secret is None else set(secret.get("data") or {})

    async def patch_status(self, namespace: str, name: str, patch: dict) -> dict:
        self._maybe_fail("patch", "status")
        self.status.append(patch)
        self.version += 1
        return {"metadata": {"resourceVersion": str(self.version)}, "status": patch}

    async def post_event(self, involved: dict, type: str, reason: str, message: str) -> None:
        self.events.append((type, reason))


def views(owner: dict | None, children: dict[str, dict] | None = None, pods: list[dict] | None = None) -> r.Views:
    """kopf's indexes as the reconcile reads them: what the API server last sent."""
    kids = {kind: ({KEY: [children[kind]]} if children and kind in children else {})
            for _, kind in manifests.CHILD_KINDS}
    return r.Views({KEY: [owner]} if owner else {}, kids, {KEY: list(pods)} if pods else {})


def state(kube: FakeKube, owner: dict | None, **kwargs: Any) -> r.Reconciler:
    rec = r.Reconciler(settings=SETTINGS, kube=kube)  # type: ignore[arg-type]
    rec.views = views(owner, **kwargs)
    return rec


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def counter(metric: Any, *labels: str) -> float:
    return metric.labels(*labels)._value.get()


def live_children(kube: FakeKube) -> dict[str, dict]:
    return {kind: obj for (kind, _), obj in kube.live.items() if kind != "Secret"}


# --- the queue ---------------------------------------------------------------------------


def test_queue_holds_a_key_once_and_runs_it_again_if_added_while_in_progress() -> None:
    async def scenario() -> list:
        q = r.WorkQueue()
        q.add(KEY, "endpoint")
        q.add(KEY, "pod")  # already queued: nothing new
        assert len(q) == 1
        key, trigger = await q.get()
        assert (key, trigger) == (KEY, "endpoint")
        q.add(KEY, "child")  # in progress: once more afterwards
        assert len(q) == 0
        q.done(KEY)
        assert len(q) == 1
        return [await q.get()]
    assert run(scenario()) == [(KEY, "child")]


def test_queue_backs_off_per_key_and_a_success_resets_it() -> None:
    assert [r.backoff(n) for n in range(1, 9)] == [1, 2, 4, 8, 16, 32, 60, 60]

    async def scenario() -> tuple[float, float, float]:
        q = r.WorkQueue()
        first, second = q.failed(KEY), q.failed(KEY)
        q.succeeded(KEY)
        third = q.failed(KEY)
        q.forget(KEY)  # gone: no retry comes
        await asyncio.sleep(1.2)
        assert len(q) == 0
        return first, second, third
    assert run(scenario()) == (1, 2, 1)


def test_a_retry_comes_back_after_its_delay() -> None:
    async def scenario() -> tuple[str, str]:
        q = r.WorkQueue()
        q.add_after(KEY, 0.05, "retry")
        q.add_after(KEY, 10, "retry")  # a later one does not push the earlier one back
        key, trigger = await asyncio.wait_for(q.get(), 2)
        return key, trigger
    assert run(scenario()) == (KEY, "retry")


# --- creating, converging, restoring -----------------------------------------------


def test_first_reconcile_applies_every_child_in_order_and_writes_the_status() -> None:
    kube = FakeKube()
    owner = _owner(modelCache={"size": "1Gi"}, ingress={"enabled": True}, allowUnauthenticated=True)
    run(state(kube, owner).reconcile(KEY))
    assert [k for k, _ in kube.applied] == ["Service", "Ingress", "PersistentVolumeClaim", "Deployment"]
    assert kube.status[-1]["observedGeneration"] == 1 and kube.status[-1]["servedModelName"] == "m"
    assert kube.events == [("Normal", kube.status[-1]["phase"])]


def test_a_converged_endpoint_costs_no_request() -> None:
    kube = FakeKube()
    owner = _owner(ingress={"enabled": True}, allowUnauthenticated=True)
    run(state(kube, owner).reconcile(KEY))
    written = kube.status[-1]
    kube.applied.clear()
    settled = {**owner, "status": written}
    # kopf's indexes now hold what the API server has: the applied children, the status.
    for _ in range(3):
        run(state(kube, settled, children=live_children(kube)).reconcile(KEY))
    assert kube.applied == [] and kube.status == [written] and kube.deleted == []


@pytest.mark.parametrize(("kind", "before", "after"), [
    ("Deployment", {"nodeSelector": {"pool": "a100"}}, {}),
    ("Ingress", {"ingress": {"enabled": True, "host": "llm.example.com", "annotations": {"auth": "on"}},
                 "allowUnauthenticated": True},
     {"ingress": {"enabled": True, "host": "llm.example.com"}, "allowUnauthenticated": True}),
])
def test_a_field_dropped_from_the_spec_is_applied_away(kind: str, before: dict, after: dict) -> None:
    # The live child still has everything the new manifest sets: only the digest says it is stale.
    kube = FakeKube()
    run(state(kube, _owner(**before)).reconcile(KEY))
    children = live_children(kube)
    kube.applied.clear()
    changed = _owner(generation=2, status=kube.status[-1], **after)
    run(state(kube, changed, children=children).reconcile(KEY))
    assert (kind, False) in kube.applied
    applied = kube.live[(kind, "llm")]
    assert "nodeSelector" not in applied["spec"]["template"]["spec"] if kind == "Deployment" else \
        "auth" not in applied["metadata"]["annotations"]


def test_a_hand_edited_or_deleted_child_is_restored_and_counted() -> None:
    kube = FakeKube()
    owner = _owner()
    run(state(kube, owner).reconcile(KEY))
    settled = {**owner, "status": kube.status[-1]}
    children = live_children(kube)
    children["Service"]["metadata"]["labels"]["app.kubernetes.io/component"] = "hacked"
    before = counter(metrics.CHILDREN_RESTORED, "Service")
    kube.applied.clear()
    run(state(kube, settled, children=children).reconcile(KEY))
    assert kube.applied == [("Service", False)]
    assert counter(metrics.CHILDREN_RESTORED, "Service") == before + 1
    del children["Deployment"]
    kube.applied.clear()
    run(state(kube, settled, children=children).reconcile(KEY))
    assert ("Deployment", False) in kube.applied


def test_a_child_re_applied_for_a_new_manifest_of_the_same_generation_is_no_restore() -> None:
    """A child applied by an operator version whose manifests differ (here: one that wrote no
    digest) is brought up to date, but nobody changed it: not counted as a restore."""
    kube = FakeKube()
    owner = _owner()
    run(state(kube, owner).reconcile(KEY))
    settled = {**owner, "status": kube.status[-1]}
    children = live_children(kube)
    del children["Service"]["metadata"]["annotations"][c.APPLIED_DIGEST_ANNOTATION]
    before = counter(metrics.CHILDREN_RESTORED, "Service")
    kube.applied.clear()
    run(state(kube, settled, children=children).reconcile(KEY))
    assert kube.applied == [("Service", False)]
    assert counter(metrics.CHILDREN_RESTORED, "Service") == before


def test_a_conflict_on_our_own_child_is_forced_but_never_on_someone_elses() -> None:
    owner = _owner()
    ours = manifests.service(h.Endpoint.from_body(owner), SETTINGS)
    del ours["metadata"]["ownerReferences"]  # removed by hand: still ours by managedFields
    ours["metadata"]["managedFields"] = [{"manager": "modelendpoint-operator"}, {"manager": "kubectl-patch"}]
    kube = FakeKube(live={("Service", "llm"): ours})
    kube.fail[("apply", "Service")] = _api_error(409, "conflict with kubectl-patch")
    run(state(kube, owner).reconcile(KEY))
    assert ("Service", True) in kube.applied


@pytest.mark.parametrize("taken,applied", [
    ("Service", []),
    ("Ingress", ["Service"]),
    ("PersistentVolumeClaim", ["Service", "Ingress"]),
])
def test_a_name_in_use_fails_and_starts_no_pods(taken: str, applied: list[str]) -> None:
    owner = _owner(modelCache={"size": "1Gi"}, ingress={"enabled": True}, allowUnauthenticated=True)
    name = "llm-cache" if taken == "PersistentVolumeClaim" else "llm"
    foreign = {"kind": taken, "metadata": {"name": name, "managedFields": [{"manager": "kubectl-create"}]}}
    kube = FakeKube(live={(taken, name): foreign})
    kube.fail[("apply", taken)] = _api_error(409, "conflict")
    with pytest.raises(kopf.TemporaryError):
        run(state(kube, owner).reconcile(KEY))
    assert [k for k, _ in kube.applied] == applied  # the Deployment (pods, GPUs) comes last
    assert kube.status[-1]["phase"] == "Failed"
    assert kube.events[-1] == ("Warning", "Failed")


@pytest.mark.parametrize("taken", ["Service", "PersistentVolumeClaim"])
def test_a_same_named_object_whose_fields_do_not_conflict_is_not_adopted(taken: str) -> None:
    # Server-side apply would succeed (no field of it conflicts) and add our ownerReference: the
    # garbage collector would then delete the user's object with the ModelEndpoint.
    owner = _owner(modelCache={"size": "1Gi"})
    name = "llm-cache" if taken == "PersistentVolumeClaim" else "llm"
    foreign = {"kind": taken, "metadata": {"name": name, "managedFields": [{"manager": "kubectl-create"}]}}
    kube = FakeKube(live={(taken, name): foreign})
    with pytest.raises(kopf.TemporaryError):
        run(state(kube, owner).reconcile(KEY))
    assert taken not in [k for k, _ in kube.applied] and "Deployment" not in [k for k, _ in kube.applied]
    status = kube.status[-1]
    assert status["phase"] == "Failed"
    assert {c["type"]: c["reason"] for c in status["conditions"]}["Degraded"] == "NameInUse"


def test_autoscaling_switched_off_drops_what_the_autoscaler_decided() -> None:
    kube = FakeKube()
    rec = state(kube, _owner(autoscaling={"minReplicas": 1, "maxReplicas": 3}))
    rec.scaler = Scaler(lambda key, why: None, lambda ep, *args: None, interval=5, max_scrapes=1)
    run(rec.reconcile(KEY))
    assert KEY in rec.scaler.tracks
    rec.views = views(_owner(generation=2, status=kube.status[-1], replicas=3), live_children(kube))
    run(rec.reconcile(KEY))
    assert KEY not in rec.scaler.tracks  # turned on again later, it starts from the Deployment's count


# --- deleting only what we own (issue 13, item 9) ------------------------------------


def test_the_cache_pvc_named_in_claim_name_is_kept() -> None:
    kube = FakeKube()
    run(state(kube, _owner(modelCache={"size": "1Gi"})).reconcile(KEY))
    children = live_children(kube)
    kept = _owner(generation=2, status=kube.status[-1], modelCache={"claimName": "llm-cache"})
    run(state(kube, kept, children=children).reconcile(KEY))
    assert ("PersistentVolumeClaim", "llm-cache") not in kube.deleted
    run(state(kube, _owner(generation=3, status=kube.status[-1]), children=children).reconcile(KEY))
    assert ("PersistentVolumeClaim", "llm-cache") in kube.deleted  # no longer wanted at all


def test_only_children_this_endpoint_controls_are_deleted() -> None:
    kube = FakeKube()
    with_ingress = _owner(ingress={"enabled": True}, allowUnauthenticated=True, modelCache={"size": "1Gi"})
    run(state(kube, with_ingress).reconcile(KEY))
    children = live_children(kube)
    # The user's own labelled objects, without our controller ownerReference.
    users_ingress = copy.deepcopy(children["Ingress"])
    users_ingress["metadata"].update(name="my-ingress", uid="mine", ownerReferences=[])
    users_pvc = copy.deepcopy(children["PersistentVolumeClaim"])
    users_pvc["metadata"].update(name="my-data", uid="mine-too", ownerReferences=[
        {"apiVersion": "v1", "kind": "ConfigMap", "name": "x", "uid": "other", "controller": True}])
    index = views(_owner(generation=2), children)
    index.children["Ingress"][KEY].append(users_ingress)
    index.children["PersistentVolumeClaim"][KEY].append(users_pvc)
    rec = state(kube, None)
    rec.views = index
    run(rec.reconcile(KEY))  # generation 2: no ingress, no cache PVC any more
    assert sorted(kube.deleted) == [("Ingress", "llm"), ("PersistentVolumeClaim", "llm-cache")]


# --- errors --------------------------------------------------------------------------------


def test_a_missing_secret_fails_before_any_child_is_applied() -> None:
    kube = FakeKube()
    owner = _owner(apiKeySecretRef={"name": "keys", "key": "api"})
    with pytest.raises(kopf.TemporaryError) as waiting:  # looked at again, as the Secret is not watched
        run(state(kube, owner).reconcile(KEY))
    assert waiting.value.delay == 30
    assert kube.applied == [] and kube.status[-1]["phase"] == "Failed"
    assert "spec.apiKeySecretRef" in kube.status[-1]["message"]
    # Again (our own status write is an event too): the same verdict, nothing written.
    failed = {**owner, "status": kube.status[-1]}
    writes = len(kube.status)
    with pytest.raises(kopf.TemporaryError):
        run(state(kube, failed).reconcile(KEY))
    assert len(kube.status) == writes and kube.applied == []
    # The Secret created: the next look (the recheck, or any event) recovers.
    kube.live[("Secret", "keys")] = {"data": {"api": "eA=="}}
    run(state(kube, failed).reconcile(KEY))
    assert ("Deployment", False) in kube.applied and kube.status[-1]["phase"] != "Failed"


def test_a_permanent_api_error_sets_failed_naming_what_was_done() -> None:
    kube = FakeKube()
    kube.fail[("apply", "Deployment")] = _api_error(401, "Unauthorized")
    with pytest.raises(kopf.PermanentError):
        run(state(kube, _owner()).reconcile(KEY))
    status = kube.status[-1]
    assert status["phase"] == "Failed" and status["observedGeneration"] == 1
    assert "401" in status["message"] and "Deployment llm" in status["message"]
    assert {c["type"]: c["reason"] for c in status["conditions"]}["Degraded"] == "APIError"


def test_a_403_from_a_quota_or_webhook_is_shown_and_retried() -> None:
    """Issue 13, item 10: a refusal is not transient noise; it is Degraded, with the message."""
    kube = FakeKube()
    kube.fail[("apply", "Deployment")] = _api_error(403, 'deployments.apps "llm" is forbidden: exceeded quota')
    with pytest.raises(kopf.TemporaryError):
        run(state(kube, _owner()).reconcile(KEY))
    status = kube.status[-1]
    assert status["phase"] == "Degraded" and "exceeded quota" in status["message"]
    assert {c["type"]: c["reason"] for c in status["conditions"]}["Degraded"] == "Forbidden"
    assert kube.events[-1] == ("Warning", "Degraded")


def test_a_terminating_namespace_is_skipped_quietly() -> None:
    kube = FakeKube()
    kube.fail[("apply", "Service")] = _api_error(
        403, 'services "llm" is forbidden: unable to create new content in namespace ns because it is being terminated')
    run(state(kube, _owner()).reconcile(KEY))
    assert kube.status == []


@pytest.mark.parametrize("error", [_api_error(503, "etcdserver: leader changed"), aiohttp.ServerDisconnectedError(),
                                   aiohttp.ClientPayloadError("truncated"), TimeoutError()])
def test_transient_errors_are_retried_and_never_fail(error: BaseException) -> None:
    kube = FakeKube()
    kube.fail[("apply", "Service")] = error
    with pytest.raises(kopf.TemporaryError):
        run(state(kube, _owner()).reconcile(KEY))
    assert not any(s.get("phase") in ("Failed", "Degraded") for s in kube.status)


def test_observed_generation_stays_at_the_applied_one_while_the_new_one_retries() -> None:
    kube = FakeKube()
    run(state(kube, _owner()).reconcile(KEY))
    applied = {**_owner(generation=2, replicas=3), "status": kube.status[-1]}
    kube.fail[("apply", "Deployment")] = _api_error(500)
    with pytest.raises(kopf.TemporaryError):
        run(state(kube, applied, children=live_children(kube)).reconcile(KEY))
    status = kube.status[-1]
    assert status["observedGeneration"] == 1 and status["phase"] == "Progressing"
    assert "generation 2" in status["message"]
    run(state(kube, {**applied, "status": {**applied["status"], **status}}, children=live_children(kube))
        .reconcile(KEY))
    assert kube.status[-1]["observedGeneration"] == 2


def test_the_worker_turns_errors_into_retries_and_metrics() -> None:
    async def scenario() -> tuple[float, float]:
        kube = FakeKube()
        kube.fail[("apply", "Service")] = aiohttp.ServerDisconnectedError()
        rec = state(kube, _owner())
        before = counter(metrics.RECONCILES, "endpoint", "retry")
        await rec._run(KEY, "endpoint")
        retry = counter(metrics.RECONCILES, "endpoint", "retry") - before
        key, trigger = await asyncio.wait_for(rec.queue.get(), 3)  # back after 1 s
        assert (key, trigger) == (KEY, "retry")
        await rec._run(key, trigger)
        return retry, counter(metrics.RECONCILES, "retry", "ok")
    retry, ok = run(scenario())
    assert retry == 1 and ok >= 1


def test_the_freshest_status_is_ours_until_the_index_catches_up() -> None:
    kube = FakeKube()
    owner = _owner()
    rec = state(kube, owner)
    run(rec.reconcile(KEY))
    ep = h.Endpoint.from_body(owner)
    assert rec.freshest_status(ep, owner) == kube.status[-1]  # the index still shows {}
    caught_up = {**owner, "metadata": {**owner["metadata"], "resourceVersion": str(kube.version)}}
    assert rec.freshest_status(h.Endpoint.from_body(caught_up), caught_up) == {}
    assert rec.written == {}


# --- the handlers are thin: events only queue ----------------------------------------------


def test_child_and_pod_events_queue_their_owner() -> None:
    rec = r.Reconciler(settings=SETTINGS)
    memo = kopf.Memo(state=rec)
    body = kopf.Body({"kind": "Service", "metadata": {"name": "llm", "namespace": "ns",
                                                      "labels": {"serving.modelendpoint.dev/endpoint": "llm"}}})
    run(h.child_event(body=body, memo=memo))
    run(h.pod_event(body=body, memo=memo))
    run(h.child_event(body=kopf.Body({"metadata": {"name": "x", "namespace": "ns"}}), memo=memo))  # unlabelled
    assert len(rec.queue) == 1


def test_a_deleted_endpoint_leaves_nothing_behind() -> None:
    async def scenario() -> r.Reconciler:
        rec = r.Reconciler(settings=SETTINGS)
        rec.written["u1"] = r.Written("5", {}, 0.0)
        rec.queue.failed(KEY)
        body = kopf.Body(_owner())
        await h.endpoint_event(type="DELETED", body=body, memo=kopf.Memo(state=rec), endpoints_idx={},
                               served_names_idx={})
        return rec
    rec = run(scenario())
    assert rec.written == {} and rec.queue._failures == {} and rec.queue._timers == {}


CHILD_RESOURCES = {"Deployment": ("apps", "deployments"), "Service": ("", "services"),
                   "Ingress": ("networking.k8s.io", "ingresses"), "ConfigMap": ("", "configmaps"),
                   "PersistentVolumeClaim": ("", "persistentvolumeclaims")}


def test_each_child_kind_has_its_own_named_index_and_event_handler() -> None:
    registry = kopf.get_default_registry()
    indexes = {x.id: x for x in registry._indexing.get_all_handlers()}
    events = {x.id: x for x in registry._watching.get_all_handlers()}
    assert set(indexes) == {"endpoints_idx", "served_names_idx", "pods_idx",
                            *(f"{plural}_idx" for _, plural in CHILD_RESOURCES.values())}
    for group, plural in CHILD_RESOURCES.values():
        for handler in (indexes[f"{plural}_idx"], events[f"{plural}_event"]):
            assert (handler.selector.group, handler.selector.any_name) == (group, plural)
            assert handler.labels == h.CHILD_SELECTOR
    # No change handlers: kopf writes no progress or diff-base annotations on the objects.
    assert not registry._changing.get_all_handlers()


def test_error_classes() -> None:
    assert k8s.is_transient(_api_error(500)) and k8s.is_transient(_api_error(429))
    assert k8s.is_transient(_api_error(409)) and k8s.is_transient(TimeoutError())
    assert not k8s.is_transient(_api_error(403)) and k8s.is_forbidden(_api_error(403, "quota"))
    assert not k8s.is_transient(_api_error(422)) and not k8s.is_transient(_api_error(404))
    terminating = _api_error(403, 'services "x" is forbidden: unable to create new content in namespace t '
                                  "because it is being terminated")
    assert k8s.namespace_terminating(terminating) and not k8s.is_forbidden(terminating)
    assert k8s.error_message(_api_error(422, "spec.x: Invalid value")) == "spec.x: Invalid value"


def test_resource_paths() -> None:
    assert k8s.path_of("apps/v1", "Deployment", "ns", "d") == "/apis/apps/v1/namespaces/ns/deployments/d"
    assert k8s.path_of("v1", "Service", "ns", "s") == "/api/v1/namespaces/ns/services/s"
    assert (k8s.path_of("serving.modelendpoint.dev/v1alpha1", "ModelEndpoint", "ns", "m", "status")
            == "/apis/serving.modelendpoint.dev/v1alpha1/namespaces/ns/modelendpoints/m/status")
    assert k8s.path_of("kopf.dev/v1", "ClusterKopfPeering", None, "p") == "/apis/kopf.dev/v1/clusterkopfpeerings/p"
    assert k8s.path_of("v1", "Event", "ns") == "/api/v1/namespaces/ns/events"


@pytest.mark.parametrize(("spec", "public", "routable", "reason"), [
    ({}, False, True, "ServedNameOwned"),                                       # in-cluster gateway: open
    ({}, True, False, "KeyRequired"),                                           # published, no key, no opt-in
    ({"allowUnauthenticated": True}, True, True, "ServedNameOwned"),            # opted in
    ({"apiKeySecretRef": {"name": "keys", "key": "k"}}, True, True, "ServedNameOwned"),  # keyed
])
def test_routable_says_why_a_published_gateway_withholds_a_keyless_model(spec, public, routable, reason) -> None:
    owner = _owner(**spec)
    [cond] = h._routable(h.Endpoint.from_body(owner), views(owner), {"m": [KEY]}, public)
    assert (cond.status, cond.reason) == (routable, reason)
    if reason == "KeyRequired":
        # The gateway's 403 and this condition say the same thing, naming both ways out.
        assert "apiKeySecretRef" in cond.message and "allowUnauthenticated: true" in cond.message


def test_a_served_name_conflict_outranks_the_key_rule() -> None:
    older = {**_owner(), "metadata": {**_owner()["metadata"], "name": "old", "uid": "u0",
                                       "creationTimestamp": "2025-01-01T00:00:00Z"}}
    mine = _owner()
    vs = r.Views({KEY: [mine], ("ns", "old"): [older]}, {kind: {} for _, kind in manifests.CHILD_KINDS}, {})
    [cond] = h._routable(h.Endpoint.from_body(mine), vs, {"m": [KEY, ("ns", "old")]}, True)
    assert (cond.status, cond.reason) == (False, "ServedNameConflict")
