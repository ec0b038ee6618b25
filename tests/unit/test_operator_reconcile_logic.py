"""The reconciler and the event handlers driven through a fake ``k8s.Kube`` (our I/O seam).

No API server: the fake records applies, deletes and status patches and can fail a
request once, so these tests show what the handlers do on errors (phase Failed,
retries), which children they apply, and what they remember.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

import aiohttp
import kopf
import pytest
from kubernetes.aio.client.exceptions import ApiException

from modelendpoint_operator import handlers as h
from modelendpoint_operator import manifests, metrics
from modelendpoint_operator.settings import load_settings

SETTINGS = load_settings({})
LOG = logging.getLogger("test")
KEY = ("ns", "llm")


def _owner(generation: int = 1, **spec: Any) -> dict:
    return {"apiVersion": "serving.modelendpoint.dev/v1alpha1", "kind": "ModelEndpoint",
            "metadata": {"name": "llm", "namespace": "ns", "uid": "u1", "generation": generation},
            "spec": {"model": "m", **spec}, "status": {}}


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
        self.live = dict(live or {})  # (kind, name) -> object that GET returns
        self.uids = 0

    def _maybe_fail(self, verb: str, kind: str) -> None:
        exc = self.fail.pop((verb, kind), None)
        if exc is not None:
            raise exc

    async def apply(self, manifest: dict, *, force: bool) -> dict:
        self._maybe_fail("apply", manifest["kind"])
        self.applied.append((manifest["kind"], force))
        self.uids += 1
        obj = json.loads(json.dumps(manifest))
        obj["metadata"].update(uid=f"{manifest['kind']}-uid", generation=1)
        obj["status"] = {}
        self.live[(manifest["kind"], manifest["metadata"]["name"])] = obj
        return obj

    async def get(self, api_version: str, kind: str, namespace: str, name: str) -> dict | None:
        self._maybe_fail("get", kind)
        return self.live.get((kind, name))

    async def delete(self, api_version: str, kind: str, namespace: str, name: str,
                     uid: str | None = None) -> bool:
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
        return {}


@pytest.fixture(autouse=True)
def _no_kopf_events(monkeypatch: pytest.MonkeyPatch) -> list:
    """kopf.event needs a running operator; the tests record the Events instead."""
    posted: list = []
    monkeypatch.setattr(kopf, "event", lambda *a, **kw: posted.append(kw))
    return posted


def _indexes(owner: dict | None, children: dict[str, dict] | None = None,
             pods: list[dict] | None = None) -> dict[str, Any]:
    """The kopf indexes as handlers receive them (plain dicts of lists suffice)."""
    kwargs: dict[str, Any] = {"endpoints_idx": {KEY: [owner]} if owner else {},
                              "pods_idx": {KEY: list(pods or [])} if pods else {}}
    for api_version, kind in manifests.CHILD_KINDS:
        child = (children or {}).get(kind)
        kwargs[h._index_name(api_version, kind)] = {KEY: [child]} if child else {}
    return kwargs


def _state(kube: FakeKube) -> h.State:
    return h.State(settings=SETTINGS, kube=kube)  # type: ignore[arg-type]


def _run(coro):
    return asyncio.run(coro)


def _counter(metric, *labels: str) -> float:
    return metric.labels(*labels)._value.get()


# --- 1. observedGeneration is the generation whose children were applied ----------


def test_status_refresh_reports_the_applied_generation_not_the_new_one() -> None:
    kube = FakeKube()
    state = _state(kube)
    owner = _owner(generation=1)
    _run(h.reconcile(owner, state, h.Views.of(_indexes(owner)), LOG, "create"))
    assert state.generations["u1"] == 1 and kube.status[-1]["observedGeneration"] == 1
    # The spec moved to generation 2; its reconcile has not applied anything yet when a
    # Deployment event (a ready replica) refreshes the status from the index.
    ready = {"kind": "Deployment", "metadata": {"name": "llm", "generation": 1},
             "status": {"replicas": 1, "updatedReplicas": 1, "availableReplicas": 1,
                        "readyReplicas": 1, "observedGeneration": 1,
                        "conditions": [{"type": "Progressing", "status": "True",
                                        "reason": "NewReplicaSetAvailable"}]}}
    newer = {**_owner(generation=2, replicas=1), "status": kube.status[-1]}
    views = h.Views.of(_indexes(newer, {"Deployment": ready}))
    _run(h._refresh_status(KEY, state, views, LOG))
    assert kube.status[-1]["observedGeneration"] == 1
    assert kube.status[-1]["phase"] == "Progressing"
    assert "generation 2" in kube.status[-1]["message"]
    # Once generation 2 is applied, the status is about it.
    _run(h.reconcile(newer, state, views, LOG, "update"))
    assert kube.status[-1]["observedGeneration"] == 2


# --- 2. a failed restore or status refresh is retried --------------------------------


def _service_deleted_event(state: h.State, kube: FakeKube, owner: dict) -> None:
    body = kopf.Body(manifests.service(owner, SETTINGS))
    kwargs = _indexes(owner)
    _run(h._child_event("DELETED", body, kopf.Memo(state=state), LOG, kwargs))


def test_a_restore_that_fails_once_is_retried_and_restores_the_child() -> None:
    owner = _owner()
    kube = FakeKube(live={("ModelEndpoint", "llm"): owner})
    state = _state(kube)
    kube.fail[("apply", "Service")] = _api_error(503, "etcdserver: leader changed")
    _service_deleted_event(state, kube, owner)
    assert ("Service", False) not in kube.applied
    assert KEY in state.pending and state.pending[KEY].full
    # Not before its backoff is over; then once, and nothing stays pending.
    _run(h.retry_due(state, now=time.monotonic() - 10))
    assert ("Service", False) not in kube.applied
    _run(h.retry_due(state, now=time.monotonic() + 120))
    assert ("Service", False) in kube.applied
    assert state.pending == {}


def test_a_status_patch_that_fails_once_is_retried() -> None:
    kube = FakeKube()
    state = _state(kube)
    owner = _owner()
    state.generations["u1"] = 1
    views = h.Views.of(_indexes(owner))
    kube.fail[("patch", "status")] = aiohttp.ServerDisconnectedError()
    _run(h._refresh_status(KEY, state, views, LOG))
    assert kube.status == [] and KEY in state.pending and not state.pending[KEY].full
    state.views = views
    _run(h.retry_due(state, now=time.monotonic() + 120))
    assert kube.status and kube.status[-1]["phase"] == "Pending"
    assert state.pending == {}


def test_retries_back_off_and_stop_when_the_endpoint_is_gone() -> None:
    state = _state(FakeKube())
    h._schedule(state, KEY, LOG, full=False, attempt=3)
    assert state.pending[KEY].due - time.monotonic() == pytest.approx(8, abs=0.5)
    h._schedule(state, KEY, LOG, full=True)  # a restore supersedes a status refresh
    assert state.pending[KEY].full
    state.views = h.Views.of(_indexes(None))
    _run(h.retry_due(state, now=time.monotonic() + 120))
    assert state.pending == {}


# --- 3. labels, annotations and the ownerReference are restored ------------------------


def test_metadata_edits_are_drift_and_an_orphaned_child_is_still_ours() -> None:
    state = h.State(settings=SETTINGS)
    owner = _owner(ingress={"enabled": True, "annotations": {"a": "1"}})
    for kind in ("Service", "Deployment", "Ingress"):
        live = manifests.children(owner, SETTINGS)[kind]
        live["metadata"]["uid"] = f"{kind}-uid"
        live["metadata"]["managedFields"] = [{"manager": "modelendpoint-operator"}]
        assert not h._drifted(state, owner, live), kind
        edited = json.loads(json.dumps(live))
        edited["metadata"]["labels"]["app.kubernetes.io/component"] = "x"
        assert h._drifted(state, owner, edited), kind
        orphan = json.loads(json.dumps(live))
        del orphan["metadata"]["ownerReferences"]
        assert h._drifted(state, owner, orphan), kind
        assert h._ours(orphan, "u1")  # our field manager wrote it: still ours to restore
    ing = manifests.ingress(owner, SETTINGS)
    ing["metadata"]["annotations"] = {"a": "2"}
    assert h._drifted(state, owner, ing)
    # Someone else's object without a controller is not ours, nor another owner's child.
    assert not h._ours({"metadata": {"managedFields": [{"manager": "kubectl-create"}]}}, "u1")
    other = manifests.service(owner, SETTINGS)
    assert not h._ours(other, "u2")


def test_an_orphaned_child_with_a_conflicting_label_is_taken_back() -> None:
    owner = _owner()
    live = manifests.service(owner, SETTINGS)
    del live["metadata"]["ownerReferences"]
    live["metadata"]["managedFields"] = [{"manager": "modelendpoint-operator"},
                                         {"manager": "kubectl-patch"}]
    kube = FakeKube(live={("Service", "llm"): live})
    kube.fail[("apply", "Service")] = _api_error(409, "conflict with kubectl-patch")
    _run(h.reconcile(owner, _state(kube), h.Views.of(_indexes(owner)), LOG, "child"))
    assert ("Service", True) in kube.applied  # forced: not NameInUse


# --- 4. permanent API errors set Failed; aiohttp errors are transient -------------------


def test_a_permanent_api_error_sets_failed_and_stops() -> None:
    kube = FakeKube()
    owner = _owner()
    kube.fail[("apply", "Deployment")] = _api_error(401, "Unauthorized")
    before = _counter(metrics.RECONCILE_ERRORS, "permanent")
    with pytest.raises(kopf.PermanentError):
        _run(h.reconcile(owner, _state(kube), h.Views.of(_indexes(owner)), LOG, "create"))
    status = kube.status[-1]
    assert status["phase"] == "Failed" and status["observedGeneration"] == 1
    assert "401" in status["message"] and "Deployment llm" in status["message"]
    assert {c["type"]: c["reason"] for c in status["conditions"]}["Degraded"] == "APIError"
    assert _counter(metrics.RECONCILE_ERRORS, "permanent") == before + 1


@pytest.mark.parametrize("error", [aiohttp.ServerDisconnectedError(),
                                   aiohttp.ClientPayloadError("truncated")])
def test_aiohttp_errors_are_transient_and_counted(error: BaseException) -> None:
    kube = FakeKube()
    owner = _owner()
    kube.fail[("apply", "Service")] = error
    before = _counter(metrics.RECONCILE_ERRORS, "temporary")
    retries = _counter(metrics.RECONCILES, "create", "retry")
    with pytest.raises(kopf.TemporaryError):
        _run(h.reconcile(owner, _state(kube), h.Views.of(_indexes(owner)), LOG, "create"))
    assert _counter(metrics.RECONCILE_ERRORS, "temporary") == before + 1
    assert _counter(metrics.RECONCILES, "create", "retry") == retries + 1
    assert not any(s.get("phase") == "Failed" for s in kube.status)


# --- 5. what a Failed reconcile has applied ------------------------------------------


def test_a_missing_secret_applies_no_child() -> None:
    kube = FakeKube()
    owner = _owner(hfTokenSecretRef={"name": "hf", "key": "token"}, modelCache={"size": "1Gi"})
    with pytest.raises(kopf.PermanentError):
        _run(h.reconcile(owner, _state(kube), h.Views.of(_indexes(owner)), LOG, "create"))
    assert kube.applied == []
    assert kube.status[-1]["phase"] == "Failed"


@pytest.mark.parametrize("taken,applied", [
    ("Service", []),
    ("Ingress", ["Service"]),
    ("PersistentVolumeClaim", ["Service", "Ingress"]),
])
def test_a_name_in_use_starts_no_pods(taken: str, applied: list[str]) -> None:
    owner = _owner(modelCache={"size": "1Gi"}, ingress={"enabled": True})
    name = manifests.child_name("llm", taken)
    foreign = {"kind": taken, "metadata": {"name": name, "managedFields": [
        {"manager": "kubectl-create"}]}}
    kube = FakeKube(live={(taken, name): foreign})
    kube.fail[("apply", taken)] = _api_error(409, "conflict")
    with pytest.raises(kopf.PermanentError):
        _run(h.reconcile(owner, _state(kube), h.Views.of(_indexes(owner)), LOG, "create"))
    # Applied in order until the name clash; the Deployment (pods, GPUs) comes last.
    assert [k for k, _ in kube.applied] == applied
    assert kube.status[-1]["phase"] == "Failed"
    assert "NameInUse" in {c["reason"] for c in kube.status[-1]["conditions"]}


# --- 7. nothing is kept for deleted objects ---------------------------------------


def test_deleted_objects_leave_nothing_behind() -> None:
    kube = FakeKube()
    state = _state(kube)
    owner = _owner()
    views_kwargs = _indexes(owner)
    _run(h.reconcile(owner, state, h.Views.of(views_kwargs), LOG, "create"))
    deployment = kube.live[("Deployment", "llm")]
    assert state.applied and state.written and state.generations
    h._schedule(state, KEY, LOG, full=True)
    # The garbage collector deletes the Deployment, then the ModelEndpoint's DELETED event.
    gone = {k: v for k, v in views_kwargs.items()}
    gone["endpoints_idx"] = {}
    _run(h._child_event("DELETED", kopf.Body(deployment), kopf.Memo(state=state), LOG, gone))
    _run(h.endpoint_event(type="DELETED", body=kopf.Body(owner), memo=kopf.Memo(state=state),
                          endpoints_idx={}))
    assert state.applied == {} and state.written == {} and state.generations == {}
    assert state.pending == {} and state.locks == {}
