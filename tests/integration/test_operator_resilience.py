"""The operator killed mid-reconcile and restarted; two operator processes (kopf peering); restarted with
another setting (a published gateway)."""

from __future__ import annotations

import pytest

from fixtures_operator import (
    Kubectl,
    OperatorProcess,
    mep,
    operator_writes,
    wait_phase,
)
from waiting import wait_for

SELECTOR = "app.kubernetes.io/managed-by=modelendpoint-operator"


def _logged(op: OperatorProcess, text: str, since: int = 0) -> bool:
    """Whether ``op`` logged a message containing ``text`` after its first ``since`` lines."""
    return any(text in str(line.get("message")) for line in op.log_lines()[since:])


def _paused(op: OperatorProcess) -> bool:
    """Whether ``op``'s latest peering message is a pause (kopf logs one on each change)."""
    for line in reversed(op.log_lines()):
        message = str(line.get("message"))
        if "Pausing operations in favour of" in message:
            return True
        if "Resuming operations" in message:
            return False
    return False


def _handled_by(op: OperatorProcess, name: str, namespace: str) -> bool:
    """Whether ``op`` applied a child of ModelEndpoint ``namespace/name``."""
    return any(str(line.get("message", "")).startswith("applied ")
               and str(line.get("message", "")).endswith(f" of ModelEndpoint {namespace}/{name})")
               for line in op.log_lines())


def _successful_reconciles(op: OperatorProcess) -> float:
    return sum(value for key, value in op.metrics().items()
               if key.startswith("modelendpoint_operator_reconciles_total{") and 'result="ok"' in key)


def test_killed_mid_reconcile_converges_without_duplicates(
    kubectl: Kubectl, namespace: str, operator: OperatorProcess
) -> None:
    # Slow the operator down (one API request at a time) so that a burst is still
    # being reconciled when it is killed.
    operator.stop()
    operator.extra_env["MEP_OPERATOR_MAX_API_REQUESTS"] = "1"
    operator.restart()
    names = [f"burst-{i}" for i in range(24)]
    try:
        kubectl.apply([mep(n, namespace, model=f"m/{n}", gpus=0,
                           ingress={"enabled": True}, allowUnauthenticated=True) for n in names])
        # Kill -9 as soon as the first children appear: the others are mid-flight.
        wait_for(lambda: kubectl.list("deployment", namespace, SELECTOR), timeout=30,
                 interval=0.05, what="the first Deployment")
    finally:
        operator.kill()
        del operator.extra_env["MEP_OPERATOR_MAX_API_REQUESTS"]
    partial = (len(kubectl.list("deployment", namespace, SELECTOR)),
               len(kubectl.list("service", namespace, SELECTOR)),
               len(kubectl.list("ingress", namespace, SELECTOR)))
    operator.restart()

    for n in names:
        wait_phase(kubectl, namespace, n, "Ready", timeout=90)
    # Exactly one of each child per ModelEndpoint: deterministic names, no duplicates.
    for kind in ("deployment", "service", "ingress"):
        items = kubectl.list(kind, namespace, SELECTOR)
        owners = sorted(i["metadata"]["labels"]["serving.modelendpoint.dev/endpoint"] for i in items)
        assert owners == sorted(names), (kind, owners)
    assert len(kubectl.list("replicaset", namespace, SELECTOR)) == len(names)
    # Killed mid-burst: some ModelEndpoints had no or only some children yet.
    assert min(partial) < len(names), partial
    print(f"(Deployments, Services, Ingresses) when killed: {partial} of {len(names)}")

    # A restart of a converged operator (its initial listing reconciles every object) writes nothing.
    before = {n: operator_writes(kubectl, namespace, n) for n in names}
    operator.stop()
    operator.restart()
    wait_for(lambda: _successful_reconciles(operator) >= len(names), timeout=60,
             what=f"{len(names)} successful reconciles after the restart")
    assert {n: operator_writes(kubectl, namespace, n) for n in names} == before


@pytest.fixture
def second_operator(control_plane, mep_crds, operator_logs, operator: OperatorProcess):
    """Another operator process with a higher peering priority than the session's one."""
    op = OperatorProcess(control_plane, operator_logs, "operator-2",
                         priority=operator.priority + 1000)
    try:
        yield op
    finally:
        op.stop()
        # The session operator resumes once the other one has left the peering
        # (the test may have stopped it already, and the resume come before).
        wait_for(lambda: not _paused(operator), timeout=60,
                 what="the session operator to log 'Resuming operations'")


