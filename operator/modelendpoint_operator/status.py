"""ModelEndpoint status from its Deployment and pods (pure; no I/O).

Phases:
- Failed: the spec was accepted but cannot work (a missing Secret, a child the
  API server rejects, a name taken by an object the operator doesn't own).
  Stays until the spec (or an annotation) changes, or the operator restarts.
- Pending: no Deployment yet, or scaled to zero replicas.
- Progressing: the Deployment is rolling out (new pods starting, the model loading).
- Ready: every desired replica is updated and available.
- Degraded: some replicas are not available and something says why: the
  scheduler cannot place a pod (e.g. not enough GPUs), an image cannot be
  pulled, a container crash-loops, the rollout exceeded its deadline, or
  replicas went missing after a finished rollout.
"""

from __future__ import annotations

import datetime
import re
from dataclasses import dataclass
from typing import Any, Literal

from . import manifests
from .settings import OperatorSettings
from .spec import PHASES, Endpoint

__all__ = ["PHASES", "Assessment", "Condition", "Failure", "assess", "compute_status", "status_changed",
           "status_patch"]
_BAD_WAITING = {
    "ImagePullBackOff", "ErrImagePull", "InvalidImageName", "CrashLoopBackOff",
    "CreateContainerConfigError", "CreateContainerError", "RunContainerError",
}


@dataclass(frozen=True)
class Failure:
    """A problem applying the spec. Phase Failed: permanent (until the spec changes);
    phase Degraded: retried with backoff (a 403 from a quota or an admission webhook)."""

    reason: str
    message: str
    phase: Literal["Failed", "Degraded"] = "Failed"


@dataclass(frozen=True)
class Assessment:
    phase: str
    reason: str
    message: str
    ready: bool


def _cond(obj: dict[str, Any] | None, ctype: str) -> dict[str, Any] | None:
    for cond in ((obj or {}).get("status") or {}).get("conditions") or []:
        if cond.get("type") == ctype:
            return cond
    return None


_FIT_ERROR = re.compile(r"^0/\d+ nodes are available:")


def scheduler_reason(message: str) -> str:
    """The part of a kube-scheduler "Unschedulable" message that says why.

    The scheduler writes ``0/N nodes are available: <why>.`` and then the outcome of
    its PostFilter step (preemption): ``preemption: ...`` or, for a pod rejected
    before filtering (an unbound PVC, say), a bare ``not found``. That tail says
    nothing about the pod, so it is dropped; other messages pass through unchanged.
    """
    message = message.strip()
    if _FIT_ERROR.match(message) and ". " in message:
        return message[: message.index(". ") + 1]
    return message


def _pod_problem(pods: list[dict[str, Any]], ep: Endpoint) -> tuple[str, str] | None:
    """(reason, message) of the first pod that the scheduler or kubelet reports stuck."""
    for pod in sorted(pods, key=lambda p: p.get("metadata", {}).get("name", "")):
        if (pod.get("metadata") or {}).get("deletionTimestamp"):
            continue
        sched = _cond(pod, "PodScheduled")
        if sched and sched.get("status") == "False" and sched.get("reason") == "Unschedulable":
            msg = scheduler_reason(sched.get("message") or "") or "the scheduler cannot place the pod"
            gpu = ep.spec.gpu_resource_name
            if f"Insufficient {gpu}" in msg:
                hint = (f"not enough GPUs: no node has {ep.spec.gpus} free {gpu} (GPUs per replica); "
                        "lower gpus or add GPU nodes. ")
            else:
                hint = ""
            return "Unschedulable", f"{hint}pod {pod['metadata']['name']} is unschedulable: {msg}"
        statuses = ((pod.get("status") or {}).get("containerStatuses") or []) + (
            (pod.get("status") or {}).get("initContainerStatuses") or [])
        for cs in statuses:
            waiting = (cs.get("state") or {}).get("waiting") or {}
            if waiting.get("reason") in _BAD_WAITING:
                msg = waiting.get("message") or waiting["reason"]
                return waiting["reason"], f"pod {pod['metadata']['name']}: {waiting['reason']}: {msg}"
    return None


