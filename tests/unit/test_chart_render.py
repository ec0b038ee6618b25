"""The Helm chart rendered by the real helm binary: `helm lint`, and `helm template`
with default and non-default values, checked by assertions on the parsed objects.

The rendered operator environment is also fed to the operator's own settings
loader, so a chart that sets a variable the operator doesn't know (or a value it
rejects) fails here, not in a cluster.
"""

from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path

import pytest
import yaml

from modelendpoint_operator import settings as operator_settings

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "modelendpoint-operator"
RELEASE, NAMESPACE = "mep", "mep-system"
FULLNAME = "mep-modelendpoint-operator"


def helm(testbed_bin: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(testbed_bin / "helm"), *args], capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin", "HOME": tempfile.gettempdir()})
    if check and proc.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} failed:\n{proc.stderr}")
    return proc


def render_all(testbed_bin: Path, tmp_path: Path, values: dict | None = None) -> list[dict]:
    args = ["template", RELEASE, str(CHART), "--namespace", NAMESPACE]
    if values is not None:
        path = tmp_path / "values.yaml"
        path.write_text(yaml.safe_dump(values))
        args += ["--values", str(path)]
    out = helm(testbed_bin, *args).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


def is_gateway(obj: dict) -> bool:
    return (obj.get("metadata", {}).get("labels") or {}).get("app.kubernetes.io/name") == "modelendpoint-gateway"


def render(testbed_bin: Path, tmp_path: Path, values: dict | None = None) -> list[dict]:
    """The operator's objects (tests/unit/test_chart_gateway.py tests the gateway's)."""
    return [o for o in render_all(testbed_bin, tmp_path, values) if not is_gateway(o)]


def by_kind(objs: list[dict], kind: str) -> list[dict]:
    return [o for o in objs if o["kind"] == kind]


def one(objs: list[dict], kind: str) -> dict:
    found = by_kind(objs, kind)
    assert len(found) == 1, f"expected one {kind}, got {[o['metadata']['name'] for o in found]}"
    return found[0]


def container(objs: list[dict]) -> dict:
    [c] = one(objs, "Deployment")["spec"]["template"]["spec"]["containers"]
    return c


def env_of(objs: list[dict]) -> dict[str, str]:
    """The container's literal env values (valueFrom entries map to None)."""
    return {e["name"]: e.get("value") for e in container(objs)["env"]}


def rules_of(role: dict) -> dict[tuple[str, str], set[str]]:
    out: dict[tuple[str, str], set[str]] = {}
    for rule in role["rules"]:
        for group in rule["apiGroups"]:
            for res in rule["resources"]:
                out.setdefault((group, res), set()).update(rule["verbs"])
    return out


NON_DEFAULT = {
    "image": {"repository": "registry.example/mep/operator", "tag": "1.2.3", "pullPolicy": "Always"},
    "imagePullSecrets": [{"name": "regcred"}],
    "replicas": 3,
    "watchNamespaces": ["team-a", "team-b"],
    "defaultRuntimeImage": "registry.example/mep/runtime:9.9",
    "defaultIngressClass": "nginx",
    "defaultImagePullPolicy": "Always",
    "clusterDomain": "corp.local",
    "logLevel": "DEBUG",
    "logFormat": "plain",
    "peering": {"name": "my-peering"},
    "healthPort": 8181,
    "metrics": {"port": 9191, "service": {"port": 9292, "annotations": {"example.com/scrape": "true"}},
                "serviceMonitor": {"enabled": True, "interval": "15s", "labels": {"release": "prom"}}},
    "podDisruptionBudget": {"minAvailable": 2},
    "serviceAccount": {"name": "mep-sa", "annotations": {"iam.example/role": "r"}},
    "podAnnotations": {"example.com/note": "abc"},
    "podLabels": {"team": "ml"},
    "priorityClassName": "system-cluster-critical",
    "resources": {"requests": {"cpu": "50m", "memory": "64Mi"}, "limits": {"memory": "1Gi"}},
    "nodeSelector": {"pool": "system"},
    "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "system", "effect": "NoSchedule"}],
    "extraEnv": [{"name": "MEP_OPERATOR_BIND_ADDRESS", "value": "0.0.0.0"},
                 {"name": "FROM_SECRET", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}}],
}


