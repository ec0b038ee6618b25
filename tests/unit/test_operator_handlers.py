"""The handlers' decisions that need no API: drift, ownership, error classes, backoff."""

from __future__ import annotations

import json

import kopf
from kubernetes.aio.client.exceptions import ApiException

from modelendpoint_operator import handlers as h
from modelendpoint_operator import k8s, manifests
from modelendpoint_operator.settings import load_settings

SETTINGS = load_settings({})
OWNER = {"apiVersion": "serving.modelendpoint.dev/v1alpha1", "kind": "ModelEndpoint",
         "metadata": {"name": "llm", "namespace": "ns", "uid": "u1", "generation": 1},
         "spec": {"model": "m", "ingress": {"enabled": True}}}


def _deployment(uid: str, generation: int) -> dict:
    return {"kind": "Deployment", "metadata": {"uid": uid, "generation": generation}}


def test_deployment_drift_is_a_newer_generation_than_our_last_apply() -> None:
    state = h.State(settings=SETTINGS)
    assert not h._drifted(state, OWNER, _deployment("d", 4))  # unknown: learnt, not drift
    assert not h._drifted(state, OWNER, _deployment("d", 4))
    assert not h._drifted(state, OWNER, _deployment("d", 3))  # a stale event
    assert h._drifted(state, OWNER, _deployment("d", 5))      # someone changed the spec
    h._remember(state, _deployment("d", 6))                    # our own apply
    assert not h._drifted(state, OWNER, _deployment("d", 6))


def test_other_children_drift_when_a_field_we_set_differs() -> None:
    state = h.State(settings=SETTINGS)
    live = manifests.service(OWNER, SETTINGS)
    live["spec"]["clusterIP"] = "10.0.0.7"
    assert not h._drifted(state, OWNER, live)
    live["spec"]["selector"] = {"app": "other"}
    assert h._drifted(state, OWNER, live)
    # A child the spec no longer wants is the reconcile's to delete, not to restore.
    no_ingress = {**OWNER, "spec": {"model": "m"}}
    assert not h._drifted(state, no_ingress, manifests.ingress(OWNER, SETTINGS))


def test_controlled_by() -> None:
    child = manifests.deployment(OWNER, SETTINGS)
    assert h._controlled_by(child, "u1")
    assert not h._controlled_by(child, "other")
    assert not h._controlled_by({"metadata": {}}, "u1")


def _api_error(status: int, message: str = "") -> ApiException:
    exc = ApiException(status=status, reason="x")
    exc.body = json.dumps({"message": message})
    return exc


def test_error_classes() -> None:
    assert k8s.is_transient(_api_error(500)) and k8s.is_transient(_api_error(429))
    assert k8s.is_transient(_api_error(409)) and k8s.is_transient(TimeoutError())
    assert not k8s.is_transient(_api_error(422)) and not k8s.is_transient(_api_error(404))
    assert k8s.namespace_terminating(_api_error(
        403, 'services "x" is forbidden: unable to create new content in namespace t because '
             "it is being terminated"))
    assert not k8s.namespace_terminating(_api_error(403, "RBAC: access denied"))
    assert k8s.error_message(_api_error(422, "spec.x: Invalid value")) == "spec.x: Invalid value"


def test_backoff_doubles_up_to_a_minute() -> None:
    assert [h._backoff(r) for r in range(8)] == [1, 2, 4, 8, 16, 32, 60, 60]


def test_resource_paths() -> None:
    assert k8s.path_of("apps/v1", "Deployment", "ns", "d") == "/apis/apps/v1/namespaces/ns/deployments/d"
    assert k8s.path_of("v1", "Service", "ns", "s") == "/api/v1/namespaces/ns/services/s"
    assert (k8s.path_of("serving.modelendpoint.dev/v1alpha1", "ModelEndpoint", "ns", "m", "status")
            == "/apis/serving.modelendpoint.dev/v1alpha1/namespaces/ns/modelendpoints/m/status")
    assert k8s.path_of("kopf.dev/v1", "ClusterKopfPeering", None, "p") == "/apis/kopf.dev/v1/clusterkopfpeerings/p"


CHILD_RESOURCES = {"Deployment": ("apps", "deployments"), "Service": ("", "services"),
                   "Ingress": ("networking.k8s.io", "ingresses"),
                   "PersistentVolumeClaim": ("", "persistentvolumeclaims")}


def test_each_child_kind_has_its_own_named_index_and_event_handler() -> None:
    registry = kopf.get_default_registry()
    indexes = {x.id: x for x in registry._indexing.get_all_handlers()}
    events = {x.id: x for x in registry._watching.get_all_handlers()}
    assert set(indexes) == {"endpoints_idx", "pods_idx", *(f"{plural}_idx" for _, plural
                                                          in CHILD_RESOURCES.values())}
    for group, plural in CHILD_RESOURCES.values():
        for handler in (indexes[f"{plural}_idx"], events[f"{plural}_event"]):
            assert (handler.selector.group, handler.selector.any_name) == (group, plural)
            assert handler.labels == h.CHILD_SELECTOR


def test_views_read_each_kind_from_its_own_index() -> None:
    key = ("ns", "llm")
    labels = {"serving.modelendpoint.dev/endpoint": "llm"}
    kwargs = {"endpoints_idx": {}, "pods_idx": {}}
    for kind, (_, plural) in CHILD_RESOURCES.items():
        body = kopf.Body({"kind": kind, "metadata": {"name": "llm", "uid": kind}})
        kwargs[f"{plural}_idx"] = {k: [v] for k, v in h._child_index("ns", labels, body).items()}
    views = h.Views.of(kwargs)
    for kind in CHILD_RESOURCES:
        assert [x["metadata"]["uid"] for x in views.children_of(key, kind)] == [kind]
    assert views.deployment(key)["kind"] == "Deployment"
    assert views.children_of(("ns", "other"), "Service") == []
    assert h._child_index("ns", {}, kopf.Body({"metadata": {}})) is None  # not labelled
