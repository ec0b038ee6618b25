"""The chart on the real control plane: helm install, the operator running with the
chart ServiceAccount's own token, helm upgrade, helm uninstall, and the samples
checked by the API server.

The in-cluster operator pod lands on a kwok node, which marks it Running without
running anything. So the operator PROCESS runs here, locally, as the console script
``modelendpoint-operator``, with a kubeconfig holding only a token of the chart's
ServiceAccount (TokenRequest API, ``kubectl create token``) and the environment the
chart rendered into the Deployment: whatever it reconciles, the chart's RBAC allowed.
The in-cluster Deployment is scaled to 0 first, so there are never two operators for
the same peering object.

The tests of this module share one release and run in file order: install, RBAC,
samples, operator, upgrade, uninstall.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from localcluster import free_ports
from waiting import wait_for

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "modelendpoint-operator"
OPERATOR = REPO / ".venv" / "bin" / "modelendpoint-operator"
SAMPLES = sorted((REPO / "samples").glob("*.yaml"))

RELEASE = "mepchart"
FULLNAME = f"{RELEASE}-modelendpoint-operator"
SYSTEM_NS = "chart-system"
WATCHED_NS = "chart-team-a"
UNWATCHED_NS = "chart-team-b"
SA = f"system:serviceaccount:{SYSTEM_NS}:{FULLNAME}"
# Set through the chart, so a child with this image was written by THIS operator,
# configured by THIS chart (and not by any other operator on the shared control plane).
RUNTIME_IMAGE = "registry.example/chart-test/runtime:rbac"
VALUES = {
    # Never pulled: kwok plays the kubelet.
    "image": {"repository": "registry.example/chart-test/operator", "tag": "test",
              "pullPolicy": "IfNotPresent"},
    "watchNamespaces": [WATCHED_NS],
    "defaultRuntimeImage": RUNTIME_IMAGE,
    "logFormat": "plain",
}
# The operator's own pods and ReplicaSets: the release's gateway shares its instance label.
OPERATOR_PODS = f"app.kubernetes.io/name=modelendpoint-operator,app.kubernetes.io/instance={RELEASE}"
CHART_KINDS = ("deployments,replicasets,pods,services,serviceaccounts,roles,rolebindings,"
               "poddisruptionbudgets,kopfpeerings")
CLUSTER_KINDS = "clusterroles,clusterrolebindings,clusterkopfpeerings"


@dataclass
class Release:
    cp: object
    env: dict[str, str]
    tmp: Path
    fullname: str = FULLNAME
    namespace: str = SYSTEM_NS

    def helm(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        proc = subprocess.run([str(self.cp.bin_dir / "helm"), *args], env=self.env,
                              capture_output=True, text=True, timeout=300)
        if check and proc.returncode != 0:
            raise AssertionError(f"helm {' '.join(args)} failed:\n{proc.stderr}")
        return proc

    def values_file(self, values: dict, name: str) -> str:
        path = self.tmp / f"{name}.yaml"
        path.write_text(yaml.safe_dump(values))
        return str(path)

    def get(self, *args: str) -> dict:
        return json.loads(self.cp.kubectl("get", *args, "-o", "json"))

    def deployment(self) -> dict:
        return self.get("deployment", self.fullname, "-n", self.namespace)


def _helm_env(cp, tmp: Path) -> dict[str, str]:
    env = cp.env()
    for var in ("HELM_CACHE_HOME", "HELM_CONFIG_HOME", "HELM_DATA_HOME"):
        env[var] = str(tmp / var.lower())
    return env


CRD_NAMES = ("modelendpoints.serving.modelendpoint.dev", "kopfpeerings.kopf.dev", "clusterkopfpeerings.kopf.dev")


def adopt_crds(cp, release: str, namespace: str) -> None:
    """The chart README's adoption of a ModelEndpoint CRD installed without this release
    (by another fixture of the shared cluster, or by chart 0.1.0's crds/ folder)."""
    for crd in CRD_NAMES[:1]:
        if cp.kubectl("get", "crd", crd, "-o", "name", check=False).strip():
            cp.kubectl("annotate", "--overwrite", "crd", crd, f"meta.helm.sh/release-name={release}",
                       f"meta.helm.sh/release-namespace={namespace}")
            cp.kubectl("label", "--overwrite", "crd", crd, "app.kubernetes.io/managed-by=Helm")


@pytest.fixture(scope="module")
def release(control_plane, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("chart")
    rel = Release(control_plane, _helm_env(control_plane, tmp), tmp)
    for ns in (SYSTEM_NS, WATCHED_NS, UNWATCHED_NS):
        control_plane.kubectl("create", "namespace", ns)
    adopt_crds(control_plane, RELEASE, SYSTEM_NS)
    try:
        rel.helm("install", RELEASE, str(CHART), "--namespace", SYSTEM_NS,
                 "--values", rel.values_file(VALUES, "install"), "--wait", "--timeout", "180s")
        yield rel
    finally:
        rel.helm("uninstall", RELEASE, "--namespace", SYSTEM_NS, "--wait", check=False)
        for ns in (SYSTEM_NS, WATCHED_NS, UNWATCHED_NS):
            control_plane.kubectl("delete", "namespace", ns, "--wait=false", check=False)


# --- install ------------------------------------------------------------------------


def test_install_deploys_the_operator_and_its_rbac(release):
    status = json.loads(release.helm("status", RELEASE, "-n", SYSTEM_NS, "-o", "json").stdout)
    assert status["info"]["status"] == "deployed"
    assert f"Watching: {WATCHED_NS} (a Role in each)" in status["info"]["notes"]
    dep = release.deployment()
    assert dep["status"].get("availableReplicas") == 1  # --wait: the (kwok) pod became Ready
    [pod] = release.get("pods", "-n", SYSTEM_NS, "-l",
                        OPERATOR_PODS)["items"]
    assert pod["status"]["phase"] == "Running"
    assert pod["spec"]["serviceAccountName"] == FULLNAME
    # The CRDs: ModelEndpoint's a template of the release, kept on uninstall; kopf's
    # peering CRDs from crds/.
    for crd in CRD_NAMES:
        obj = release.get("crd", crd)
        assert {"type": "Established", "status": "True"}.items() <= {
            c["type"]: c for c in obj["status"]["conditions"]}["Established"].items()
    annotations = release.get("crd", CRD_NAMES[0])["metadata"]["annotations"]
    assert annotations["helm.sh/resource-policy"] == "keep"
    assert annotations["meta.helm.sh/release-name"] == RELEASE
    # A Role where it watches, none where it doesn't.
    assert release.get("role", FULLNAME, "-n", WATCHED_NS)["rules"]
    assert release.cp.kubectl("get", "role", FULLNAME, "-n", UNWATCHED_NS, check=False) == ""
    assert release.get("kopfpeering", FULLNAME, "-n", WATCHED_NS)["metadata"]["name"] == FULLNAME
    assert release.get("clusterrole", f"{FULLNAME}-cluster")["rules"]
    assert release.get("service", f"{FULLNAME}-metrics", "-n", SYSTEM_NS)["spec"]["ports"][0]["port"] == 9090


def test_a_mistyped_value_is_rejected_by_helm_install(release):
    result = release.helm("install", "typo", str(CHART), "--namespace", SYSTEM_NS,
                          "--set", "watchNamespace[0]=x", "--dry-run=server", check=False)
    assert result.returncode != 0
    assert "additional properties 'watchNamespace' not allowed" in result.stderr


# --- RBAC: what the ServiceAccount may and may not do ---------------------------------


def can_i(release: Release, *args: str) -> bool:
    out = subprocess.run([str(release.cp.bin_dir / "kubectl"), "auth", "can-i", *args, f"--as={SA}"],
                         env=release.env, capture_output=True, text=True)
    assert out.stdout.strip() in ("yes", "no"), out.stderr
    return out.stdout.strip() == "yes"


def test_service_account_may_do_its_job_in_the_watched_namespace_only(release):
    ns_a, ns_b = f"-n={WATCHED_NS}", f"-n={UNWATCHED_NS}"
    # What it needs, where it works.
    assert can_i(release, "get", "secrets", ns_a)
    assert can_i(release, "patch", "deployments.apps", ns_a)
    assert can_i(release, "create", "ingresses.networking.k8s.io", ns_a)
    assert can_i(release, "patch", "modelendpoints.serving.modelendpoint.dev", "--subresource=status", ns_a)
    assert can_i(release, "list", "customresourcedefinitions.apiextensions.k8s.io")
    # What it may not do: read Secrets where it doesn't watch, list Secrets at all,
    # touch anything outside its namespaces, write RBAC or CRDs.
    assert not can_i(release, "get", "secrets", ns_b)
    assert not can_i(release, "list", "secrets", ns_a)
    assert not can_i(release, "watch", "secrets", ns_a)
    assert not can_i(release, "patch", "deployments.apps", ns_b)
    assert not can_i(release, "list", "modelendpoints.serving.modelendpoint.dev", "--all-namespaces")
    assert not can_i(release, "create", "roles.rbac.authorization.k8s.io", ns_a)
    assert not can_i(release, "create", "customresourcedefinitions.apiextensions.k8s.io")
    assert not can_i(release, "create", "kopfpeerings.kopf.dev", ns_a)
    assert not can_i(release, "delete", "modelendpoints.serving.modelendpoint.dev", ns_a)


# --- samples ------------------------------------------------------------------------


@pytest.mark.parametrize("sample", SAMPLES, ids=[p.name for p in SAMPLES])
def test_sample_passes_server_side_dry_run(release, sample):
    out = release.cp.kubectl("apply", "--dry-run=server", "--validate=strict", "-n", WATCHED_NS,
                             "-f", str(sample))
    assert "(server dry run)" in out
    # Nothing was created.
    for line in out.splitlines():
        kind_name = line.split()[0]
        assert release.cp.kubectl("get", kind_name, "-n", WATCHED_NS, check=False) == ""


# --- the operator with the ServiceAccount's own token ---------------------------------


def sa_kubeconfig(release: Release, namespace: str, sa_name: str) -> Path:
    token = release.cp.kubectl("create", "token", sa_name, "-n", namespace,
                               "--duration=3600s").strip()
    admin = json.loads(release.cp.kubeconfig.read_text())
    cluster = admin["clusters"][0]["cluster"]
    config = {
        "apiVersion": "v1", "kind": "Config",
        "clusters": [{"name": "testbed", "cluster": cluster}],
        "users": [{"name": sa_name, "user": {"token": token}}],
        "contexts": [{"name": "sa", "context": {"cluster": "testbed", "user": sa_name}}],
        "current-context": "sa",
    }
    path = release.tmp / f"{sa_name}.kubeconfig"
    path.write_text(json.dumps(config))
    path.chmod(0o600)
    return path


class OperatorProcess:
    """The operator console script with the env the chart rendered, and only the SA's token."""

    def __init__(self, release: Release, kubeconfig: Path, identity: str) -> None:
        [container] = release.deployment()["spec"]["template"]["spec"]["containers"]
        # (The API server drops `value: ""`: an entry without value or valueFrom is empty.)
        env = {e["name"]: e.get("value", "") for e in container["env"] if "valueFrom" not in e}
        self.chart_env = dict(env)
        self.liveness_port, metrics_port = free_ports(2)
        env.update({
            "PATH": os.environ["PATH"], "HOME": str(release.tmp), "KUBECONFIG": str(kubeconfig),
            "POD_ID": identity,  # the downward API's job in the pod: kopf's peering identity
            # Free loopback ports instead of the pod's (several processes share this host).
            "MEP_OPERATOR_BIND_ADDRESS": "127.0.0.1",
            "MEP_OPERATOR_LIVENESS_PORT": str(self.liveness_port),
            "MEP_OPERATOR_METRICS_PORT": str(metrics_port),
        })
        self.log_path = release.tmp / f"operator-{identity}.log"
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen([str(OPERATOR)], env=env, stdout=self.log,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     start_new_session=True)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def healthy(self) -> bool:
        assert self.proc.poll() is None, f"the operator exited:\n{self.log_text()[-4000:]}"
        url = f"http://127.0.0.1:{self.liveness_port}/healthz"
        with urllib.request.urlopen(url, timeout=2) as resp:
            return resp.status == 200

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        self.log.close()
        return self.proc.returncode


def endpoint(name: str, namespace: str, **spec) -> dict:
    return {"apiVersion": "serving.modelendpoint.dev/v1alpha1", "kind": "ModelEndpoint",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"model": "Qwen/Qwen2.5-0.5B-Instruct", "gpus": 1, **spec}}


def owned_by(obj: dict, owner: dict) -> bool:
    return any(ref["uid"] == owner["metadata"]["uid"] and ref.get("controller")
               for ref in obj["metadata"].get("ownerReferences", []))


def wait_ready(release: Release, name: str, namespace: str, op: OperatorProcess) -> dict:
    """Wait until the operator has set the ModelEndpoint Ready: its status says so, or the
    Ready Event it posts on the transition exists.

    The Event counts too because a kwok node whose heartbeat is late (a loaded machine;
    the test bed's node-monitor grace period is 20 s) gets its pods marked not ready by
    the node lifecycle controller, and the operator then rightly reports Degraded.
    """
    def ready() -> dict | None:
        obj = release.get("modelendpoint", name, "-n", namespace)
        if obj.get("status", {}).get("phase") == "Ready":
            return obj
        events = release.get("events", "-n", namespace, "--field-selector",
                             f"involvedObject.uid={obj['metadata']['uid']},reason=Ready")["items"]
        if not events:
            return None
        # The Event may have been posted after `obj` was read: read the status it followed.
        obj = release.get("modelendpoint", name, "-n", namespace)
        return obj if obj.get("status") else None

    try:
        return wait_for(ready, timeout=120, what=f"ModelEndpoint {name} to become Ready")
    except TimeoutError as exc:
        state = release.cp.kubectl("get", "modelendpoint,deployment,replicaset,pod", "-n", namespace,
                                   "-o", "yaml", check=False)
        nodes = release.cp.kubectl("get", "nodes", "-o", "wide", check=False)
        raise AssertionError(f"{exc}\n--- objects:\n{state}\n--- nodes:\n{nodes}\n"
                             f"--- operator log:\n{op.log_text()[-6000:]}") from None


def assert_no_permission_errors(op: OperatorProcess) -> None:
    text = op.log_text().lower()
    for needle in ("forbidden", "not enough permissions", " 403"):
        assert needle not in text, f"the operator hit a permission error:\n{op.log_text()[-6000:]}"


def test_operator_reconciles_with_only_the_service_account_token(release):
    cp = release.cp
    # One operator per peering object: the in-cluster replica steps aside.
    cp.kubectl("scale", "deployment", FULLNAME, "-n", SYSTEM_NS, "--replicas=0")
    wait_for(lambda: not release.get("pods", "-n", SYSTEM_NS, "-l",
                                     OPERATOR_PODS)["items"],
             timeout=90, what="the in-cluster operator pod to go")

    kubeconfig = sa_kubeconfig(release, SYSTEM_NS, FULLNAME)
    whoami = subprocess.run([str(cp.bin_dir / "kubectl"), f"--kubeconfig={kubeconfig}", "auth",
                             "whoami", "-o", "json"], capture_output=True, text=True, check=True)
    assert json.loads(whoami.stdout)["status"]["userInfo"]["username"] == SA
    # Its reach ends at the watched namespace: the same Secret, by name, is readable
    # where the operator watches and forbidden where it doesn't. (Listing Secrets is
    # forbidden everywhere, so `get secrets` alone would not show the namespace scoping.)
    for ns in (WATCHED_NS, UNWATCHED_NS):
        cp.kubectl("create", "secret", "generic", "api-keys", "-n", ns, "--from-literal=api-key=k1")

    def get_secret_as_sa(ns: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(cp.bin_dir / "kubectl"), f"--kubeconfig={kubeconfig}", "get",
                               "secret", "api-keys", "-n", ns, "-o", "name"], capture_output=True, text=True)

    allowed = get_secret_as_sa(WATCHED_NS)
    assert allowed.returncode == 0 and allowed.stdout.strip() == "secret/api-keys", allowed.stderr
    denied = get_secret_as_sa(UNWATCHED_NS)
    assert denied.returncode != 0 and "Forbidden" in denied.stderr
    assert f'in the namespace "{UNWATCHED_NS}"' in denied.stderr, denied.stderr
    op = OperatorProcess(release, kubeconfig, identity="chart-rbac-test")
    assert op.chart_env["MEP_OPERATOR_NAMESPACES"] == WATCHED_NS
    assert op.chart_env["MEP_OPERATOR_DEFAULT_RUNTIME_IMAGE"] == RUNTIME_IMAGE
    try:
        wait_for(op.healthy, timeout=60, what="the operator's liveness endpoint")
        served = endpoint("served", WATCHED_NS, apiKeySecretRef={"name": "api-keys", "key": "api-key"},
                          ingress={"enabled": True, "host": "llm.example.com"})
        cached = endpoint("cached", WATCHED_NS, modelCache={"size": "10Gi"})
        cp.kubectl("apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List",
                                                          "items": [served, cached]}))

        owner = wait_ready(release, "served", WATCHED_NS, op)
        status = owner["status"]
        assert status["url"].endswith("/openai/v1")
        assert status["observedGeneration"] == owner["metadata"]["generation"]
        assert status["servedModelName"] == "Qwen/Qwen2.5-0.5B-Instruct"
        assert {c["type"] for c in status["conditions"]} >= {"Ready", "Progressing", "Degraded"}

        dep = release.get("deployment", "served", "-n", WATCHED_NS)
        assert owned_by(dep, owner)
        [container] = dep["spec"]["template"]["spec"]["containers"]
        assert container["image"] == RUNTIME_IMAGE  # this operator, with the chart's settings
        env = {e["name"]: e for e in container["env"]}
        assert "API_KEY" not in env and env["API_KEY_FILE"]["value"] == "/etc/modelendpoint/api-key/keys"
        volumes = {v["name"]: v for v in dep["spec"]["template"]["spec"]["volumes"]}
        assert volumes["api-key"]["secret"]["secretName"] == "api-keys"
        service = release.get("service", "served", "-n", WATCHED_NS)
        assert owned_by(service, owner)
        assert owned_by(release.get("ingress", "served", "-n", WATCHED_NS), owner)

        # Issue 13, item 8: a deleted child is back at once under the chart's identity,
        # with no permission error (the operator reads its index, it GETs nothing).
        cp.kubectl("delete", "service", "served", "-n", WATCHED_NS)
        wait_for(lambda: (svc := release.cp.kubectl("get", "service", "served", "-n", WATCHED_NS, "-o",
                                                    "jsonpath={.metadata.uid}", check=False))
                 and svc != service["metadata"]["uid"], timeout=5, what="the deleted Service to be re-created")

        # The cache PVC the operator creates (it stays unbound: no provisioner here).
        cached_owner = wait_for(
            lambda: (lambda o: o if o.get("status", {}).get("phase") else None)(
                release.get("modelendpoint", "cached", "-n", WATCHED_NS)),
            timeout=60, what="ModelEndpoint cached to get a status")
        pvcs = wait_for(lambda: [p for p in release.get("pvc", "-n", WATCHED_NS)["items"]
                                 if owned_by(p, cached_owner)],
                        timeout=60, what="the model cache PVC")
        assert len(pvcs) == 1

        # Events for the transitions, posted by the operator.
        events = release.get("events", "-n", WATCHED_NS,
                             "--field-selector", "involvedObject.name=served")["items"]
        assert any(e["reason"] == "Ready" for e in events), [e["reason"] for e in events]

        # kopf peering through the chart's KopfPeering: this process keeps alive there.
        peering = release.get("kopfpeering", FULLNAME, "-n", WATCHED_NS)
        assert "chart-rbac-test" in (peering.get("status") or {})

        # A ModelEndpoint in a namespace it doesn't watch is left alone.
        cp.kubectl("apply", "-f", "-", input=json.dumps(endpoint("ignored", UNWATCHED_NS)))
        with pytest.raises(TimeoutError):
            wait_for(lambda: release.get("modelendpoint", "ignored", "-n", UNWATCHED_NS)
                     .get("status"), timeout=5, what="no status")
        assert op.healthy()
        assert_no_permission_errors(op)
    finally:
        code = op.stop()
        for ns in (WATCHED_NS, UNWATCHED_NS):
            cp.kubectl("delete", "modelendpoints", "--all", "-n", ns, "--wait=true", check=False)
    assert code == 0, op.log_text()[-4000:]