@pytest.fixture(scope="module")
def defaults(testbed_bin, tmp_path_factory) -> list[dict]:
    return render(testbed_bin, tmp_path_factory.mktemp("defaults"))


@pytest.fixture(scope="module")
def custom(testbed_bin, tmp_path_factory) -> list[dict]:
    return render(testbed_bin, tmp_path_factory.mktemp("custom"), NON_DEFAULT)


def test_helm_lint_passes_strictly(testbed_bin, tmp_path):
    result = helm(testbed_bin, "lint", "--strict", str(CHART), "--namespace", NAMESPACE)
    assert "1 chart(s) linted, 0 chart(s) failed" in result.stdout
    values = tmp_path / "nondefault.yaml"
    values.write_text(yaml.safe_dump(NON_DEFAULT))
    result = helm(testbed_bin, "lint", "--strict", str(CHART), "--values", str(values))
    assert "1 chart(s) linted, 0 chart(s) failed" in result.stdout


def test_defaults_watch_all_namespaces_with_a_cluster_role(defaults):
    assert len(by_kind(defaults, "CustomResourceDefinition")) == 1  # tests/unit/test_chart_crds.py
    kinds = sorted(o["kind"] for o in defaults if o["kind"] != "CustomResourceDefinition")
    assert kinds == sorted(["ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Service",
                            "Deployment", "ClusterKopfPeering"])
    role, binding = one(defaults, "ClusterRole"), one(defaults, "ClusterRoleBinding")
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                                  "name": role["metadata"]["name"]}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": FULLNAME, "namespace": NAMESPACE}]
    assert one(defaults, "ServiceAccount")["metadata"]["name"] == FULLNAME
    rules = rules_of(role)
    assert ("kopf.dev", "clusterkopfpeerings") in rules
    assert ("apiextensions.k8s.io", "customresourcedefinitions") in rules
    assert env_of(defaults)["MEP_OPERATOR_NAMESPACES"] == ""
    assert one(defaults, "Deployment")["spec"]["replicas"] == 1


def test_rbac_is_least_privilege(defaults):
    rules = rules_of(one(defaults, "ClusterRole"))
    # Secrets: read by name only (never list/watch: that would expose every Secret's value).
    assert rules[("", "secrets")] == {"get"}
    assert rules[("", "pods")] == {"list", "watch"}
    assert rules[("", "events")] == {"create"}
    # No patch: the operator has no change handlers, so kopf writes nothing on them.
    assert rules[("serving.modelendpoint.dev", "modelendpoints")] == {"list", "watch"}
    assert rules[("serving.modelendpoint.dev", "modelendpoints/status")] == {"patch"}
    # Server-side apply needs patch, plus create when the child does not exist yet.
    for child in [("apps", "deployments"), ("", "services"), ("", "persistentvolumeclaims"),
                  ("", "configmaps"), ("networking.k8s.io", "ingresses")]:
        assert rules[child] == {"get", "list", "watch", "create", "patch", "delete"}, child
    # get: the operator's reconcile queue and autoscaler follow kopf's peering verdict.
    assert rules[("kopf.dev", "clusterkopfpeerings")] == {"get", "list", "watch", "patch"}
    for rule in one(defaults, "ClusterRole")["rules"]:
        assert "*" not in rule["verbs"] + rule["resources"] + rule["apiGroups"], rule
        assert not {"escalate", "bind", "impersonate", "deletecollection"} & set(rule["verbs"]), rule
    # update (a full replace) only where nothing else does: ownerReferences' blockOwnerDeletion.
    assert [k for k, verbs in rules.items() if "update" in verbs] == [
        ("serving.modelendpoint.dev", "modelendpoints/finalizers")]
    granted = set(rules)
    assert granted == {
        ("serving.modelendpoint.dev", "modelendpoints"),
        ("serving.modelendpoint.dev", "modelendpoints/status"),
        ("serving.modelendpoint.dev", "modelendpoints/finalizers"),
        ("apps", "deployments"), ("", "services"), ("", "persistentvolumeclaims"), ("", "configmaps"),
        ("networking.k8s.io", "ingresses"), ("", "secrets"), ("", "pods"), ("", "events"),
        ("apiextensions.k8s.io", "customresourcedefinitions"), ("kopf.dev", "clusterkopfpeerings"),
    }