def assess(
    ep: Endpoint,
    deployment: dict[str, Any] | None,
    pods: list[dict[str, Any]],
    failure: Failure | None = None,
    desired: int | None = None,
) -> Assessment:
    """The phase, from the Deployment and its pods. ``desired``: the replicas the
    Deployment should have (the autoscaler's count), default spec.replicas."""
    desired = ep.spec.replicas if desired is None else desired
    if failure is not None and failure.phase == "Failed":
        return Assessment("Failed", failure.reason, failure.message, False)
    found = _assess_children(ep, deployment, pods, desired)
    if failure is not None:  # Degraded: the children that exist may still serve
        return Assessment(failure.phase, failure.reason, failure.message, found.ready)
    return found


def _assess_children(ep: Endpoint, deployment: dict[str, Any] | None, pods: list[dict[str, Any]],
                     desired: int) -> Assessment:
    if deployment is None:
        return Assessment("Pending", "Creating", "creating the Deployment", False)
    st = deployment.get("status") or {}
    available = int(st.get("availableReplicas") or 0)
    updated = int(st.get("updatedReplicas") or 0)
    current = int(st.get("replicas") or 0)
    observed = int(st.get("observedGeneration") or 0)
    generation = int((deployment.get("metadata") or {}).get("generation") or 0)
    if desired == 0:
        if current == 0:
            return Assessment("Pending", "ScaledToZero", "scaled to zero replicas", False)
        return Assessment("Progressing", "ScalingDown", f"scaling down to zero ({current} left)", False)

    progressing = _cond(deployment, "Progressing")
    rollout_done = (
        observed >= generation
        and progressing is not None
        and progressing.get("reason") == "NewReplicaSetAvailable"
        and updated >= desired
        and current == updated
    )
    if rollout_done and available >= desired:
        return Assessment("Ready", "AllReplicasAvailable",
                          f"{available}/{desired} replicas available", True)
    serving = available >= desired
    problem = _pod_problem(pods, ep)
    if problem is None and progressing is not None and progressing.get("status") == "False":
        problem = (progressing.get("reason") or "RolloutStuck", progressing.get("message") or "")
    failure_cond = _cond(deployment, "ReplicaFailure")
    if problem is None and failure_cond is not None and failure_cond.get("status") == "True":
        problem = (failure_cond.get("reason") or "ReplicaFailure", failure_cond.get("message") or "")
    if problem is not None:
        reason, message = problem
        return Assessment("Degraded", reason, f"{available}/{desired} replicas available; {message}",
                          serving)
    if not rollout_done:
        return Assessment(
            "Progressing", "RollingOut",
            f"rolling out: {updated}/{desired} updated, {available}/{desired} available", serving,
        )
    return Assessment("Degraded", "ReplicasUnavailable",
                      f"{available}/{desired} replicas available", serving)


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _condition(previous: list[dict[str, Any]], ctype: str, status: bool, reason: str,
               message: str, generation: int, now: str) -> dict[str, Any]:
    value = "True" if status else "False"
    old = next((x for x in previous if x.get("type") == ctype), None)
    since = old["lastTransitionTime"] if old and old.get("status") == value and old.get(
        "lastTransitionTime") else now
    return {
        "type": ctype,
        "status": value,
        "reason": reason,
        "message": message,
        "lastTransitionTime": since,
        "observedGeneration": generation,
    }


@dataclass(frozen=True)
class Condition:
    """A condition beside Ready/Progressing/Degraded (e.g. Routable), decided elsewhere."""

    type: str
    status: bool
    reason: str
    message: str = ""


