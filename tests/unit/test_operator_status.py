"""Status from the Deployment and its pods (pure): phases, conditions, messages."""

from __future__ import annotations

import pytest

from modelendpoint_operator import status as st
from modelendpoint_operator.settings import load_settings
from modelendpoint_operator.spec import Endpoint

SETTINGS = load_settings({})


def owner(replicas: int = 2, gpus: int = 1, status: dict | None = None, **spec) -> Endpoint:
    return Endpoint.from_body({"apiVersion": "serving.modelendpoint.dev/v1alpha1", "kind": "ModelEndpoint",
                               "metadata": {"name": "llm", "namespace": "ns", "uid": "u", "generation": 2},
                               "spec": {"model": "org/m", "replicas": replicas, "gpus": gpus, **spec},
                               "status": status or {}})


def deployment(*, replicas=2, updated=2, available=2, ready=None, generation=5, observed=5,
               progressing="NewReplicaSetAvailable", progressing_status="True",
               replica_failure: str | None = None) -> dict:
    conditions = [{"type": "Progressing", "status": progressing_status, "reason": progressing,
                   "message": f"{progressing} message"}]
    if replica_failure:
        conditions.append({"type": "ReplicaFailure", "status": "True", "reason": "FailedCreate",
                           "message": replica_failure})
    return {"metadata": {"name": "llm", "generation": generation},
            "status": {"replicas": replicas, "updatedReplicas": updated,
                       "availableReplicas": available,
                       "readyReplicas": available if ready is None else ready,
                       "observedGeneration": observed, "conditions": conditions}}