def test_two_operators_one_active(kubectl: Kubectl, namespace: str, operator: OperatorProcess,
                                  second_operator: OperatorProcess) -> None:
    mark = len(operator.log_lines())
    second_operator.start()
    wait_for(lambda: _logged(operator, "Pausing operations in favour of", mark), timeout=60,
             what="the lower-priority operator to log 'Pausing operations in favour of'")

    kubectl.apply(mep("solo", namespace, model="m/solo", gpus=0))
    wait_phase(kubectl, namespace, "solo", "Ready", timeout=60)
    assert _handled_by(second_operator, "solo", namespace)
    assert not _handled_by(operator, "solo", namespace)
    assert len(kubectl.list("deployment", namespace, SELECTOR)) == 1

    # When the active one stops, the other takes over.
    second_operator.stop()
    wait_for(lambda: _logged(operator, "Resuming operations", mark), timeout=60,
             what="the remaining operator to log 'Resuming operations'")
    kubectl.apply(mep("after", namespace, model="m/after", gpus=0))
    wait_phase(kubectl, namespace, "after", "Ready", timeout=60)
    assert _handled_by(operator, "after", namespace)


def test_operator_watching_a_namespace_list_ignores_the_others(
    control_plane, kubectl: Kubectl, namespace: str, operator_logs, operator: OperatorProcess
) -> None:
    other = f"{namespace}-x"
    kubectl("create", "namespace", other)
    scoped = OperatorProcess(control_plane, operator_logs, "operator-scoped", priority=1,
                             extra_env={"MEP_OPERATOR_NAMESPACES": namespace,
                                        "MEP_OPERATOR_STANDALONE": "true"})
    try:
        scoped.start()
        kubectl.apply([mep("inside", namespace, model="m/in", gpus=0),
                       mep("outside", other, model="m/out", gpus=0)])
        # The session operator (cluster-wide) reconciles both; the scoped one only its own.
        wait_phase(kubectl, namespace, "inside", "Ready")
        wait_phase(kubectl, other, "outside", "Ready")
        wait_for(lambda: _handled_by(scoped, "inside", namespace), timeout=30,
                 what="the scoped operator to handle its namespace")
        assert not _handled_by(scoped, "outside", other)
        assert not any((line.get("object") or {}).get("namespace") == other
                       for line in scoped.log_lines())
    finally:
        scoped.stop()
        kubectl("delete", "namespace", other, "--wait=false", check=False)


def _routable(kubectl: Kubectl, namespace: str, name: str) -> dict:
    conds = ((kubectl.get("mep", name, namespace) or {}).get("status") or {}).get("conditions") or []
    return next((c for c in conds if c["type"] == "Routable"), {})


def test_a_published_gateway_marks_a_keyless_endpoint_not_routable_until_it_opts_in(
    kubectl: Kubectl, namespace: str, operator: OperatorProcess
) -> None:
    # The chart sets this when its gateway is reachable from outside the cluster.
    operator.stop()
    operator.extra_env["MEP_OPERATOR_GATEWAY_PUBLIC"] = "true"
    try:
        operator.restart()
        kubectl.apply([mep("keyless", namespace, model="m/keyless", gpus=0),
                       mep("opted-in", namespace, model="m/opted-in", gpus=0, allowUnauthenticated=True)])
        cond = wait_for(lambda: _routable(kubectl, namespace, "keyless").get("reason") == "KeyRequired"
                        and _routable(kubectl, namespace, "keyless"), timeout=60,
                        what="Routable=False (KeyRequired) on the keyless ModelEndpoint")
        assert cond["status"] == "False"
        assert "`m/keyless`" in cond["message"] and "apiKeySecretRef" in cond["message"]
        assert "allowUnauthenticated: true" in cond["message"]
        assert _routable(kubectl, namespace, "opted-in")["status"] == "True"
        # The phase is the model's, not the gateway's: it still comes up.
        wait_phase(kubectl, namespace, "keyless", "Ready")

        kubectl("patch", "mep", "keyless", "-n", namespace, "--type=merge",
                "-p", '{"spec": {"allowUnauthenticated": true}}')
        wait_for(lambda: _routable(kubectl, namespace, "keyless").get("status") == "True", timeout=60,
                 what="Routable=True once the ModelEndpoint opts in")
    finally:
        operator.stop()
        del operator.extra_env["MEP_OPERATOR_GATEWAY_PUBLIC"]
        operator.restart()
