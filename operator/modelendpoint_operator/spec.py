"""The ModelEndpoint API as typed models: the one source of truth for its schema.

The CRD's OpenAPI schema, its defaults and its CEL rules are generated from
these models (``make crds`` runs :mod:`modelendpoint_operator.crd`, and a unit
test checks that the committed ``crds/modelendpoints.yaml`` is what they
generate). The operator reads every object through the same models, so a
default or a rule is written once, here.

Conventions:
- Python attributes are snake_case; the API's camelCase names are their aliases.
- ``Field(description=...)`` is the field's documentation (CRD and docs table).
- Engine fields follow one rule to the runtime: ``engine.maxModelLen`` becomes
  the variable ``MAX_MODEL_LEN`` (:func:`engine_variable`), which the runtime
  turns into vLLM's ``--max-model-len``. Adding a typed vLLM option is one
  field here and one line in docs/operator.md, no mapping code.
- CEL rules live next to the fields they judge (``cel(...)``); each names its
  field and has a reason, so the API server's message says what is wrong where.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema
from pydantic.alias_generators import to_camel

from . import constants as c

# --- building blocks ------------------------------------------------------------

# A Kubernetes quantity without a sign: "8Gi", "500m", "1.5", 2. Negative and explicitly
# positive ("+1Gi") values are refused: a size or resource can only be zero or more.
QUANTITY_PATTERN = (r"^(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|"
                    r"([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$")
Quantity = Annotated[
    str | Annotated[int, Field(ge=0)],
    Field(pattern=QUANTITY_PATTERN),
    WithJsonSchema({"x-kubernetes-int-or-string": True, "minimum": 0, "pattern": QUANTITY_PATTERN}),
]
# A quantity of the pattern above that is zero ("0", "0Gi", "0.0", ".0e3").
ZERO_QUANTITY_PATTERN = r"^(0+(\.0*)?|\.0+)(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?[0-9.]+))?$"
DNS_SUBDOMAIN_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
Int32 = Annotated[int, Field(json_schema_extra={"format": "int32"})]


def cel(rule: str, message: str, field_path: str | None = None, reason: str = "FieldValueInvalid",
        message_expression: str | None = None) -> dict[str, str]:
    """One CEL validation rule of the CRD (``x-kubernetes-validations``)."""
    out = {"rule": rule, "message": message}
    if message_expression:
        out["messageExpression"] = message_expression
    if field_path:
        out["fieldPath"] = field_path
    out["reason"] = reason
    return out


def k8s(**extensions: Any) -> dict[str, Any]:
    """Schema keys pydantic has no words for (``x-kubernetes-*``, a CRD default)."""
    return {key.replace("_", "-") if key.startswith("x_") else key: value for key, value in extensions.items()}


class ApiModel(BaseModel):
    """Base of every API object: camelCase on the wire, unknown fields ignored (the API
    server prunes them anyway), immutable once read."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore",
                              frozen=True)

    def wire(self) -> dict[str, Any]:
        """The object as the API server would store it (camelCase, unset fields left out)."""
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")


# --- engine ---------------------------------------------------------------------------

# An option the runtime owns, as vLLM's parser reads it: any spelling in the list, with
# dashes or underscores, the value separate or after "=" (abbreviations such as `-as` are
# refused by the runtime itself). A list membership test rather than one long regex: the
# API server's CEL cost estimate for a 39-way alternation over 128 items of 4 KiB exceeds
# its per-rule budget.
_OPTION_NAME = "(self.indexOf('=') < 0 ? self : self.substring(0, self.indexOf('='))).replace('_', '-')"
OWNED_OPTION_RULE = "!(self.startsWith('-') && " + _OPTION_NAME + " in [" + ", ".join(
    f"'{o}'" for o in c.RUNTIME_OWNED_OPTIONS) + "])"

ExtraArg = Annotated[str, Field(max_length=4096, json_schema_extra=k8s(**{"x-kubernetes-validations": [cel(
    OWNED_OPTION_RULE,
    "engine.extraArgs must not set an option the runtime sets itself: " + ", ".join(c.RUNTIME_OWNED_OPTIONS),
    message_expression="'engine.extraArgs sets ' + self + ', an option the runtime sets itself "
                       "(use the ModelEndpoint field for it)'",
    reason="FieldValueForbidden")]}))]