# --- upgrade ------------------------------------------------------------------------


def replicasets(release: Release) -> dict[str, dict]:
    items = release.get("replicasets", "-n", SYSTEM_NS, "-l",
                        OPERATOR_PODS)["items"]
    return {rs["metadata"]["name"]: rs for rs in items}


def test_helm_upgrade_with_changed_values_rolls_the_operator(release):
    before = release.deployment()
    old_sets = replicasets(release)
    changed = {**VALUES, "logLevel": "debug", "replicas": 2}
    # No --wait: readiness of kwok pods can blip on a loaded machine (see wait_ready);
    # the roll itself is what is checked below.
    release.helm("upgrade", RELEASE, str(CHART), "--namespace", SYSTEM_NS, "--values",
                 release.values_file(changed, "upgrade"))
    after = release.deployment()
    assert after["metadata"]["generation"] > before["metadata"]["generation"]
    [container] = after["spec"]["template"]["spec"]["containers"]
    assert {e["name"]: e.get("value") for e in container["env"]}["MEP_OPERATOR_LOG_LEVEL"] == "debug"

    def rolled() -> str | None:
        new = {n: rs for n, rs in replicasets(release).items() if n not in old_sets}
        pods = release.get("pods", "-n", SYSTEM_NS, "-l", OPERATOR_PODS)
        for name, rs in new.items():  # a new pod template: a new ReplicaSet, with the pods
            hash_ = rs["metadata"]["labels"]["pod-template-hash"]
            running = [p for p in pods["items"] if p["status"].get("phase") == "Running"
                       and p["metadata"]["labels"].get("pod-template-hash") == hash_]
            if rs["spec"]["replicas"] == 2 and len(running) == 2:
                return name
        return None

    try:
        rolled_to = wait_for(rolled, timeout=120, what="the new ReplicaSet's 2 pods to run")
    except TimeoutError as exc:
        state = release.cp.kubectl("describe", "deployments,replicasets,pods", "-n", SYSTEM_NS,
                                   check=False)
        raise AssertionError(f"{exc}\n{state}") from None
    new_sets = replicasets(release)
    assert all(rs["spec"]["replicas"] == 0 for n, rs in new_sets.items() if n != rolled_to)
    # Two replicas: the chart adds a PodDisruptionBudget.
    pdb = release.get("pdb", FULLNAME, "-n", SYSTEM_NS)
    assert pdb["spec"]["minAvailable"] == 1

    # The same values again: nothing rolls.
    release.helm("upgrade", RELEASE, str(CHART), "--namespace", SYSTEM_NS,
                 "--values", release.values_file(changed, "upgrade"))
    assert release.deployment()["metadata"]["generation"] == after["metadata"]["generation"]
    assert set(replicasets(release)) == set(new_sets)

    # A mistyped value fails the upgrade, naming it, and leaves the release as it was.
    result = release.helm("upgrade", RELEASE, str(CHART), "--namespace", SYSTEM_NS,
                          "--reuse-values", "--set", "logLevl=info", check=False)
    assert result.returncode != 0 and "'logLevl'" in result.stderr
    history = json.loads(release.helm("history", RELEASE, "-n", SYSTEM_NS, "-o", "json").stdout)
    assert history[-1]["status"] == "deployed" and len(history) == 3


