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
READY_PATH = "/ready"
HEALTH_PATH = "/health"
HF_HOME = "/var/cache/huggingface"
SHM_PATH = "/dev/shm"
CACHE_VOLUME = "model-cache"
SHM_VOLUME = "dshm"
PVC_SUFFIX = "-cache"

# Pod lifecycle: the preStop sleep lets endpoints/ingress stop routing before
# SIGTERM; the grace period covers preStop + the runtime's drain + a margin.
PRESTOP_SLEEP_SECONDS = 5
GRACE_MARGIN_SECONDS = 10
# A large model can take long to download and load: allow two hours.
STARTUP_PERIOD_SECONDS = 10
STARTUP_FAILURE_THRESHOLD = 720
# Non-root identity of the runtime container (the runtime image runs as this uid).
RUNTIME_UID = 10001
RUNTIME_GID = 10001

ANNOTATION_PREFIX = GROUP