def compute_status(
    ep: Endpoint,
    deployment: dict[str, Any] | None,
    pods: list[dict[str, Any]],
    settings: OperatorSettings,
    failure: Failure | None = None,
    now: str | None = None,
    applied_generation: int | None = None,
    desired: int | None = None,
    previous: dict[str, Any] | None = None,
    extra: tuple[Condition, ...] = (),
    autoscaling: dict[str, Any] | None = None,
    adapters: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """The whole ``status`` of ``ep``; lastTransitionTime moves only when a condition flips.

    ``previous``: the freshest status known (default ``ep.status``), for the conditions'
    transition times. ``desired``: the replicas the Deployment should have (the
    autoscaler's count; default spec.replicas). ``applied_generation``: the spec
    generation whose children were last applied successfully (None: the current one, as
    after a successful reconcile). Until the current generation is applied, the status
    says Progressing (or Degraded, when applying it was refused) and reports that older
    generation as ``observedGeneration``: clients waiting for ``observedGeneration ==
    metadata.generation`` must not see a Ready computed from children of an older spec.
    A Failed verdict is about the current generation.
    """
    now = now or _now()
    current = ep.generation
    failed = failure is not None and failure.phase == "Failed"
    generation = current if applied_generation is None or failed else min(int(applied_generation), current)
    previous = ep.status if previous is None else previous
    old_conditions = previous.get("conditions") or []
    desired = ep.spec.replicas if desired is None else desired
    a = assess(ep, deployment, pods, failure, desired)
    if generation < current:
        children_at = f"(children are at generation {generation})"
        if failure is None:
            # The new spec's children are not applied yet (its reconcile is running or retrying).
            a = Assessment("Progressing", "Reconciling", f"applying generation {current} {children_at}", a.ready)
        else:
            # Refused (a 403, retried): the older generation's replicas may well serve on.
            a = Assessment(a.phase, a.reason, f"{a.message}; generation {current} is not applied {children_at}",
                           a.ready)
    st = (deployment or {}).get("status") or {}
    ready_replicas = int(st.get("readyReplicas") or 0)
    url, external = manifests.urls(ep, settings)
    progressing = a.phase == "Progressing"
    degraded = a.phase in ("Degraded", "Failed")
    conditions = [
        _condition(old_conditions, "Ready", a.ready, a.reason if not a.ready or a.phase == "Ready"
                   else "AllReplicasAvailable", a.message, generation, now),
        _condition(old_conditions, "Progressing", progressing,
                   a.reason if progressing else "Idle" if not degraded else a.reason,
                   a.message if progressing else "", generation, now),
        _condition(old_conditions, "Degraded", degraded, a.reason if degraded else "AsExpected",
                   a.message if degraded else "", generation, now),
    ]
    conditions += [_condition(old_conditions, x.type, x.status, x.reason, x.message, generation, now)
                   for x in extra]
    status: dict[str, Any] = {
        "phase": a.phase,
        "message": a.message,
        "replicas": int(st.get("replicas") or 0),
        "readyReplicas": ready_replicas,
        "availableReplicas": int(st.get("availableReplicas") or 0),
        "updatedReplicas": int(st.get("updatedReplicas") or 0),
        "ready": f"{ready_replicas}/{desired}",
        "selector": manifests.selector_string(ep.name),
        "url": url,
        "observedGeneration": generation,
        "servedModelName": ep.spec.served_name,
        "conditions": conditions,
    }
    if external:
        status["externalURL"] = external
    if autoscaling is not None:
        status["autoscaling"] = autoscaling
    if adapters is not None:
        status["adapters"] = adapters
    return status


def status_changed(old: dict[str, Any] | None, new: dict[str, Any]) -> bool:
    """True when writing ``new`` would change anything (removals of optional fields included)."""
    old = dict(old or {})
    return any(old.get(k) != v for k, v in new.items()) or any(k not in new for k in old)


def status_patch(old: dict[str, Any] | None, new: dict[str, Any]) -> dict[str, Any]:
    """A merge patch turning ``old`` into ``new`` (null for fields to drop, at any depth: a merge
    patch merges nested objects, so a key gone from ``status.autoscaling`` must be nulled too, or it
    stays, and the status never equals what the operator computes)."""
    patch = dict(new)
    for key, was in (old or {}).items():
        if key not in new:
            patch[key] = None
        elif isinstance(was, dict) and isinstance(new[key], dict):
            patch[key] = status_patch(was, new[key])
    return patch