def unschedulable_pod(message: str) -> dict:
    return {"metadata": {"name": "llm-abc"},
            "status": {"phase": "Pending", "conditions": [
                {"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                 "message": message}]}}


def waiting_pod(reason: str) -> dict:
    return {"metadata": {"name": "llm-def"},
            "status": {"phase": "Pending", "containerStatuses": [
                {"name": "runtime", "state": {"waiting": {"reason": reason, "message": "boom"}}}]}}


GPU_WHY = "0/2 nodes are available: 2 Insufficient nvidia.com/gpu."
GPU_MSG = (f"{GPU_WHY} preemption: 0/2 nodes are "
           "available: 2 No preemption victims found for incoming pod.")


@pytest.mark.parametrize("case,kwargs,phase,reason", [
    ("no-deployment", dict(deployment=None), "Pending", "Creating"),
    ("ready", dict(deployment=deployment()), "Ready", "AllReplicasAvailable"),
    ("controller-not-caught-up", dict(deployment=deployment(observed=4)), "Progressing",
     "RollingOut"),
    ("rolling-out", dict(deployment=deployment(updated=1, replicas=3,
                                               progressing="ReplicaSetUpdated")),
     "Progressing", "RollingOut"),
    ("first-pods-starting", dict(deployment=deployment(available=0,
                                                       progressing="NewReplicaSetCreated")),
     "Progressing", "RollingOut"),
    ("unschedulable-gpus", dict(deployment=deployment(available=0, progressing="ReplicaSetUpdated"),
                                pods=[unschedulable_pod(GPU_MSG)]), "Degraded", "Unschedulable"),
    ("image-pull", dict(deployment=deployment(available=1, progressing="ReplicaSetUpdated"),
                        pods=[waiting_pod("ImagePullBackOff")]), "Degraded", "ImagePullBackOff"),
    ("crash-loop", dict(deployment=deployment(available=1), pods=[waiting_pod("CrashLoopBackOff")]),
     "Degraded", "CrashLoopBackOff"),
    ("deadline", dict(deployment=deployment(available=0, progressing="ProgressDeadlineExceeded",
                                            progressing_status="False")),
     "Degraded", "ProgressDeadlineExceeded"),
    ("quota", dict(deployment=deployment(replicas=0, updated=0, available=0,
                                         progressing="ReplicaSetUpdated",
                                         replica_failure="exceeded quota")),
     "Degraded", "FailedCreate"),
    ("lost-replica", dict(deployment=deployment(available=1)), "Degraded", "ReplicasUnavailable"),
    ("failure-wins", dict(deployment=deployment(), failure=st.Failure("SecretNotFound", "no hf")),
     "Failed", "SecretNotFound"),
])
def test_assess(case: str, kwargs: dict, phase: str, reason: str) -> None:
    a = st.assess(owner(), kwargs.get("deployment"), kwargs.get("pods", []), kwargs.get("failure"))
    assert (a.phase, a.reason) == (phase, reason), a


def test_scaled_to_zero_is_pending() -> None:
    dep = deployment(replicas=0, updated=0, available=0)
    assert st.assess(owner(replicas=0), dep, []).phase == "Pending"
    dep = deployment(replicas=1, updated=1, available=1)
    assert st.assess(owner(replicas=0), dep, []).phase == "Progressing"
    # The autoscaler's count, not spec.replicas, is what the Deployment should have.
    assert st.assess(owner(replicas=2), deployment(replicas=0, updated=0, available=0), [],
                     desired=0).reason == "ScaledToZero"


def test_ready_column_shows_the_autoscalers_count() -> None:
    s = st.compute_status(owner(replicas=1), deployment(replicas=3, updated=3, available=3), [], SETTINGS,
                          desired=3, autoscaling={"desiredReplicas": 3, "load": 19.0})
    assert (s["phase"], s["ready"]) == ("Ready", "3/3")
    assert s["autoscaling"] == {"desiredReplicas": 3, "load": 19.0}


def test_a_refused_apply_is_degraded_but_what_serves_stays_ready() -> None:
    refused = st.Failure("Forbidden", "the API server refused applying Ingress llm: quota", phase="Degraded")
    s = st.compute_status(owner(), deployment(), [], SETTINGS, refused)
    conds = {c["type"]: c for c in s["conditions"]}
    assert (s["phase"], s["message"]) == ("Degraded", refused.message)
    assert conds["Ready"]["status"] == "True" and conds["Degraded"]["reason"] == "Forbidden"


def test_extra_conditions() -> None:
    s = st.compute_status(owner(), deployment(), [], SETTINGS,
                          extra=(st.Condition("Routable", False, "ServedNameConflict", "owned by ns/a"),))
    routable = {c["type"]: c for c in s["conditions"]}["Routable"]
    assert (routable["status"], routable["reason"], routable["message"]) == ("False", "ServedNameConflict",
                                                                             "owned by ns/a")


def test_not_enough_gpus_message_names_gpus_and_the_scheduler_reason() -> None:
    a = st.assess(owner(gpus=16), deployment(available=0, progressing="ReplicaSetUpdated"),
                  [unschedulable_pod(GPU_MSG)])
    assert "not enough GPUs" in a.message and "16 free nvidia.com/gpu" in a.message
    assert a.message.endswith(f"is unschedulable: {GPU_WHY}"), a.message


# What kube-scheduler v1.37 writes in the PodScheduled condition for a pod whose PVC is
# unbound: the PostFilter (preemption) outcome "not found" follows the reason.
PVC_WHY = "0/2 nodes are available: pod has unbound immediate PersistentVolumeClaims."


@pytest.mark.parametrize("scheduler_message", [
    PVC_WHY,
    f"{PVC_WHY} not found",
    f"{PVC_WHY} preemption: 0/2 nodes are available: 2 Preemption is not helpful for scheduling.",
])
def test_other_scheduler_reasons_pass_through_without_the_preemption_outcome(
    scheduler_message: str,
) -> None:
    a = st.assess(owner(), deployment(available=0, progressing="ReplicaSetUpdated"),
                  [unschedulable_pod(scheduler_message)])
    assert a.phase == "Degraded" and "GPU" not in a.message
    assert a.message == f"0/2 replicas available; pod llm-abc is unschedulable: {PVC_WHY}"


@pytest.mark.parametrize("message,why", [
    ("", ""),
    ("  0/3 nodes are available: 3 node(s) had untolerated taint {gpu: }. not found\n",
     "0/3 nodes are available: 3 node(s) had untolerated taint {gpu: }."),
    # Not kube-scheduler's format (another scheduler): kept as it is.
    ("no room. try later", "no room. try later"),
])
def test_scheduler_reason(message: str, why: str) -> None:
    assert st.scheduler_reason(message) == why


def test_terminating_pods_are_ignored() -> None:
    pod = unschedulable_pod(GPU_MSG)
    pod["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    a = st.assess(owner(), deployment(updated=2, available=1, progressing="ReplicaSetUpdated"), [pod])
    assert a.phase == "Progressing"


def test_degraded_while_still_serving_keeps_ready_true() -> None:
    # A rollout blocked by the scheduler while the old replicas still serve.
    s = st.compute_status(owner(), deployment(available=2, updated=1, replicas=3,
                                              progressing="ReplicaSetUpdated"),
                          [unschedulable_pod(GPU_MSG)], SETTINGS, now="T1")
    conds = {c["type"]: c for c in s["conditions"]}
    assert s["phase"] == "Degraded"
    assert conds["Ready"]["status"] == "True" and conds["Degraded"]["status"] == "True"


def test_compute_status_fields() -> None:
    s = st.compute_status(owner(servedModelName="chat", ingress={"enabled": True, "host": "a.io"}),
                          deployment(available=2, ready=2), [], SETTINGS, now="T1")
    assert s["phase"] == "Ready" and s["ready"] == "2/2"
    assert s["replicas"] == 2 and s["readyReplicas"] == 2
    assert s["servedModelName"] == "chat"
    assert s["url"] == "http://llm.ns.svc.cluster.local/v2/llm/openai/v1"
    assert s["externalURL"] == "http://a.io/v2/llm/openai/v1"
    assert s["selector"] == "serving.modelendpoint.dev/endpoint=llm"
    assert s["observedGeneration"] == 2
    conds = {c["type"]: c for c in s["conditions"]}
    assert set(conds) == {"Ready", "Progressing", "Degraded"}
    assert conds["Ready"] == {"type": "Ready", "status": "True", "reason": "AllReplicasAvailable",
                              "message": "2/2 replicas available", "lastTransitionTime": "T1",
                              "observedGeneration": 2}
    assert conds["Degraded"]["status"] == "False" and conds["Progressing"]["status"] == "False"


def test_served_model_name_defaults_to_the_model() -> None:
    assert st.compute_status(owner(), None, [], SETTINGS)["servedModelName"] == "org/m"


def test_last_transition_time_moves_only_when_a_condition_flips() -> None:
    first = st.compute_status(owner(), deployment(), [], SETTINGS, now="T1")
    again = st.compute_status(owner(status=first), deployment(), [], SETTINGS, now="T2")
    assert st.compute_status(owner(), deployment(), [], SETTINGS, now="T2", previous=first) == first
    assert again == first and not st.status_changed(first, again)
    degraded = st.compute_status(owner(status=first), deployment(available=1), [], SETTINGS, now="T3")
    conds = {c["type"]: c for c in degraded["conditions"]}
    assert conds["Ready"]["lastTransitionTime"] == "T3"
    assert conds["Degraded"]["lastTransitionTime"] == "T3"
    assert conds["Progressing"]["lastTransitionTime"] == "T1"  # unchanged: False before and after


def test_failed_status() -> None:
    s = st.compute_status(owner(), None, [], SETTINGS,
                          failure=st.Failure("SecretNotFound", "spec.hfTokenSecretRef: missing"))
    assert s["phase"] == "Failed" and s["message"] == "spec.hfTokenSecretRef: missing"
    conds = {c["type"]: c for c in s["conditions"]}
    assert conds["Ready"]["status"] == "False" and conds["Ready"]["reason"] == "SecretNotFound"
    assert conds["Degraded"]["status"] == "True"


def test_status_patch_drops_fields_that_went_away() -> None:
    old = st.compute_status(owner(ingress={"enabled": True, "host": "a.io"}), deployment(), [],
                            SETTINGS)
    new = st.compute_status(owner(), deployment(), [], SETTINGS)
    assert st.status_changed(old, new)
    patch = st.status_patch(old, new)
    assert patch["externalURL"] is None and patch["phase"] == "Ready"


def test_status_patch_drops_nested_fields_that_went_away() -> None:
    old = {"phase": "Ready", "autoscaling": {"desiredReplicas": 1, "message": "scaled up", "load": 2.0}}
    new = {"phase": "Ready", "autoscaling": {"desiredReplicas": 1, "load": 2.0}}
    patch = st.status_patch(old, new)
    assert patch == {"phase": "Ready", "autoscaling": {"desiredReplicas": 1, "load": 2.0, "message": None}}


def test_observed_generation_is_the_applied_one_until_the_new_spec_is_applied() -> None:
    ready = deployment(replicas=2)
    # Generation 2 is in the object, but only generation 1's children are applied.
    pending = st.compute_status(owner(), ready, [], SETTINGS, applied_generation=1)
    assert pending["observedGeneration"] == 1
    assert pending["phase"] == "Progressing"
    assert "generation 2" in pending["message"]
    assert {c["observedGeneration"] for c in pending["conditions"]} == {1}
    # Applied: the status is about generation 2 (None: the reconcile itself, which applied it).
    for applied in (2, None):
        done = st.compute_status(owner(), ready, [], SETTINGS, applied_generation=applied)
        assert (done["observedGeneration"], done["phase"]) == (2, "Ready")
    # A refused apply (a 403, retried) of generation 2: Degraded, still about generation 1's
    # children, so Ready (the old replicas serve) is not claimed for generation 2.
    refused = st.Failure("Forbidden", "the API server refused applying PersistentVolumeClaim llm-cache: quota",
                         phase="Degraded")
    degraded = st.compute_status(owner(), ready, [], SETTINGS, refused, applied_generation=1)
    assert (degraded["observedGeneration"], degraded["phase"]) == (1, "Degraded")
    assert degraded["message"].startswith(refused.message) and "generation 2 is not applied" in degraded["message"]
    conds = {c["type"]: c for c in degraded["conditions"]}
    assert conds["Ready"]["status"] == "True" and conds["Degraded"]["reason"] == "Forbidden"
    assert {c["observedGeneration"] for c in degraded["conditions"]} == {1}
    # A Failed verdict is about the current spec.
    failed = st.compute_status(owner(), ready, [], SETTINGS, st.Failure("SecretNotFound", "x"),
                               applied_generation=1)
    assert (failed["observedGeneration"], failed["phase"]) == (2, "Failed")