class ConfigMapKeyRef(ApiModel):
    name: str = Field(min_length=1, max_length=253, description="ConfigMap name, in the ModelEndpoint's namespace.")
    key: str = Field(min_length=1, max_length=253, description="Key in the ConfigMap.")


class ChatTemplateSpec(ApiModel):
    """A Jinja chat template that replaces the model's own (vLLM's --chat-template)."""

    inline: str | None = Field(None, min_length=1, max_length=65536, description="The template itself.")
    config_map_ref: ConfigMapKeyRef | None = Field(
        None, description="A ConfigMap key holding the template, mounted into the pods.")

    model_config = ConfigDict(json_schema_extra=k8s(**{"x-kubernetes-validations": [
        cel("has(self.inline) != has(self.configMapRef)",
            "engine.chatTemplate takes either inline or configMapRef, exactly one of them", ".inline")]}))


PARSER_NAME = r"^[A-Za-z0-9_.-]+$"


class EngineSpec(ApiModel):
    """vLLM engine options. Every scalar field reaches vLLM by the one rule
    (``maxModelLen`` -> ``MAX_MODEL_LEN`` -> ``--max-model-len``)."""

    max_model_len: int | None = Field(None, ge=1, description="Context length (prompt and output).")
    dtype: Literal["auto", "half", "float16", "bfloat16", "float", "float32"] | None = Field(
        None, description="Weights' and activations' data type.")
    gpu_memory_utilization: float | None = Field(
        None, gt=0, le=1, description="Share of each GPU's memory vLLM may take, greater than 0 and at most 1.")
    tensor_parallel_size: int | None = Field(
        None, ge=1, le=64, description="GPUs one replica spans; default gpus; at most gpus.")
    quantization: str | None = Field(None, min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$",
                                     description="A vLLM quantization method, e.g. awq, gptq, fp8.")
    enforce_eager: bool | None = Field(None, description="Run eagerly, without CUDA graphs.")
    trust_remote_code: bool | None = Field(None, description="Run the model repository's own code.")
    max_num_seqs: int | None = Field(None, ge=1, description="Sequences batched in one engine step.")
    enable_prefix_caching: bool | None = Field(
        None, description="Reuse the KV cache of shared prompt prefixes (vLLM's default: on).")
    tool_call_parser: str | None = Field(
        None, min_length=1, max_length=64, pattern=PARSER_NAME,
        description="How tool calls are read from the model's output for tool_choice auto: hermes, llama3_json, "
                    "mistral, ... (a vLLM tool parser). Needs enableAutoToolChoice.")
    enable_auto_tool_choice: bool | None = Field(
        None, description="Let the model decide to call tools (tool_choice auto); needs toolCallParser. "
                          "tool_choice required and a named function work without it.")
    reasoning_parser: str | None = Field(
        None, min_length=1, max_length=64, pattern=PARSER_NAME,
        description="How a reasoning model's thinking is split into reasoning_content: deepseek_r1, qwen3, ... "
                    "(a vLLM reasoning parser).")
    chat_template: ChatTemplateSpec | None = Field(
        None, description="A chat template replacing the model's own (CHAT_TEMPLATE: the text, or the path of "
                          "the mounted ConfigMap key).")
    extra_args: list[ExtraArg] | None = Field(
        None, max_length=128,
        description="Further vLLM options, e.g. [--max-num-batched-tokens, '8192']; joined shell-quoted "
                    "into VLLM_EXTRA_ARGS. Options the runtime owns are refused.")


# The engine fields that reach the runtime by the one rule (extraArgs and chatTemplate have
# their own mapping: a shell-joined list, and a text or a mounted file).
ENGINE_FIELDS_BY_RULE = tuple(name for name in EngineSpec.model_fields
                              if name not in ("extra_args", "chat_template"))


def engine_variable(field_name: str) -> str:
    """The runtime variable of an engine field: its name in UPPER_SNAKE_CASE."""
    return re.sub(r"(?<!^)(?=[A-Z])", "_", to_camel(field_name)).upper()