def test_namespace_list_gets_roles_per_namespace_and_a_small_cluster_role(custom):
    roles, bindings = by_kind(custom, "Role"), by_kind(custom, "RoleBinding")
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["team-a", "team-b"]
    assert sorted(b["metadata"]["namespace"] for b in bindings) == ["team-a", "team-b"]
    for binding in bindings:
        assert binding["roleRef"]["kind"] == "Role"
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "mep-sa",
                                        "namespace": NAMESPACE}]
    for role in roles:
        rules = rules_of(role)
        assert rules[("", "secrets")] == {"get"}
        assert rules[("kopf.dev", "kopfpeerings")] == {"get", "list", "watch", "patch"}
        assert ("kopf.dev", "clusterkopfpeerings") not in rules
    # The cluster-scoped part grants reads of cluster-scoped kinds only: nothing namespaced.
    cluster_role = one(custom, "ClusterRole")
    assert set(rules_of(cluster_role)) == {("apiextensions.k8s.io", "customresourcedefinitions"),
                                           ("", "namespaces")}
    assert all(set(r["verbs"]) <= {"list", "watch"} for r in cluster_role["rules"])
    assert one(custom, "ClusterRoleBinding")["roleRef"]["name"] == cluster_role["metadata"]["name"]
    peerings = by_kind(custom, "KopfPeering")
    assert sorted((p["metadata"]["namespace"], p["metadata"]["name"]) for p in peerings) == [
        ("team-a", "my-peering"), ("team-b", "my-peering")]
    assert not by_kind(custom, "ClusterKopfPeering")
    assert env_of(custom)["MEP_OPERATOR_NAMESPACES"] == "team-a,team-b"


