"""Child manifests and the runtime environment, from a ModelEndpoint (pure functions)."""

from __future__ import annotations

import copy
import json
import shlex
from pathlib import Path

import pytest

from modelendpoint_operator import constants as c
from modelendpoint_operator import crd
from modelendpoint_operator import manifests as m
from modelendpoint_operator.settings import load_settings
from modelendpoint_operator.spec import ENGINE_FIELDS_BY_RULE, Endpoint, EngineSpec, engine_variable

SETTINGS = load_settings({"MEP_OPERATOR_DEFAULT_RUNTIME_IMAGE": "reg.example/runtime:9"})


def owner(name: str = "llm", namespace: str = "ns", **spec) -> Endpoint:
    """A ModelEndpoint as the operator reads it (through the typed models, defaults filled)."""
    return Endpoint.from_body({"apiVersion": c.API_VERSION, "kind": c.KIND,
                               "metadata": {"name": name, "namespace": namespace, "uid": "uid-1", "generation": 3},
                               "spec": {"model": "org/model", **spec}})


def env_of(obj: Endpoint) -> dict[str, dict]:
    return {e["name"]: e for e in m.container_env(obj)}


def values(obj: Endpoint) -> dict[str, str | None]:
    return {k: v.get("value") for k, v in env_of(obj).items()}


@pytest.mark.parametrize("spec,var,expected", [
    ({"model": "a/b"}, "MODEL_NAME", "a/b"),
    ({"servedModelName": "chat"}, "OPENAI_SERVED_MODEL_NAME_OVERRIDE", "chat"),
    ({}, "OPENAI_RESPONSE_ROLE", "assistant"),
    ({"responseRole": "bot"}, "OPENAI_RESPONSE_ROLE", "bot"),
    ({}, "RAW_OPENAI_OUTPUT", "1"),
    ({"rawOpenAIOutput": False}, "RAW_OPENAI_OUTPUT", "0"),
    ({"engine": {"maxModelLen": 8192}}, "MAX_MODEL_LEN", "8192"),
    ({"engine": {"dtype": "half"}}, "DTYPE", "half"),
    ({"engine": {"gpuMemoryUtilization": 0.9}}, "GPU_MEMORY_UTILIZATION", "0.9"),
    ({"engine": {"gpuMemoryUtilization": 1}}, "GPU_MEMORY_UTILIZATION", "1.0"),
    ({"gpus": 4}, "TENSOR_PARALLEL_SIZE", "4"),
    ({"gpus": 4, "engine": {"tensorParallelSize": 2}}, "TENSOR_PARALLEL_SIZE", "2"),
    ({"engine": {"quantization": "fp8"}}, "QUANTIZATION", "fp8"),
    ({"engine": {"enforceEager": True}}, "ENFORCE_EAGER", "true"),
    ({"engine": {"enforceEager": False}}, "ENFORCE_EAGER", "false"),
    ({"engine": {"trustRemoteCode": True}}, "TRUST_REMOTE_CODE", "true"),
    ({"engine": {"enablePrefixCaching": False}}, "ENABLE_PREFIX_CACHING", "false"),
    ({"engine": {"maxNumSeqs": 32}}, "MAX_NUM_SEQS", "32"),
    ({"engine": {"extraArgs": ["--seed", "1", "--x", "a b"]}}, "VLLM_EXTRA_ARGS",
     "--seed 1 --x 'a b'"),
    ({}, "ENDPOINT_ID", "llm"),
    ({}, "PORT", "8000"),
    ({}, "METRICS_PORT", str(c.RUNTIME_METRICS_PORT)),
    ({"apiKeySecretRef": {"name": "k", "key": "x"}}, "API_KEY_FILE", c.API_KEY_FILE),
    ({}, "HF_HOME", c.HF_HOME),
    ({"drainTimeoutSeconds": 90}, "DRAIN_TIMEOUT_SECONDS", "90"),
])
def test_spec_field_to_runtime_variable(spec: dict, var: str, expected: str) -> None:
    assert values(owner(**spec))[var] == expected