def test_helm_upgrade_updates_the_crds(release):
    """Issue 10: a chart version whose CRD changed reaches an existing install with
    `helm upgrade` (CRDs in a crds/ folder would stay stale)."""
    import shutil

    changed_chart = release.tmp / "chart-with-a-new-crd"
    shutil.copytree(CHART, changed_chart, symlinks=False)  # the CRD bytes copied, not linked
    crd_file = changed_chart / "files" / "crds" / "modelendpoints.yaml"
    crd = yaml.safe_load(crd_file.read_text())
    spec = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    spec["properties"]["addedByAnUpgrade"] = {"type": "string", "description": "a field of the next version"}
    crd_file.write_text(yaml.safe_dump(crd))
    name = CRD_NAMES[0]
    try:
        release.helm("upgrade", RELEASE, str(changed_chart), "--namespace", SYSTEM_NS, "--reuse-values")
        live = release.get("crd", name)
        props = live["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
        assert props["addedByAnUpgrade"]["description"] == "a field of the next version"
        # The API server takes the new field at once.
        obj = endpoint("upgraded", WATCHED_NS)
        obj["spec"]["addedByAnUpgrade"] = "kept"
        proc = release.cp.kubectl("create", "--validate=strict", "--dry-run=server", "-o", "json", "-f", "-",
                                  input=json.dumps(obj))
        assert json.loads(proc)["spec"]["addedByAnUpgrade"] == "kept"
    finally:
        release.helm("upgrade", RELEASE, str(CHART), "--namespace", SYSTEM_NS, "--reuse-values")
    props = release.get("crd", name)["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"][
        "spec"]["properties"]
    assert "addedByAnUpgrade" not in props  # and back


# --- uninstall ----------------------------------------------------------------------


def test_helm_uninstall_leaves_only_the_crds(release):
    cp = release.cp
    # A ModelEndpoint that must survive: the CRDs carry helm.sh/resource-policy: keep, so
    # neither they nor the objects in them go with the release.
    cp.kubectl("apply", "-f", "-", input=json.dumps(endpoint("survivor", WATCHED_NS)))
    release.helm("uninstall", RELEASE, "--namespace", SYSTEM_NS, "--wait", "--timeout", "120s")
    selector = f"app.kubernetes.io/instance={RELEASE}"

    def leftovers() -> list[str]:
        names = cp.kubectl("get", CHART_KINDS, "-A", "-l", selector, "-o", "name").split()
        return names + cp.kubectl("get", CLUSTER_KINDS, "-l", selector, "-o", "name").split()

    wait_for(lambda: not leftovers(), timeout=90, what="every object of the release to go")
    # Also by name, in case a label were missing somewhere.
    for kind, ns in (("deployment", SYSTEM_NS), ("serviceaccount", SYSTEM_NS),
                     ("service", SYSTEM_NS), ("role", WATCHED_NS), ("rolebinding", WATCHED_NS),
                     ("kopfpeering", WATCHED_NS)):
        assert cp.kubectl("get", kind, FULLNAME, "-n", ns, check=False) == "", kind
    for kind, name in (("clusterrole", f"{FULLNAME}-cluster"),
                       ("clusterrolebinding", f"{FULLNAME}-cluster")):
        assert cp.kubectl("get", kind, name, check=False) == "", kind
    assert cp.kubectl("get", "secrets", "-n", SYSTEM_NS, "-l", "owner=helm", "-o", "name") == ""
    releases = json.loads(release.helm("list", "-n", SYSTEM_NS, "-a", "-o", "json").stdout)
    assert RELEASE not in [r["name"] for r in releases]
    # What stays: the CRDs, and the ModelEndpoints in them.
    for crd in ("modelendpoints.serving.modelendpoint.dev", "kopfpeerings.kopf.dev",
                "clusterkopfpeerings.kopf.dev"):
        assert release.get("crd", crd)["metadata"]["name"] == crd
    assert release.get("modelendpoint", "survivor", "-n", WATCHED_NS)["spec"]["model"]
    cp.kubectl("delete", "modelendpoint", "survivor", "-n", WATCHED_NS)


# --- the default install: every namespace, with a ClusterRole ---------------------------
# Runs after the namespaced release is gone. Installed with replicas 0: the local
# process is the only operator of this release's ClusterKopfPeering.

ALL_RELEASE = "mepall"
ALL_FULLNAME = f"{ALL_RELEASE}-modelendpoint-operator"
ALL_SYSTEM_NS = "chart-all-system"
ALL_TEAM_NS = "chart-all-team"
ALL_SA = f"system:serviceaccount:{ALL_SYSTEM_NS}:{ALL_FULLNAME}"


@pytest.fixture(scope="module")
def cluster_release(control_plane, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("chart-all")
    rel = Release(control_plane, _helm_env(control_plane, tmp), tmp, ALL_FULLNAME, ALL_SYSTEM_NS)
    for ns in (ALL_SYSTEM_NS, ALL_TEAM_NS):
        control_plane.kubectl("create", "namespace", ns)
    values = {"image": VALUES["image"], "replicas": 0}  # JSON logs: the default
    # The CRD the first release kept: adopted by this one, as the chart README says.
    adopt_crds(control_plane, ALL_RELEASE, ALL_SYSTEM_NS)
    try:
        rel.helm("install", ALL_RELEASE, str(CHART), "--namespace", ALL_SYSTEM_NS,
                 "--values", rel.values_file(values, "install"), "--wait", "--timeout", "120s")
        yield rel
    finally:
        rel.helm("uninstall", ALL_RELEASE, "--namespace", ALL_SYSTEM_NS, "--wait", check=False)
        for ns in (ALL_SYSTEM_NS, ALL_TEAM_NS):
            control_plane.kubectl("delete", "namespace", ns, "--wait=false", check=False)


def test_default_install_operator_reconciles_in_any_namespace_with_its_token(cluster_release):
    rel, cp = cluster_release, cluster_release.cp
    assert rel.get("clusterrole", ALL_FULLNAME)["rules"]
    assert rel.get("clusterkopfpeering", ALL_FULLNAME)["metadata"]["name"] == ALL_FULLNAME
    assert cp.kubectl("get", "roles", "-A", "-l", f"app.kubernetes.io/instance={ALL_RELEASE}",
                      "-o", "name") == ""

    def can(*args: str) -> bool:
        out = subprocess.run([str(cp.bin_dir / "kubectl"), "auth", "can-i", *args, f"--as={ALL_SA}"],
                             env=rel.env, capture_output=True, text=True)
        assert out.stdout.strip() in ("yes", "no"), out.stderr
        return out.stdout.strip() == "yes"

    # Watching every namespace means reading referenced Secrets in every namespace, by
    # name only: it still may not list them, nor write RBAC, nor delete ModelEndpoints.
    assert can("get", "secrets", "-n", "kube-system")
    assert not can("list", "secrets", "--all-namespaces")
    assert not can("create", "clusterroles.rbac.authorization.k8s.io")
    assert not can("delete", "modelendpoints.serving.modelendpoint.dev", "-n", ALL_TEAM_NS)
    assert not can("delete", "nodes")
    assert not can("create", "clusterkopfpeerings.kopf.dev")

    kubeconfig = sa_kubeconfig(rel, ALL_SYSTEM_NS, ALL_FULLNAME)
    op = OperatorProcess(rel, kubeconfig, identity="chart-clusterwide-test")
    assert op.chart_env["MEP_OPERATOR_NAMESPACES"] == ""
    try:
        wait_for(op.healthy, timeout=60, what="the operator's liveness endpoint")
        cp.kubectl("apply", "-f", "-", input=json.dumps(endpoint("wide", ALL_TEAM_NS)))

        owner = wait_ready(rel, "wide", ALL_TEAM_NS, op)
        assert owned_by(rel.get("deployment", "wide", "-n", ALL_TEAM_NS), owner)
        assert owned_by(rel.get("service", "wide", "-n", ALL_TEAM_NS), owner)
        # This very process reconciled it (its JSON log says what it applied for whom)
        # and keeps alive in the release's ClusterKopfPeering.
        applied = [rec["message"] for rec in map(json.loads, op.log_text().splitlines())
                   if str(rec.get("message", "")).startswith("applied ")]
        assert applied and all(m.endswith(f"of ModelEndpoint {ALL_TEAM_NS}/wide)") for m in applied), applied
        assert {m.split()[1] for m in applied} == {"Service", "Deployment"}
        peering = rel.get("clusterkopfpeering", ALL_FULLNAME)
        assert "chart-clusterwide-test" in (peering.get("status") or {})
        assert op.healthy()
        assert_no_permission_errors(op)
    finally:
        code = op.stop()
        cp.kubectl("delete", "modelendpoint", "wide", "-n", ALL_TEAM_NS, "--wait=true", check=False)
    assert code == 0, op.log_text()[-4000:]

    rel.helm("uninstall", ALL_RELEASE, "--namespace", ALL_SYSTEM_NS, "--wait", "--timeout", "120s")
    selector = f"app.kubernetes.io/instance={ALL_RELEASE}"
    wait_for(lambda: not (cp.kubectl("get", CHART_KINDS, "-A", "-l", selector, "-o", "name")
                          + cp.kubectl("get", CLUSTER_KINDS, "-l", selector, "-o", "name")),
             timeout=90, what="every object of the cluster-wide release to go")