def test_pod_security(defaults):
    pod = one(defaults, "Deployment")["spec"]["template"]["spec"]
    psc = pod["securityContext"]
    assert psc["runAsNonRoot"] is True and psc["runAsUser"] != 0
    assert psc["seccompProfile"] == {"type": "RuntimeDefault"}
    sc = container(defaults)["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["runAsNonRoot"] is True
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
    # The root filesystem is read-only: /tmp is a writable emptyDir.
    [mount] = [m for m in container(defaults)["volumeMounts"] if m["mountPath"] == "/tmp"]
    [volume] = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    assert "emptyDir" in volume
    assert pod["serviceAccountName"] == FULLNAME
    # Service links would inject <SVC>_* variables; with a Service named mep-operator-*,
    # MEP_OPERATOR_* ones the operator rejects as unknown settings.
    assert pod["enableServiceLinks"] is False


def test_probes_hit_the_liveness_endpoint_the_operator_serves(defaults, custom):
    for objs, port in ((defaults, 8080), (custom, 8181)):
        c = container(objs)
        assert env_of(objs)["MEP_OPERATOR_LIVENESS_PORT"] == str(port)
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        assert ports["healthz"] == port
        for probe in ("livenessProbe", "readinessProbe"):
            assert c[probe]["httpGet"] == {"path": "/healthz", "port": "healthz"}


def test_default_env_is_accepted_by_the_operator_settings(defaults):
    env = env_of(defaults)
    assert env.pop("POD_ID") is None  # from the downward API: kopf's peering identity
    s = operator_settings.load_settings(env)
    assert s.clusterwide
    assert s.peering_name == one(defaults, "ClusterKopfPeering")["metadata"]["name"] == FULLNAME
    assert s.peering_create is False  # the chart creates the peering object
    assert s.log_level == "info" and s.log_format == "json"
    assert s.metrics_port == 9090
    # Unset in the chart: the operator's own defaults apply (no second copy to drift).
    assert "MEP_OPERATOR_DEFAULT_RUNTIME_IMAGE" not in env
    assert "MEP_OPERATOR_DEFAULT_INGRESS_CLASS" not in env
    assert "MEP_OPERATOR_PEERING_PRIORITY" not in env
    assert s.default_runtime_image == operator_settings.DEFAULT_RUNTIME_IMAGE
    assert s.default_ingress_class is None


def test_non_default_values_reach_the_operator(custom):
    env = env_of(custom)
    env.pop("POD_ID")
    assert env.pop("FROM_SECRET") is None
    s = operator_settings.load_settings(env)
    assert s.namespace_list == ["team-a", "team-b"]
    assert s.default_runtime_image == "registry.example/mep/runtime:9.9"
    assert s.default_ingress_class == "nginx"
    assert s.default_image_pull_policy == "Always"
    assert s.cluster_domain == "corp.local"
    assert s.log_level == "debug" and s.log_format == "plain"
    assert s.peering_name == "my-peering" and s.peering_priority is None  # random per replica
    assert s.metrics_port == 9191 and s.liveness_port == 8181
    names = [e["name"] for e in container(custom)["env"]]
    assert names[-2:] == ["MEP_OPERATOR_BIND_ADDRESS", "FROM_SECRET"]  # extraEnv last
    [secret_env] = [e for e in container(custom)["env"] if e["name"] == "FROM_SECRET"]
    assert secret_env["valueFrom"] == {"secretKeyRef": {"name": "s", "key": "k"}}


def test_non_default_pod_settings(custom):
    dep = one(custom, "Deployment")
    pod = dep["spec"]["template"]
    assert dep["spec"]["replicas"] == 3
    c = container(custom)
    assert c["image"] == "registry.example/mep/operator:1.2.3"
    assert c["imagePullPolicy"] == "Always"
    assert c["resources"] == NON_DEFAULT["resources"]
    assert pod["spec"]["imagePullSecrets"] == [{"name": "regcred"}]
    assert pod["spec"]["nodeSelector"] == {"pool": "system"}
    assert pod["spec"]["tolerations"] == NON_DEFAULT["tolerations"]
    assert pod["spec"]["priorityClassName"] == "system-cluster-critical"
    assert pod["spec"]["serviceAccountName"] == "mep-sa"
    assert pod["metadata"]["annotations"] == {"example.com/note": "abc"}
    assert pod["metadata"]["labels"]["team"] == "ml"
    # Replicas > 1 and no affinity given: spread over nodes.
    anti = pod["spec"]["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    assert anti[0]["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
    sa = one(custom, "ServiceAccount")
    assert sa["metadata"]["name"] == "mep-sa"
    assert sa["metadata"]["annotations"] == {"iam.example/role": "r"}
    # The selector matches the pod labels (and only the stable ones).
    selector = dep["spec"]["selector"]["matchLabels"]
    assert selector.items() <= pod["metadata"]["labels"].items()
    assert set(selector) == {"app.kubernetes.io/name", "app.kubernetes.io/instance"}


def test_default_image_tag_is_the_app_version(defaults):
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert container(defaults)["image"].endswith(":" + chart["appVersion"])


def test_pdb_only_with_more_than_one_replica(testbed_bin, tmp_path, defaults, custom):
    assert not by_kind(defaults, "PodDisruptionBudget")
    assert not by_kind(render(testbed_bin, tmp_path, {"replicas": 0}), "PodDisruptionBudget")
    pdb = one(custom, "PodDisruptionBudget")
    assert pdb["spec"]["minAvailable"] == 2
    assert pdb["spec"]["selector"] == one(custom, "Deployment")["spec"]["selector"]
    two = render(testbed_bin, tmp_path, {"replicas": 2})
    assert one(two, "PodDisruptionBudget")["spec"]["minAvailable"] == 1
    percent = render(testbed_bin, tmp_path, {"replicas": 2, "podDisruptionBudget": {"minAvailable": "50%"}})
    assert one(percent, "PodDisruptionBudget")["spec"]["minAvailable"] == "50%"
    # A budget that could never allow an eviction is refused.
    path = tmp_path / "pdb.yaml"
    path.write_text(yaml.safe_dump({"replicas": 2, "podDisruptionBudget": {"minAvailable": 2}}))
    result = helm(testbed_bin, "template", RELEASE, str(CHART), "--values", str(path), check=False)
    assert result.returncode != 0
    assert "podDisruptionBudget.minAvailable (2) must be less than replicas (2)" in result.stderr


def test_metrics_service_and_service_monitor_gating(testbed_bin, tmp_path, defaults, custom):
    svc = one(defaults, "Service")
    assert svc["metadata"]["name"] == f"{FULLNAME}-metrics"
    assert svc["spec"]["ports"] == [{"name": "metrics", "port": 9090, "targetPort": "metrics",
                                     "protocol": "TCP"}]
    assert svc["spec"]["selector"] == one(defaults, "Deployment")["spec"]["selector"]["matchLabels"]
    assert not by_kind(defaults, "ServiceMonitor")

    sm = one(custom, "ServiceMonitor")
    assert sm["metadata"]["labels"]["release"] == "prom"
    assert sm["spec"]["endpoints"][0]["port"] == "metrics"
    assert sm["spec"]["endpoints"][0]["interval"] == "15s"
    assert sm["spec"]["selector"]["matchLabels"].items() <= one(custom, "Service")["metadata"]["labels"].items()
    assert one(custom, "Service")["spec"]["ports"][0]["port"] == 9292

    off = render(testbed_bin, tmp_path, {"metrics": {"enabled": False}})
    assert not by_kind(off, "Service")
    assert env_of(off)["MEP_OPERATOR_METRICS_PORT"] == "0"
    assert "metrics" not in {p["name"] for p in container(off)["ports"]}

    no_svc = render(testbed_bin, tmp_path, {"metrics": {"service": {"enabled": False}}})
    assert not by_kind(no_svc, "Service")
    assert env_of(no_svc)["MEP_OPERATOR_METRICS_PORT"] == "9090"

    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"metrics": {"enabled": False, "serviceMonitor": {"enabled": True}}}))
    result = helm(testbed_bin, "template", RELEASE, str(CHART), "--values", str(path), check=False)
    assert result.returncode != 0
    assert "metrics.serviceMonitor.enabled needs metrics.enabled" in result.stderr