def engine_value(value: Any) -> str:
    """An engine field's value as its variable's text (booleans true/false)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    return str(value)


# --- pod-shaped fields ------------------------------------------------------------------

class LocalObjectReference(ApiModel):
    name: str = Field(min_length=1, max_length=253)


class SecretKeyRef(ApiModel):
    name: str = Field(min_length=1, max_length=253, description="Secret name, in the ModelEndpoint's namespace.")
    key: str = Field(min_length=1, max_length=253, description="Key in the Secret.")


class ResourceList(ApiModel):
    model_config = ConfigDict(alias_generator=None)
    cpu: Quantity | None = None
    memory: Quantity | None = None
    ephemeral_storage: Quantity | None = Field(None, alias="ephemeral-storage")


class Resources(ApiModel):
    requests: ResourceList | None = Field(None, description="cpu, memory, ephemeral-storage.")
    limits: ResourceList | None = Field(None, description="cpu, memory, ephemeral-storage.")


def _reserved_env_rules() -> list[dict[str, str]]:
    """spec.env must not set what the operator sets: its own variables, and the variable of
    every typed engine field (use the field: one way to say one thing)."""
    operator_names = ", ".join(f"'{n}'" for n in c.OPERATOR_SET_VARIABLES)
    engine_map = ", ".join(f"'{engine_variable(n)}': 'engine.{to_camel(n)}'" for n in ENGINE_FIELDS_BY_RULE)
    return [
        cel(f"!(self.name in [{operator_names}])",
            "spec.env must not set a variable the operator sets from the ModelEndpoint's fields: "
            + ", ".join(c.OPERATOR_SET_VARIABLES),
            message_expression="'spec.env sets ' + self.name + ', which the operator sets from the "
                               "ModelEndpoint fields (docs/operator.md)'",
            reason="FieldValueForbidden"),
        cel(f"!(self.name in {{{engine_map}}})",
            "spec.env must not set the variable of a typed engine field; set the field instead",
            message_expression=f"'spec.env sets ' + self.name + ': set ' + {{{engine_map}}}[self.name] + "
                               "' instead'",
            reason="FieldValueForbidden"),
    ]


class EnvVar(ApiModel):
    name: str = Field(min_length=1, max_length=256)
    value: str | None = None
    value_from: dict[str, Any] | None = Field(
        None, description="As in a container's env[].valueFrom (secretKeyRef, configMapKeyRef, fieldRef, "
                          "resourceFieldRef).",
        json_schema_extra=k8s(**{"x-kubernetes-preserve-unknown-fields": True}))

    model_config = ConfigDict(json_schema_extra=k8s(**{"x-kubernetes-validations": [
        cel("!(has(self.value) && has(self.valueFrom))", "env entries take value or valueFrom, not both",
            ".valueFrom", "FieldValueForbidden"),
        *_reserved_env_rules()]}))


class OptionalRef(ApiModel):
    name: str
    optional: bool | None = None


class EnvFromSource(ApiModel):
    prefix: str | None = None
    config_map_ref: OptionalRef | None = None
    secret_ref: OptionalRef | None = None


class Toleration(ApiModel):
    key: str | None = None
    operator: Literal["Exists", "Equal"] | None = None
    value: str | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    toleration_seconds: Annotated[int, Field(json_schema_extra={"format": "int64"})] | None = None


class ModelCacheSpec(ApiModel):
    """The Hugging Face cache volume (HF_HOME)."""

    claim_name: str | None = Field(None, min_length=1, max_length=253, description="An existing PVC.")
    size: Quantity | None = Field(None, description="Size of a PVC <name>-cache the operator creates and owns.")
    storage_class_name: str | None = Field(None, max_length=253, description="StorageClass of the created PVC.")
    access_mode: Literal["ReadWriteOnce", "ReadWriteMany", "ReadWriteOncePod", "ReadOnlyMany"] | None = Field(
        None, description="Access mode of the created PVC; default ReadWriteOnce (use ReadWriteMany for "
                          "replicas on several nodes).")

    model_config = ConfigDict(json_schema_extra=k8s(**{"x-kubernetes-validations": [
        cel("has(self.claimName) != has(self.size)",
            "modelCache takes either claimName (an existing PVC) or size (a PVC the operator creates), "
            "exactly one of them", ".claimName"),
        cel("!has(self.storageClassName) || has(self.size)",
            "modelCache.storageClassName applies only with modelCache.size", ".storageClassName",
            "FieldValueForbidden"),
        cel("!has(self.accessMode) || has(self.size)",
            "modelCache.accessMode applies only with modelCache.size", ".accessMode", "FieldValueForbidden"),
        # QUANTITY_PATTERN admits zero; a PVC of size zero is refused later by the API server,
        # naming the PVC's field instead of this one.
        cel("!has(self.size) || !string(self.size).matches(" + repr(ZERO_QUANTITY_PATTERN) + ")",
            "modelCache.size must be more than zero", ".size"),
    ]}))


# --- networking ----------------------------------------------------------------------------

class ServiceSpec(ApiModel):
    type: Literal["ClusterIP", "NodePort", "LoadBalancer"] = Field("ClusterIP", description="Service type.")
    port: int = Field(80, ge=1, le=65535, description="Service port (to the container port http, 8000).")


class IngressSpec(ApiModel):
    enabled: bool = Field(False, description="Create an Ingress <name> (deleted again when set to false).")
    class_name: str | None = Field(None, max_length=253,
                                   description="IngressClass; default from the operator's settings.")
    host: str | None = Field(None, max_length=253, pattern=r"^(\*\.)?[a-z0-9]([-a-z0-9]*[a-z0-9])?"
                             r"(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$",
                             description="The rule's host; status.externalURL.")
    path: str | None = Field(None, max_length=1024, pattern=r"^/[^\s]*$",
                             description="Path prefix; default /v2/<metadata.name>/openai/v1.")
    tls_secret_name: str | None = Field(None, min_length=1, max_length=253,
                                        description="TLS Secret for host; externalURL then uses https.")
    annotations: dict[str, str] | None = Field(
        None, description="The Ingress' annotations (for the controller: timeouts, body size, ...).")

    model_config = ConfigDict(json_schema_extra=k8s(**{"x-kubernetes-validations": [
        cel("!has(self.tlsSecretName) || has(self.host)",
            "ingress.tlsSecretName requires ingress.host (TLS is served for a host name)", ".tlsSecretName",
            "FieldValueForbidden")]}))


# --- autoscaling and balancing --------------------------------------------------------------

class AutoscalingSpec(ApiModel):
    """Scale on load (requests in flight per replica), down to zero when idle."""

    min_replicas: int = Field(1, ge=0, le=1000, description="Fewest replicas; 0 scales to zero when idle "
                                                            "(the gateway wakes it).")
    max_replicas: int = Field(ge=1, le=1000, description="Most replicas.")
    target_requests: int = Field(8, ge=1, le=100000,
                                 description="Requests in flight per replica (running plus waiting in the engine, "
                                             "plus those a gateway holds) the autoscaler aims at.")
    scale_down_delay_seconds: int = Field(300, ge=0, le=86400,
                                          description="How long the load must stay low before a replica goes "
                                                      "(and before zero).")

    model_config = ConfigDict(json_schema_extra=k8s(**{"x-kubernetes-validations": [
        cel("self.minReplicas <= self.maxReplicas", "autoscaling.minReplicas must be at most autoscaling.maxReplicas",
            ".minReplicas")]}))


class PrefixHashSpec(ApiModel):
    mean_load_percentage: int = Field(125, ge=100, le=1000,
                                      description="A replica keeps a prefix while its load is at most this "
                                                  "percentage of the mean load.")
    replication: int = Field(256, ge=1, le=4096, description="Points per replica on the hash ring.")
    prefix_char_length: int = Field(100, ge=1, le=100000,
                                    description="Characters of the prompt's start that are hashed.")


class LoadBalancingSpec(ApiModel):
    """How the gateway spreads a model's requests over its ready replicas."""

    strategy: Literal["LeastRequests", "PrefixHash"] = Field(
        "LeastRequests", description="LeastRequests: the replica with the fewest outstanding requests. "
                                     "PrefixHash: consistent hashing with bounded load on the start of the "
                                     "prompt, so requests sharing a prefix reuse one replica's prefix cache.")
    prefix_hash: PrefixHashSpec = Field(default_factory=PrefixHashSpec,
                                        json_schema_extra=k8s(default={}))