@pytest.mark.parametrize("var", ["OPENAI_SERVED_MODEL_NAME_OVERRIDE", "MAX_MODEL_LEN", "DTYPE",
                                 "GPU_MEMORY_UTILIZATION", "QUANTIZATION", "ENFORCE_EAGER",
                                 "TRUST_REMOTE_CODE", "MAX_NUM_SEQS", "VLLM_EXTRA_ARGS",
                                 "HF_TOKEN", "API_KEY", "API_KEY_FILE", "ENABLE_PREFIX_CACHING"])
def test_unset_fields_set_no_variable(var: str) -> None:
    assert var not in values(owner())


def test_extra_args_round_trip_through_shell_quoting() -> None:
    args = ["--chat-template", "{% if x %}'y'{% endif %}", "--seed", "0"]
    value = values(owner(engine={"extraArgs": args}))["VLLM_EXTRA_ARGS"]
    assert shlex.split(value) == args


def test_no_gpus_means_no_limit_no_tensor_parallelism_and_no_gpu_toleration() -> None:
    obj = owner(gpus=0)
    pod = m.deployment(obj, SETTINGS)["spec"]["template"]["spec"]
    assert "resources" not in pod["containers"][0]
    assert "tolerations" not in pod
    assert "TENSOR_PARALLEL_SIZE" not in values(obj)


def test_every_scalar_engine_field_reaches_the_runtime_by_the_one_rule() -> None:
    """A typed engine field needs no mapping code: its camelCase name, in UPPER_SNAKE_CASE."""
    schema = crd.model_schema(EngineSpec)["properties"]
    examples = {"integer": 3, "boolean": True, "number": 0.5, "string": "awq"}
    for name, info in EngineSpec.model_fields.items():
        if name not in ENGINE_FIELDS_BY_RULE or name == "tensor_parallel_size":
            continue
        prop = schema[info.alias or name]
        value = prop["enum"][0] if "enum" in prop else examples[prop["type"]]
        env = values(owner(engine={info.alias or name: value}))
        expected = "true" if value is True else str(value)
        assert env[engine_variable(name)] == expected, name
    assert engine_variable("max_model_len") == "MAX_MODEL_LEN"
    assert engine_variable("enable_prefix_caching") == "ENABLE_PREFIX_CACHING"