def test_existing_service_account(testbed_bin, tmp_path):
    objs = render(testbed_bin, tmp_path, {"serviceAccount": {"create": False, "name": "existing"}})
    assert not by_kind(objs, "ServiceAccount")
    assert one(objs, "ClusterRoleBinding")["subjects"][0]["name"] == "existing"
    assert one(objs, "Deployment")["spec"]["template"]["spec"]["serviceAccountName"] == "existing"
    path = tmp_path / "noname.yaml"
    path.write_text(yaml.safe_dump({"serviceAccount": {"create": False}}))
    result = helm(testbed_bin, "template", RELEASE, str(CHART), "--values", str(path), check=False)
    assert result.returncode != 0 and "serviceAccount.name is required" in result.stderr


def test_every_object_is_labelled_and_namespaced_where_it_should_be(defaults, custom):
    cluster_scoped = {"ClusterRole", "ClusterRoleBinding", "ClusterKopfPeering"}
    for obj in defaults + custom:
        if obj["kind"] == "CustomResourceDefinition":
            continue  # the repository's bytes, shared by every release (tests/unit/test_chart_crds.py)
        labels = obj["metadata"]["labels"]
        assert labels["app.kubernetes.io/instance"] == RELEASE
        assert labels["app.kubernetes.io/managed-by"] == "Helm"
        if obj["kind"] in cluster_scoped:
            assert "namespace" not in obj["metadata"]
        elif obj["kind"] not in {"Role", "RoleBinding", "KopfPeering"}:
            assert obj["metadata"]["namespace"] == NAMESPACE, obj["kind"]


def test_rendering_is_deterministic(testbed_bin, tmp_path, custom):
    # No random values or timestamps: `helm upgrade` with unchanged values rolls nothing.
    assert render(testbed_bin, tmp_path, NON_DEFAULT) == custom


def test_pod_user_is_the_image_user(defaults):
    # runAsNonRoot needs a numeric user; the chart's is the one Dockerfile.operator creates.
    import re

    dockerfile = (REPO / "Dockerfile.operator").read_text()
    uid, gid = re.search(r"^USER (\d+):(\d+)$", dockerfile, re.M).groups()
    psc = one(defaults, "Deployment")["spec"]["template"]["spec"]["securityContext"]
    assert (psc["runAsUser"], psc["runAsGroup"]) == (int(uid), int(gid))


def test_fixed_peering_priority_only_with_one_replica(testbed_bin, tmp_path):
    objs = render(testbed_bin, tmp_path, {"peering": {"priority": 7}})
    assert env_of(objs)["MEP_OPERATOR_PEERING_PRIORITY"] == "7"
    # Equal priorities pause every replica (kopf's rule): refused.
    path = tmp_path / "prio.yaml"
    path.write_text(yaml.safe_dump({"replicas": 2, "peering": {"priority": 7}}))
    result = helm(testbed_bin, "template", RELEASE, str(CHART), "--values", str(path), check=False)
    assert result.returncode != 0 and "peering.priority with replicas > 1" in result.stderr
