"""The chart's gateway (rendered with helm template, not installed): its Deployment,
Service, Ingress, PDB, ServiceAccount and least-privilege RBAC, in both watch modes.

tests/integration/test_chart_install.py proves the RBAC with the gateway's own token;
the rules here must be exactly the ones the gateway's integration tests bind it to.
"""

from __future__ import annotations

import json

import pytest
from test_chart_render import CHART, NAMESPACE, RELEASE, by_kind, is_gateway, render_all, rules_of

from fixtures_gateway import GATEWAY_RULES
from modelendpoint_gateway.settings import load_settings

NAME = f"{RELEASE}-modelendpoint-operator-gateway"


def gateway(objs: list[dict]) -> list[dict]:
    return [o for o in objs if is_gateway(o)]


@pytest.fixture(scope="module")
def defaults(testbed_bin, tmp_path_factory) -> list[dict]:
    return render_all(testbed_bin, tmp_path_factory.mktemp("gw-defaults"))


@pytest.fixture(scope="module")
def namespaced(testbed_bin, tmp_path_factory) -> list[dict]:
    return render_all(testbed_bin, tmp_path_factory.mktemp("gw-ns"), {
        "watchNamespaces": ["team-a", "team-b"],
        "gateway": {"replicas": 3, "ingress": {"enabled": True, "host": "llm.example.com", "tlsSecretName": "llm-tls",
                                                "className": "nginx", "annotations": {"a": "b"}},
                    "image": {"repository": "reg.example/gw", "tag": "9"}, "holdTimeoutSeconds": 300,
                    "extraEnv": [{"name": "MEP_GATEWAY_REPLICA_HEADER", "value": "true"}]},
    })


def _deployment(objs: list[dict]) -> dict:
    [dep] = [o for o in by_kind(gateway(objs), "Deployment")]
    return dep


def _env(dep: dict) -> dict[str, str | None]:
    [c] = dep["spec"]["template"]["spec"]["containers"]
    return {e["name"]: e.get("value") for e in c["env"]}