def test_gpu_pods_tolerate_the_gpu_node_taint() -> None:
    pod = m.deployment(owner(gpus=2, tolerations=[{"key": "x", "operator": "Exists"}]),
                       SETTINGS)["spec"]["template"]["spec"]
    assert pod["tolerations"] == [{"key": "x", "operator": "Exists"},
                                  {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    amd = m.deployment(owner(gpuResourceName="amd.com/gpu"), SETTINGS)["spec"]["template"]["spec"]
    assert amd["tolerations"] == [{"key": "amd.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]


def test_gpu_limit_on_the_configured_resource_name() -> None:
    obj = owner(gpus=2, gpuResourceName="amd.com/gpu",
                resources={"requests": {"cpu": "4"}, "limits": {"memory": "32Gi"}})
    res = m.deployment(obj, SETTINGS)["spec"]["template"]["spec"]["containers"][0]["resources"]
    assert res == {"requests": {"cpu": "4"}, "limits": {"memory": "32Gi", "amd.com/gpu": 2}}


def test_secrets_only_by_reference_and_the_keys_as_a_file_the_runtime_rereads() -> None:
    obj = owner(hfTokenSecretRef={"name": "hf", "key": "token"}, apiKeySecretRef={"name": "keys", "key": "api"})
    env = env_of(obj)
    assert env["HF_TOKEN"] == {"name": "HF_TOKEN",
                               "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}}}
    assert "API_KEY" not in env and env["API_KEY_FILE"]["value"] == c.API_KEY_FILE
    pod = m.deployment(obj, SETTINGS)["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes[c.API_KEY_VOLUME]["secret"] == {
        "secretName": "keys", "defaultMode": 0o440, "items": [{"key": "api", "path": c.API_KEY_FILE_NAME}]}
    mounts = {v["name"]: v for v in pod["containers"][0]["volumeMounts"]}
    assert mounts[c.API_KEY_VOLUME] == {"name": c.API_KEY_VOLUME, "mountPath": c.API_KEY_DIR, "readOnly": True}


def test_user_env_follows_in_order_and_never_replaces_what_the_operator_sets() -> None:
    obj = owner(env=[{"name": "ZED", "value": "z"},
                     {"name": "ALPHA", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}])
    names = [e["name"] for e in m.container_env(obj)]
    assert len(names) == len(set(names))  # server-side apply rejects duplicate keys
    assert names[-2:] == ["ZED", "ALPHA"]
    # The CRD refuses these now; an object stored before that rule keeps the operator's value.
    obj = owner(env=[{"name": "MODEL_NAME", "value": "/models/local"}, {"name": "API_KEY", "value": ""}])
    assert values(obj)["MODEL_NAME"] == "org/model" and "API_KEY" not in values(obj)


def test_the_runtime_images_home_is_the_volume_the_operator_mounts() -> None:
    dockerfile = (Path(__file__).resolve().parents[2] / "Dockerfile.runtime").read_text()
    assert f"HOME={c.RUNTIME_HOME}" in dockerfile


def test_a_cpu_endpoint_leaves_thread_placement_to_the_kernel_unless_its_env_says_otherwise() -> None:
    assert values(owner(gpus=0))["VLLM_CPU_OMP_THREADS_BIND"] == "nobind"
    assert "VLLM_CPU_OMP_THREADS_BIND" not in values(owner(gpus=1))
    pinned = owner(gpus=0, env=[{"name": "VLLM_CPU_OMP_THREADS_BIND", "value": "auto"}])
    assert [e for e in m.container_env(pinned) if e["name"] == "VLLM_CPU_OMP_THREADS_BIND"] == [
        {"name": "VLLM_CPU_OMP_THREADS_BIND", "value": "auto"}]


def test_pod_template_contract() -> None:
    obj = owner(shmSize="16Gi", drainTimeoutSeconds=40, replicas=3)
    dep = m.deployment(obj, SETTINGS)
    pod = dep["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["image"] == "reg.example/runtime:9"
    assert container["imagePullPolicy"] == "IfNotPresent"
    assert container["ports"] == [{"name": "http", "containerPort": 8000, "protocol": "TCP"},
                                  {"name": "metrics", "containerPort": c.RUNTIME_METRICS_PORT, "protocol": "TCP"}]
    assert container["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "http"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 3600
    assert container["lifecycle"]["preStop"] == {"sleep": {"seconds": c.PRESTOP_SLEEP_SECONDS}}
    assert pod["terminationGracePeriodSeconds"] == c.PRESTOP_SLEEP_SECONDS + 40 + c.GRACE_MARGIN_SECONDS
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] > 0
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes[c.SHM_VOLUME]["emptyDir"] == {"medium": "Memory", "sizeLimit": "16Gi"}
    assert volumes[c.CACHE_VOLUME] == {"name": c.CACHE_VOLUME, "emptyDir": {}}
    mounts = {v["mountPath"]: v["name"] for v in container["volumeMounts"]}
    assert mounts == {"/dev/shm": c.SHM_VOLUME, c.HF_HOME: c.CACHE_VOLUME, "/tmp": c.TMP_VOLUME,
                      c.RUNTIME_HOME: c.HOME_VOLUME}
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert volumes[c.TMP_VOLUME]["emptyDir"] == {} and volumes[c.HOME_VOLUME]["emptyDir"] == {}
    assert values(obj)["HOME"] == c.RUNTIME_HOME
    assert dep["spec"]["replicas"] == 3
    assert dep["spec"]["strategy"] == {"type": "RollingUpdate",
                                       "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}}
    # The rollout deadline outlasts the startup probe: a slow model load is not "stuck".
    assert dep["spec"]["progressDeadlineSeconds"] > startup["periodSeconds"] * startup["failureThreshold"]


def test_scheduling_fields_are_copied() -> None:
    sched = dict(nodeSelector={"pool": "a100"},
                 tolerations=[{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}],
                 affinity={"podAntiAffinity": {}}, priorityClassName="high",
                 runtimeClassName="nvidia", imagePullSecrets=[{"name": "reg"}],
                 envFrom=[{"secretRef": {"name": "extra"}}], image="my/rt:1", imagePullPolicy="Always")
    dep = m.deployment(owner(gpus=0, **sched), SETTINGS)
    pod = dep["spec"]["template"]["spec"]
    for key in ("nodeSelector", "tolerations", "affinity", "priorityClassName", "runtimeClassName",
                "imagePullSecrets"):
        assert pod[key] == sched[key]
    assert pod["containers"][0]["envFrom"] == sched["envFrom"]
    assert pod["containers"][0]["image"] == "my/rt:1"
    assert pod["containers"][0]["imagePullPolicy"] == "Always"


def test_model_cache_variants() -> None:
    claim = m.deployment(owner(modelCache={"claimName": "shared"}), SETTINGS)
    vols = {v["name"]: v for v in claim["spec"]["template"]["spec"]["volumes"]}
    assert vols[c.CACHE_VOLUME]["persistentVolumeClaim"] == {"claimName": "shared"}
    assert m.pvc(owner(modelCache={"claimName": "shared"}), SETTINGS) is None

    obj = owner(modelCache={"size": "200Gi", "storageClassName": "fast", "accessMode": "ReadWriteMany"})
    vols = {v["name"]: v for v in m.deployment(obj, SETTINGS)["spec"]["template"]["spec"]["volumes"]}
    assert vols[c.CACHE_VOLUME]["persistentVolumeClaim"] == {"claimName": "llm-cache"}
    pvc = m.pvc(obj, SETTINGS)
    assert pvc["metadata"]["name"] == "llm-cache"
    assert pvc["spec"] == {"accessModes": ["ReadWriteMany"], "storageClassName": "fast",
                           "resources": {"requests": {"storage": "200Gi"}}}


def test_labels_selector_and_owner_reference_on_every_child() -> None:
    obj = owner(modelCache={"size": "1Gi"}, ingress={"enabled": True}, adapters=[])
    kids = m.children(obj, SETTINGS)
    assert set(kids) == {"Deployment", "Service", "Ingress", "PersistentVolumeClaim", "ConfigMap"}
    for kind, child in kids.items():
        meta = child["metadata"]
        assert meta["namespace"] == "ns"
        assert meta["labels"][c.LABEL_MANAGED_BY] == "modelendpoint-operator"
        assert meta["labels"][c.LABEL_ENDPOINT] == "llm"
        assert meta["ownerReferences"] == [{
            "apiVersion": c.API_VERSION, "kind": c.KIND, "name": "llm", "uid": "uid-1",
            "controller": True, "blockOwnerDeletion": True}]
        assert meta["name"] == {"PersistentVolumeClaim": "llm-cache", "ConfigMap": "llm-adapters"}.get(kind, "llm")
    dep = kids["Deployment"]
    assert dep["spec"]["selector"]["matchLabels"] == {c.LABEL_ENDPOINT: "llm"}
    assert kids["Service"]["spec"]["selector"] == {c.LABEL_ENDPOINT: "llm"}
    template_labels = dep["spec"]["template"]["metadata"]["labels"]
    assert template_labels.items() >= dep["spec"]["selector"]["matchLabels"].items()
    assert m.selector_string("llm") == "serving.modelendpoint.dev/endpoint=llm"


def test_optional_children_absent_by_default() -> None:
    kids = m.children(owner(), SETTINGS)
    assert kids["Ingress"] is None and kids["PersistentVolumeClaim"] is None and kids["ConfigMap"] is None


def test_tool_calling_and_reasoning_fields_by_the_rule() -> None:
    env = values(owner(engine={"toolCallParser": "hermes", "enableAutoToolChoice": True,
                               "reasoningParser": "deepseek_r1"}))
    assert (env["TOOL_CALL_PARSER"], env["ENABLE_AUTO_TOOL_CHOICE"], env["REASONING_PARSER"]) == (
        "hermes", "true", "deepseek_r1")


def test_chat_template_inline_or_from_a_config_map() -> None:
    inline = "{% for m in messages %}{{ m.content }}{% endfor %}"
    assert values(owner(engine={"chatTemplate": {"inline": inline}}))["CHAT_TEMPLATE"] == inline
    obj = owner(engine={"chatTemplate": {"configMapRef": {"name": "tpl", "key": "chat.jinja"}}})
    assert values(obj)["CHAT_TEMPLATE"] == f"{c.CHAT_TEMPLATE_DIR}/{c.CHAT_TEMPLATE_FILE_NAME}"
    pod = m.deployment(obj, SETTINGS)["spec"]["template"]["spec"]
    assert {v["name"]: v for v in pod["volumes"]}[c.CHAT_TEMPLATE_VOLUME]["configMap"] == {
        "name": "tpl", "items": [{"key": "chat.jinja", "path": c.CHAT_TEMPLATE_FILE_NAME}]}


@pytest.mark.parametrize("task,expected", [
    (None, {}), ("generate", {"RUNNER": "generate"}),
    ("embed", {"RUNNER": "pooling", "CONVERT": "embed"}),
    ("classify", {"RUNNER": "pooling", "CONVERT": "classify"}),
])
def test_task_sets_vllms_runner_and_converter(task: str | None, expected: dict) -> None:
    env = values(owner(**({"task": task} if task else {})))
    assert {k: env[k] for k in ("RUNNER", "CONVERT") if k in env} == expected


def test_adapters_are_a_config_map_the_pods_mount_and_changing_them_changes_no_pod() -> None:
    one = owner(adapters=[{"name": "sql", "source": "org/sql-lora"}])
    two = owner(adapters=[{"name": "sql", "source": "org/sql-lora"}, {"name": "chat", "source": "/models/x"}])
    cm = m.children(two, SETTINGS)["ConfigMap"]
    assert cm["metadata"]["name"] == "llm-adapters"
    assert json.loads(cm["data"][c.ADAPTERS_FILE_NAME]) == [
        {"name": "sql", "source": "org/sql-lora"}, {"name": "chat", "source": "/models/x"}]
    env = values(one)
    assert env["ENABLE_LORA"] == "true" and env["ADAPTERS_FILE"] == c.ADAPTERS_FILE
    # Adding an adapter changes the ConfigMap only: the running replicas load it, no roll.
    assert m.pod_template(one, SETTINGS) == m.pod_template(two, SETTINGS)
    assert m.needs_apply(cm, m.children(one, SETTINGS)["ConfigMap"])
    pod = m.pod_template(one, SETTINGS)["spec"]
    assert {v["name"]: v for v in pod["volumes"]}[c.ADAPTERS_VOLUME]["configMap"] == {"name": "llm-adapters"}


def test_service() -> None:
    svc = m.service(owner(service={"type": "LoadBalancer", "port": 8080}), SETTINGS)
    assert svc["spec"]["type"] == "LoadBalancer"
    assert svc["spec"]["ports"] == [{"name": "http", "port": 8080, "targetPort": "http",
                                     "protocol": "TCP"}]


def test_ingress_defaults_and_options() -> None:
    ing = m.ingress(owner(ingress={"enabled": True}), SETTINGS)
    assert "ingressClassName" not in ing["spec"] and "tls" not in ing["spec"]
    rule = ing["spec"]["rules"][0]
    assert "host" not in rule
    assert rule["http"]["paths"] == [{"path": "/v2/llm/openai/v1", "pathType": "Prefix",
                                      "backend": {"service": {"name": "llm",
                                                              "port": {"name": "http"}}}}]
    settings = load_settings({"MEP_OPERATOR_DEFAULT_INGRESS_CLASS": "traefik"})
    assert m.ingress(owner(ingress={"enabled": True}), settings)["spec"]["ingressClassName"] == "traefik"
    ing = m.ingress(owner(ingress={"enabled": True, "className": "nginx", "host": "a.example.com",
                                   "path": "/custom", "tlsSecretName": "tls",
                                   "annotations": {"x": "y"}}), settings)
    assert ing["spec"]["ingressClassName"] == "nginx"
    assert ing["spec"]["rules"][0]["host"] == "a.example.com"
    assert ing["spec"]["rules"][0]["http"]["paths"][0]["path"] == "/custom"
    assert ing["spec"]["tls"] == [{"hosts": ["a.example.com"], "secretName": "tls"}]
    assert ing["metadata"]["annotations"] == {"x": "y"}
    assert m.ingress(owner(ingress={"enabled": False, "host": "a"}), SETTINGS) is None


@pytest.mark.parametrize("spec,url,external", [
    ({}, "http://llm.ns.svc.cluster.local/v2/llm/openai/v1", None),
    ({"service": {"port": 8080}}, "http://llm.ns.svc.cluster.local:8080/v2/llm/openai/v1", None),
    ({"ingress": {"enabled": True}}, "http://llm.ns.svc.cluster.local/v2/llm/openai/v1", None),
    ({"ingress": {"enabled": True, "host": "a.io"}}, None, "http://a.io/v2/llm/openai/v1"),
    ({"ingress": {"enabled": True, "host": "a.io", "tlsSecretName": "t"}}, None,
     "https://a.io/v2/llm/openai/v1"),
    ({"ingress": {"enabled": True, "host": "a.io", "path": "/"}}, None,
     "https://a.io/v2/llm/openai/v1".replace("https", "http")),
    ({"ingress": {"enabled": True, "host": "a.io", "path": "/openai"}}, None,
     "http://a.io/openai/v1"),
    ({"ingress": {"enabled": True, "host": "a.io", "path": "/team/openai/v1/"}}, None,
     "http://a.io/team/openai/v1"),
    ({"ingress": {"enabled": False, "host": "a.io"}}, None, None),
])
def test_urls(spec: dict, url: str | None, external: str | None) -> None:
    got_url, got_external = m.urls(owner(**spec), SETTINGS)
    if url:
        assert got_url == url
    assert got_url.endswith("/openai/v1")
    assert got_external == external


def test_cluster_domain_setting() -> None:
    settings = load_settings({"MEP_OPERATOR_CLUSTER_DOMAIN": "corp.local"})
    assert m.urls(owner(), settings)[0] == "http://llm.ns.svc.corp.local/v2/llm/openai/v1"


def test_rendering_is_deterministic_and_pure() -> None:
    obj = owner(gpus=2, engine={"extraArgs": ["--a"]}, ingress={"enabled": True},
                env=[{"name": "X", "value": "1"}])
    frozen = obj.model_dump()
    assert m.children(obj, SETTINGS) == m.children(copy.deepcopy(obj), SETTINGS)
    assert obj.model_dump() == frozen  # the input is not modified


def test_autoscaler_replicas_win_over_spec_replicas() -> None:
    obj = owner(replicas=1, autoscaling={"minReplicas": 0, "maxReplicas": 4})
    assert m.deployment(obj, SETTINGS)["spec"]["replicas"] == 1
    assert m.deployment(obj, SETTINGS, replicas=3)["spec"]["replicas"] == 3
    assert m.children(obj, SETTINGS, replicas=0)["Deployment"]["spec"]["replicas"] == 0


def test_needs_apply() -> None:
    desired = m.service(owner(), SETTINGS)
    assert m.needs_apply(desired, None)
    live = copy.deepcopy(desired)
    live["spec"]["clusterIP"] = "10.0.0.1"
    assert not m.needs_apply(desired, live)
    live["metadata"]["labels"][c.LABEL_COMPONENT] = "hacked"
    assert m.needs_apply(desired, live)


def test_differs() -> None:
    desired = m.service(owner(), SETTINGS)
    live = copy.deepcopy(desired)
    live["metadata"]["resourceVersion"] = "9"
    live["spec"]["clusterIP"] = "10.0.0.1"
    live["status"] = {"loadBalancer": {}}
    assert not m.differs(desired, live)
    live["spec"]["ports"][0]["port"] = 81
    assert m.differs(desired, live)
    assert not m.differs({"a": {"cpu": 1}}, {"a": {"cpu": "1"}})
    assert not m.differs({"cpu": "0.5"}, {"cpu": "500m"})  # the API server canonicalizes quantities
    assert m.differs({"cpu": "0.5"}, {"cpu": "600m"})
    assert m.differs({"a": [1, 2]}, {"a": [1]})
    assert m.differs({"a": {"b": 1}}, {})