# --- what the model does, and its adapters -------------------------------------------------

class AdapterSpec(ApiModel):
    """A LoRA adapter served under its own model name, on top of the base model."""

    name: str = Field(min_length=1, max_length=256, pattern=r"^[A-Za-z0-9][A-Za-z0-9._/:-]*$",
                      description="The model name clients send for this adapter; /models lists it with parent "
                                  "the served model name.")
    source: str = Field(min_length=1, max_length=1024,
                        description="A Hugging Face model id (downloaded into the model cache) or a folder on the "
                                    "model-cache volume.")


# spec.task -> the vLLM options it sets (unset: vLLM decides from the model).
TASK_OPTIONS: dict[str, dict[str, str]] = {
    "generate": {"RUNNER": "generate"},
    "embed": {"RUNNER": "pooling", "CONVERT": "embed"},
    "classify": {"RUNNER": "pooling", "CONVERT": "classify"},
}


# --- the spec --------------------------------------------------------------------------------

class ModelEndpointSpec(ApiModel):
    model: str = Field(min_length=1, max_length=512,
                       description="Hugging Face model id or a path inside the container (MODEL_NAME).")
    served_model_name: str | None = Field(
        None, min_length=1, max_length=256,
        description="The model name clients send and /models lists (OPENAI_SERVED_MODEL_NAME_OVERRIDE); "
                    "default the model.")
    response_role: str = Field("assistant", min_length=1, max_length=64,
                               description="Role of generated chat messages (OPENAI_RESPONSE_ROLE).")
    raw_openai_output: bool = Field(True, alias="rawOpenAIOutput",
                                    description="true: streams are OpenAI server-sent events; false: NDJSON "
                                                "(RAW_OPENAI_OUTPUT).")
    replicas: Int32 = Field(1, ge=0, le=1000,
                            description="Runtime pods (also set through the scale subresource). Ignored with "
                                        "autoscaling, which then owns the count.")
    gpus: Int32 = Field(1, ge=0, le=64, description="GPUs per replica, the container limit of gpuResourceName; "
                                                    "0 runs without a GPU (and without the GPU toleration).")
    gpu_resource_name: str = Field(
        "nvidia.com/gpu", max_length=253,
        # An extended resource: a domain-qualified name (a bare "gpu" is no resource the kubelet
        # knows, and "memory" or "cpu" would replace the container's own limit with the GPU count).
        pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/"
                r"[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$",
        description="Extended resource name of the GPU device plugin (domain-qualified, e.g. nvidia.com/gpu, "
                    "amd.com/gpu).")
    engine: EngineSpec = Field(default_factory=EngineSpec, description="vLLM engine options.",
                               json_schema_extra=k8s(default={}))
    image: str | None = Field(None, min_length=1, max_length=1024,
                              description="Runtime image; default from the operator's settings.")
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] | None = Field(
        None, description="Default from the operator's settings.")
    image_pull_secrets: list[LocalObjectReference] | None = Field(
        None, max_length=16, description="The pod's imagePullSecrets ([{name}]), for a private registry.",
        json_schema_extra=k8s(**{"x-kubernetes-list-type": "map",
                                                      "x-kubernetes-list-map-keys": ["name"]}))
    resources: Resources | None = Field(
        None, description="CPU, memory and ephemeral-storage requests and limits of the runtime container "
                          "(GPUs come from gpus).")
    env: list[EnvVar] | None = Field(
        None, max_length=256,
        description="Extra environment variables of the runtime container, e.g. any vLLM option by its "
                    "variable (ENABLE_CHUNKED_PREFILL) or VLLM_* settings. Variables the operator sets are refused.",
        json_schema_extra=k8s(**{"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]}))
    env_from: list[EnvFromSource] | None = Field(None, max_length=64,
                                                 description="The container's envFrom (configMapRef, secretRef).")
    hf_token_secret_ref: SecretKeyRef | None = Field(
        None, description="Secret key holding the Hugging Face token (HF_TOKEN, through secretKeyRef).")
    api_key_secret_ref: SecretKeyRef | None = Field(
        None, description="Secret key holding the API key(s) clients must send: one, or several separated by "
                          "commas or newlines (rotation). Mounted as a file the runtime re-reads, so a change "
                          "reaches running replicas without a restart.")
    allow_unauthenticated: bool = Field(
        False, description="Allow publishing the endpoint (ingress.enabled, or service.type LoadBalancer or "
                           "NodePort, or a gateway published outside the cluster) without apiKeySecretRef: "
                           "anyone who reaches it can use the model.")
    model_cache: ModelCacheSpec | None = Field(
        None, description="Hugging Face cache volume (HF_HOME): an existing PVC (claimName) or one the operator "
                          "creates (size). Without it, an emptyDir.")
    shm_size: Quantity = Field("8Gi", description="Size of the memory-backed /dev/shm.")
    drain_timeout_seconds: int = Field(
        30, ge=0, le=3600, description="Time the runtime gets to finish requests after SIGTERM "
                                       "(DRAIN_TIMEOUT_SECONDS); the pod's grace period covers it.")
    node_selector: dict[str, str] | None = Field(None, description="The pod's nodeSelector.")
    tolerations: list[Toleration] | None = Field(
        None, max_length=64, description="The pod's tolerations; a GPU pod also gets the toleration of the "
                                         "GPU nodes' taint (<gpuResourceName> Exists, NoSchedule).")
    affinity: dict[str, Any] | None = Field(
        None, description="As a pod's spec.affinity (nodeAffinity, podAffinity, podAntiAffinity).",
        json_schema_extra=k8s(**{"x-kubernetes-preserve-unknown-fields": True}))
    priority_class_name: str | None = Field(None, max_length=253, pattern=DNS_SUBDOMAIN_PATTERN,
                                            description="The pod's PriorityClass.")
    runtime_class_name: str | None = Field(None, max_length=253, pattern=DNS_SUBDOMAIN_PATTERN,
                                           description="The pod's RuntimeClass.")
    service: ServiceSpec = Field(default_factory=ServiceSpec, description="The Service <name> in front of the pods.",
                                 json_schema_extra=k8s(default={}))
    ingress: IngressSpec = Field(default_factory=IngressSpec, description="An optional Ingress <name>.",
                                 json_schema_extra=k8s(default={}))
    autoscaling: AutoscalingSpec | None = Field(
        None, description="Scale on load between minReplicas and maxReplicas (replicas is then ignored).")
    task: Literal["generate", "embed", "classify"] | None = Field(
        None, description="What the model serves: generate (chat and completions), embed (/embeddings, /score, "
                          "/rerank with cosine similarity) or classify (/classify, and /score, /rerank with a "
                          "cross-encoder); sets vLLM's runner and converter (RUNNER, CONVERT). Unset: vLLM "
                          "decides from the model.")
    adapters: list[AdapterSpec] | None = Field(
        None, max_length=64,
        description="LoRA adapters, each served under its own name. Adding or removing one loads or unloads it on "
                    "the running replicas without a restart (a ConfigMap the runtime re-reads); the field's first "
                    "appearance enables LoRA and rolls the pods once.",
        json_schema_extra=k8s(**{"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]}))
    load_balancing: LoadBalancingSpec = Field(default_factory=LoadBalancingSpec,
                                              json_schema_extra=k8s(default={}))

    model_config = ConfigDict(json_schema_extra=k8s(**{"x-kubernetes-validations": [
        # Without GPUs a replica is one CPU engine: tensorParallelSize 1 (the runtime's default) is fine.
        cel("!has(self.engine.tensorParallelSize) || "
            "self.engine.tensorParallelSize <= (self.gpus > 0 ? self.gpus : 1)",
            "engine.tensorParallelSize must be at most gpus (the GPUs of one replica), or 1 without GPUs",
            ".engine.tensorParallelSize"),
        cel("!(self.ingress.enabled || self.service.type in ['LoadBalancer', 'NodePort']) || "
            "has(self.apiKeySecretRef) || self.allowUnauthenticated",
            "a ModelEndpoint reachable from outside the cluster (ingress.enabled, or service.type LoadBalancer "
            "or NodePort) needs apiKeySecretRef, or allowUnauthenticated: true to publish it without a key",
            ".apiKeySecretRef", "FieldValueRequired"),
        cel("!has(self.adapters) || self.adapters.all(a, a.name != (has(self.servedModelName) ? "
            "self.servedModelName : self.model))",
            "an adapter's name must differ from the served model name", ".adapters"),
        cel("!has(self.engine.enableAutoToolChoice) || !self.engine.enableAutoToolChoice || "
            "has(self.engine.toolCallParser)",
            "engine.enableAutoToolChoice needs engine.toolCallParser (how to read tool calls from the output)",
            ".engine.toolCallParser", "FieldValueRequired"),
        cel("!has(self.hfTokenSecretRef) || !has(self.env) || !self.env.exists(e, e.name == 'HF_TOKEN')",
            "spec.env sets HF_TOKEN, which hfTokenSecretRef sets too: keep one of them", ".env",
            "FieldValueForbidden"),
    ]}))

    # --- derived values (one place each) ---

    @property
    def served_name(self) -> str:
        return self.served_model_name or self.model

    @property
    def tensor_parallel(self) -> int | None:
        """engine.tensorParallelSize, else gpus; None without GPUs (the runtime's default, 1)."""
        if self.engine.tensor_parallel_size is not None:
            return self.engine.tensor_parallel_size
        return self.gpus if self.gpus > 0 else None

    @property
    def published(self) -> bool:
        """Reachable from outside the cluster."""
        return self.ingress.enabled or self.service.type in ("LoadBalancer", "NodePort")


# --- status -------------------------------------------------------------------------------

Phase = Literal["Pending", "Progressing", "Ready", "Degraded", "Failed"]
PHASES: tuple[str, ...] = Phase.__args__  # type: ignore[attr-defined]
Int64 = Annotated[int, Field(json_schema_extra={"format": "int64"})]


class Condition(ApiModel):
    type: str
    status: Literal["True", "False", "Unknown"]
    reason: str | None = None
    message: str | None = None
    last_transition_time: Annotated[str, WithJsonSchema({"type": "string", "format": "date-time"})] | None = None
    observed_generation: Int64 | None = None


class AutoscalingStatus(ApiModel):
    desired_replicas: Int32 | None = Field(None, description="The autoscaler's replica count.")
    load: float | None = Field(None, description="Requests in flight seen at the last decision (engine running "
                                                 "and waiting, plus held by gateways).")
    last_scale_time: Annotated[str, WithJsonSchema({"type": "string", "format": "date-time"})] | None = None
    last_active_time: Annotated[str, WithJsonSchema({"type": "string", "format": "date-time"})] | None = Field(
        None, description="When requests were last in flight or held (the idle clock's start).")
    message: str | None = None


class AdapterStatus(ApiModel):
    name: str
    loaded_replicas: Int32 = Field(0, description="Ready replicas that have it loaded.")
    message: str | None = Field(None, description="vLLM's reason when a replica could not load it.")


class ModelEndpointStatus(ApiModel):
    phase: Phase | None = None
    message: str | None = None
    replicas: Int32 | None = None
    ready_replicas: Int32 | None = None
    available_replicas: Int32 | None = None
    updated_replicas: Int32 | None = None
    ready: str | None = Field(None, description="ready/desired replicas, for display.")
    selector: str | None = Field(None, description="Label selector of the runtime pods (scale subresource).")
    served_model_name: str | None = None
    url: str | None = Field(None, description="In-cluster OpenAI base URL (ends in /openai/v1).")
    external_url: str | None = Field(None, alias="externalURL", description="OpenAI base URL through the ingress host.")
    observed_generation: Int64 | None = None
    autoscaling: AutoscalingStatus | None = None
    adapters: list[AdapterStatus] | None = Field(
        None, description="Each adapter of spec.adapters: on how many ready replicas it is loaded, and why not.",
        json_schema_extra=k8s(**{"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]}))
    conditions: list[Condition] | None = Field(
        None, json_schema_extra=k8s(**{"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]}))


class Endpoint(BaseModel):
    """A ModelEndpoint as the operator reads it: identity, typed spec, raw status."""

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)

    name: str
    namespace: str
    uid: str
    generation: int
    spec: ModelEndpointSpec
    status: dict[str, Any]
    annotations: dict[str, str] = Field(default_factory=dict)
    creation_timestamp: str | None = None
    deleting: bool = False
    api_version: str = c.API_VERSION
    kind: str = c.KIND

    @classmethod
    def from_body(cls, body: Any) -> Endpoint:
        """Parse an object as the API server returns it; raises pydantic's ValidationError."""
        meta = body.get("metadata") or {}
        return cls(name=meta["name"], namespace=meta["namespace"], uid=meta.get("uid") or "",
                   generation=int(meta.get("generation") or 0),
                   spec=ModelEndpointSpec.model_validate(dict(body.get("spec") or {})),
                   status=dict(body.get("status") or {}),
                   annotations=dict(meta.get("annotations") or {}),
                   creation_timestamp=meta.get("creationTimestamp"),
                   deleting=bool(meta.get("deletionTimestamp")),
                   api_version=body.get("apiVersion") or c.API_VERSION, kind=body.get("kind") or c.KIND)

    @property
    def key(self) -> tuple[str, str]:
        return (self.namespace, self.name)

    def involved(self) -> dict[str, str]:
        """The object reference of an Event about this ModelEndpoint."""
        return {"apiVersion": self.api_version, "kind": self.kind, "name": self.name,
                "namespace": self.namespace, "uid": self.uid}


def default_ingress_path(name: str) -> str:
    return f"/v2/{name}/openai/v1"