def test_defaults_deploy_the_gateway_with_its_own_identity(defaults):
    kinds = sorted(o["kind"] for o in gateway(defaults))
    assert kinds == sorted(["ServiceAccount", "Deployment", "Service", "PodDisruptionBudget", "ClusterRole",
                            "ClusterRoleBinding"])
    dep = _deployment(defaults)
    pod = dep["spec"]["template"]["spec"]
    assert dep["metadata"]["name"] == NAME and dep["spec"]["replicas"] == 2
    assert pod["serviceAccountName"] == NAME and pod["automountServiceAccountToken"] is True
    [c] = pod["containers"]
    assert c["command"] == ["modelendpoint-gateway"]
    assert c["image"] == "ghcr.io/modelendpoint/modelendpoint-operator:0.1.0"  # the operator's image
    assert {p["name"]: p["containerPort"] for p in c["ports"]} == {"http": 8080, "metrics": 9090}
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert c["lifecycle"]["preStop"] == {"sleep": {"seconds": 5}}
    assert pod["terminationGracePeriodSeconds"] == 5 + 60 + 10  # preStop + drain + margin
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert pod["securityContext"]["runAsNonRoot"] is True
    # The pod's name is its name in the held annotation; the namespaces are the operator's.
    [pod_name] = [e for e in c["env"] if e["name"] == "MEP_GATEWAY_POD_NAME"]
    assert pod_name["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    assert _env(dep)["MEP_GATEWAY_NAMESPACES"] == ""


def test_the_rendered_settings_are_accepted_by_the_gateway(defaults, namespaced):
    for objs in (defaults, namespaced):
        env = {k: v for k, v in _env(_deployment(objs)).items() if v is not None}
        settings = load_settings({**env, "MEP_GATEWAY_POD_NAME": "gw-0"})
        assert settings.port == 8080 and settings.metrics_port == 9090
    assert load_settings({**{k: v for k, v in _env(_deployment(namespaced)).items() if v is not None},
                          "MEP_GATEWAY_POD_NAME": "gw-0"}).hold_timeout_seconds == 300


def test_the_schemas_largest_values_reach_the_gateway_as_written(testbed_bin, tmp_path):
    # A values file's numbers are floats to helm; `quote` alone writes 1000000 as "1e+06".
    schema = json.loads((CHART / "values.schema.json").read_text())["properties"]["gateway"]["properties"]
    top = {k: schema[k]["maximum"] for k in ("holdTimeoutSeconds", "maxHeldRequests", "drainTimeoutSeconds")}
    env = {k: v for k, v in _env(_deployment(render_all(testbed_bin, tmp_path, {"gateway": top}))).items()
           if v is not None}
    s = load_settings({**env, "MEP_GATEWAY_POD_NAME": "gw-0"})
    assert (s.hold_timeout_seconds, s.max_held_requests, s.drain_timeout_seconds) == (
        top["holdTimeoutSeconds"], top["maxHeldRequests"], top["drainTimeoutSeconds"])


def test_no_selector_of_the_operator_matches_the_gateways_pods(defaults):
    operator = [o for o in defaults if o["kind"] == "Deployment" and not is_gateway(o)][0]
    selector = operator["spec"]["selector"]["matchLabels"]
    pod_labels = _deployment(defaults)["spec"]["template"]["metadata"]["labels"]
    assert not selector.items() <= pod_labels.items()
    svc = [o for o in gateway(defaults) if o["kind"] == "Service"][0]
    assert svc["spec"]["selector"].items() <= pod_labels.items()
    assert {p["name"]: (p["port"], p["targetPort"]) for p in svc["spec"]["ports"]} == {
        "http": (80, "http"), "metrics": (9090, "metrics")}


def test_rbac_is_exactly_what_the_gateway_is_tested_with(defaults, namespaced):
    want = rules_of({"rules": GATEWAY_RULES})
    [cluster_role] = by_kind(gateway(defaults), "ClusterRole")
    assert rules_of(cluster_role) == want
    [binding] = by_kind(gateway(defaults), "ClusterRoleBinding")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": NAME, "namespace": NAMESPACE}]
    # A namespace list: a Role in each, nothing cluster-wide.
    roles = by_kind(gateway(namespaced), "Role")
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["team-a", "team-b"]
    assert all(rules_of(r) == want for r in roles)
    assert not by_kind(gateway(namespaced), "ClusterRole")
    assert _env(_deployment(namespaced))["MEP_GATEWAY_NAMESPACES"] == "team-a,team-b"


def test_ingress_pdb_image_and_extra_env(namespaced):
    [ing] = by_kind(gateway(namespaced), "Ingress")
    assert ing["spec"]["ingressClassName"] == "nginx" and ing["metadata"]["annotations"] == {"a": "b"}
    assert ing["spec"]["tls"] == [{"hosts": ["llm.example.com"], "secretName": "llm-tls"}]
    [rule] = ing["spec"]["rules"]
    assert rule["host"] == "llm.example.com"
    assert [(p["path"], p["pathType"], p["backend"]["service"]) for p in rule["http"]["paths"]] == [
        (path, "Prefix", {"name": NAME, "port": {"name": "http"}}) for path in ("/openai/v1", "/v1", "/v2")]
    [pdb] = by_kind(gateway(namespaced), "PodDisruptionBudget")
    assert pdb["spec"]["maxUnavailable"] == 1
    dep = _deployment(namespaced)
    assert dep["spec"]["template"]["spec"]["containers"][0]["image"] == "reg.example/gw:9"
    assert _env(dep)["MEP_GATEWAY_REPLICA_HEADER"] == "true"
    assert dep["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"]  # spread over nodes


def test_disabled_renders_no_gateway_object(testbed_bin, tmp_path):
    assert gateway(render_all(testbed_bin, tmp_path, {"gateway": {"enabled": False}})) == []
    one = render_all(testbed_bin, tmp_path, {"gateway": {"replicas": 1}})
    assert not by_kind(gateway(one), "PodDisruptionBudget")


def test_a_published_gateway_serves_keyless_models_only_when_they_opt_in(defaults, namespaced, testbed_bin,
                                                                         tmp_path):
    # The API server asks allowUnauthenticated of a keyless ModelEndpoint's own Ingress; the
    # gateway asks the same of the models it publishes (gateway.md, Keys).
    # The operator is told the same, for the Routable condition of the models it withholds.
    def public(objs: list[dict]) -> tuple[str | None, str | None]:
        [operator] = [o for o in by_kind(objs, "Deployment") if not is_gateway(o)]
        return _env(_deployment(objs))["MEP_GATEWAY_PUBLIC"], _env(operator)["MEP_OPERATOR_GATEWAY_PUBLIC"]

    assert public(defaults) == ("false", "false")
    assert public(namespaced) == ("true", "true")  # gateway.ingress.enabled
    for kind in ("LoadBalancer", "NodePort"):
        (tmp_path / kind).mkdir()
        objs = render_all(testbed_bin, tmp_path / kind, {"gateway": {"service": {"type": kind}}})
        assert public(objs) == ("true", "true"), kind
    (tmp_path / "off").mkdir()
    off = render_all(testbed_bin, tmp_path / "off", {"gateway": {"enabled": False, "ingress": {"enabled": True}}})
    [operator] = by_kind(off, "Deployment")
    assert _env(operator)["MEP_OPERATOR_GATEWAY_PUBLIC"] == "false"  # no gateway, nothing withheld
