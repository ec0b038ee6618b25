"""Names shared by the CRD, the operator and its children (the Helm chart relies on them)."""

from __future__ import annotations

GROUP = "serving.modelendpoint.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "ModelEndpoint"
PLURAL = "modelendpoints"

OPERATOR_NAME = "modelendpoint-operator"
# Server-side apply field manager: every child field the operator sets is owned by it.
FIELD_MANAGER = OPERATOR_NAME

# Labels on every child (and on the runtime pods through the pod template).
LABEL_NAME = "app.kubernetes.io/name"
LABEL_INSTANCE = "app.kubernetes.io/instance"
LABEL_COMPONENT = "app.kubernetes.io/component"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
LABEL_ENDPOINT = f"{GROUP}/endpoint"  # the owning ModelEndpoint's name

NAME_VALUE = "modelendpoint-runtime"
COMPONENT_VALUE = "model-server"
MANAGED_BY_VALUE = OPERATOR_NAME

# The runtime container's contract (runtime/): port, probe paths, cache folder.
RUNTIME_CONTAINER = "runtime"
RUNTIME_PORT = 8000
RUNTIME_PORT_NAME = "http"
# Prometheus metrics without a key (autoscaler scrapes); not exposed by the Service.
RUNTIME_METRICS_PORT = 9400
RUNTIME_METRICS_PORT_NAME = "metrics"
# The API keys, as a file projected from the apiKeySecretRef Secret (API_KEY_FILE).
API_KEY_VOLUME = "api-key"
API_KEY_DIR = "/etc/modelendpoint/api-key"
API_KEY_FILE_NAME = "keys"
API_KEY_FILE = f"{API_KEY_DIR}/{API_KEY_FILE_NAME}"
# A chat template from a ConfigMap (engine.chatTemplate.configMapRef).
CHAT_TEMPLATE_VOLUME = "chat-template"
CHAT_TEMPLATE_DIR = "/etc/modelendpoint/chat-template"
CHAT_TEMPLATE_FILE_NAME = "template.jinja"
# LoRA adapters: a ConfigMap <name>-adapters the runtime re-reads (ADAPTERS_FILE).
ADAPTERS_SUFFIX = "-adapters"
ADAPTERS_VOLUME = "adapters"
ADAPTERS_DIR = "/etc/modelendpoint/adapters"
ADAPTERS_FILE_NAME = "adapters.json"
ADAPTERS_FILE = f"{ADAPTERS_DIR}/{ADAPTERS_FILE_NAME}"
READY_PATH = "/ready"
HEALTH_PATH = "/health"
HF_HOME = "/var/cache/huggingface"
SHM_PATH = "/dev/shm"
CACHE_VOLUME = "model-cache"
SHM_VOLUME = "dshm"
# The root filesystem is read-only: what vLLM, torch and Triton write outside the model
# cache (their caches under $HOME, temporary files) goes to these two emptyDirs. The home
# is the runtime image's (Dockerfile.runtime), set as HOME for images that differ.
TMP_VOLUME = "tmp"
TMP_PATH = "/tmp"
HOME_VOLUME = "home"
RUNTIME_HOME = "/home/modelendpoint"
PVC_SUFFIX = "-cache"

# Pod lifecycle: the preStop sleep lets endpoints/ingress stop routing before
# SIGTERM; the grace period covers preStop + the runtime's drain + a margin.
PRESTOP_SLEEP_SECONDS = 5
GRACE_MARGIN_SECONDS = 10
# A large model can take long to download and load: allow two hours. Probed every
# second: the kubelet marks the pod Ready (and the gateway routes a wake's held
# requests to it) at most a second after the model is loaded, not ten.
STARTUP_PERIOD_SECONDS = 1
STARTUP_FAILURE_THRESHOLD = 7200
# Non-root identity of the runtime container (the runtime image runs as this uid).
RUNTIME_UID = 10001
RUNTIME_GID = 10001

ANNOTATION_PREFIX = GROUP
# Failed for want of another object (a Secret or key not there yet, a child's name taken by
# someone else's object): neither is watched, so the ModelEndpoint is looked at again this
# often until it is fixed (or at once, on any change of it).
FAILED_RECHECK_SECONDS = 30
RECHECKED_FAILURES = frozenset({"SecretNotFound", "SecretKeyNotFound", "NameInUse"})
# On each child: a digest of the manifest the operator last applied. A field dropped from the
# spec leaves nothing missing from the live child (that check only catches what others
# changed), so this is what says the child is out of date and must be applied again.
APPLIED_DIGEST_ANNOTATION = f"{GROUP}/applied-digest"

# Runtime variables the operator always sets from the ModelEndpoint's own fields: the
# CRD refuses them in spec.env (a user value would break routing, auth or the probes).
OPERATOR_SET_VARIABLES: tuple[str, ...] = (
    "MODEL_NAME", "OPENAI_SERVED_MODEL_NAME_OVERRIDE", "ENDPOINT_ID", "HOST", "PORT", "METRICS_PORT",
    "OPENAI_RESPONSE_ROLE", "RAW_OPENAI_OUTPUT", "DRAIN_TIMEOUT_SECONDS", "HF_HOME", "API_KEY",
    "API_KEY_FILE", "VLLM_EXTRA_ARGS", "TENSOR_PARALLEL_SIZE", "CHAT_TEMPLATE", "RUNNER", "CONVERT",
    "ADAPTERS_FILE", "ENABLE_LORA",
)
# vLLM options the runtime refuses (it sets them itself, or they configure vLLM's own HTTP
# server or launcher, which the runtime replaces), in every spelling vLLM's parser takes:
# long, short (-asc) and negated (--no-...), and -h/--help, which would print the usage
# and stop the engine. Refused in engine.extraArgs by the CRD, as the runtime refuses them
# in VLLM_EXTRA_ARGS. tests/unit/test_operator_crd.py checks this list against vLLM's
# parser (the option strings of the runtime's refused options).
RUNTIME_OWNED_OPTIONS: tuple[str, ...] = (
    "-h", "--help", "--host", "--port", "--api-key", "--served-model-name", "--model", "--config",
    "--response-role", "--allow-credentials", "--no-allow-credentials", "--allowed-headers",
    "--allowed-methods", "--allowed-origins", "--api-server-count", "-asc",
    "--data-parallel-supervisor-port", "--disable-access-log-for-endpoints", "--disable-fastapi-docs",
    "--no-disable-fastapi-docs", "--disable-uvicorn-access-log", "--no-disable-uvicorn-access-log",
    "--dp-supervisor-probe-failure-threshold", "--dp-supervisor-probe-interval-s",
    "--dp-supervisor-probe-timeout-s", "--enable-offline-docs", "--no-enable-offline-docs",
    "--enable-request-id-headers", "--no-enable-request-id-headers", "--enable-scale-out",
    "--no-enable-scale-out", "--enable-ssl-refresh", "--no-enable-ssl-refresh",
    "--enable-tokenizer-info-endpoint", "--no-enable-tokenizer-info-endpoint", "--grpc", "--grpc-port",
    "--h11-max-header-count", "--h11-max-incomplete-event-size", "--headless", "--middleware",
    "--root-path", "--ssl-ca-certs", "--ssl-cert-reqs", "--ssl-certfile", "--ssl-ciphers", "--ssl-keyfile",
    "--tokens-only", "--no-tokens-only", "--uds", "--uvicorn-log-level",
)
