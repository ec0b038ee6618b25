"""The ``modelendpoint-operator`` console script: settings, logging, then kopf.

Configuration is by ``MEP_OPERATOR_*`` environment variables (docs/operator.md);
a bad one prints one line naming it and exits with status 2.
"""

from __future__ import annotations

import getpass
import logging
import os
import socket
import sys

import kopf

from . import __version__
from .settings import SettingsError, load_settings

USAGE = """usage: modelendpoint-operator [--help] [--version]

Runs the ModelEndpoint operator (kopf). Configured by environment variables:
MEP_OPERATOR_NAMESPACES, MEP_OPERATOR_DEFAULT_RUNTIME_IMAGE, MEP_OPERATOR_DEFAULT_INGRESS_CLASS,
MEP_OPERATOR_LOG_LEVEL, MEP_OPERATOR_LOG_FORMAT, MEP_OPERATOR_METRICS_PORT,
MEP_OPERATOR_LIVENESS_PORT, MEP_OPERATOR_STANDALONE, MEP_OPERATOR_PEERING_NAME,
MEP_OPERATOR_PEERING_PRIORITY, ... (see docs/operator.md). The Kubernetes API is
reached through $KUBECONFIG, ~/.kube/config or the in-cluster service account."""


def _quiet_event_handlers(record: logging.LogRecord) -> bool:
    """Drop kopf's "Handler 'x_event' succeeded." lines: one per watch event is noise."""
    if record.levelno > logging.INFO:
        return True
    msg = str(record.msg)
    return not (msg.startswith("Handler '") and "_event' succeeded" in msg)


def peering_identity() -> str:
    """This process' kopf peering identity: the pod's name (POD_ID, from the downward API),
    else user@host/pid. Given to kopf, and known here, so the peering gate can find us."""
    pod = os.environ.get("POD_ID")
    if pod:
        return pod
    return f"{getpass.getuser()}@{socket.gethostname()}/{os.getpid()}"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args and args[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    if args and args[0] == "--version":
        print(f"modelendpoint-operator {__version__}")
        return 0
    if args:
        print(f"modelendpoint-operator: unexpected argument {args[0]!r}; settings are "
              "MEP_OPERATOR_* environment variables (see --help)", file=sys.stderr)
        return 2
    try:
        settings = load_settings(os.environ)
    except SettingsError as exc:
        print(f"modelendpoint-operator: {exc}", file=sys.stderr)
        return 2

    kopf.configure(
        debug=settings.log_level == "debug",
        log_format=kopf.LogFormat.JSON if settings.log_format == "json" else kopf.LogFormat.FULL,
        log_refkey="object",
    )
    logging.getLogger().setLevel(settings.log_level.upper())
    logging.getLogger("kopf.objects").addFilter(_quiet_event_handlers)
    for noisy in ("aiohttp.access", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    from . import handlers  # noqa: F401 - registers the handlers with kopf's default registry
    from .reconciler import Reconciler

    liveness = (f"http://{settings.bind_address}:{settings.liveness_port}/healthz"
                if settings.liveness_port else None)
    priority = settings.effective_priority()
    identity = peering_identity()
    logging.getLogger(__name__).info(
        "modelendpoint-operator %s starting (peering %s, priority %d)", __version__,
        "off" if settings.standalone else repr(settings.peering_name), priority)
    kopf.run(
        clusterwide=settings.clusterwide,
        namespaces=settings.namespace_list,
        standalone=settings.standalone,
        priority=priority,
        peering_name=settings.peering_name,
        identity=identity,  # type: ignore[arg-type]  # kopf's Identity is a NewType of str
        liveness_endpoint=liveness,
        memo=kopf.Memo(state=Reconciler(settings=settings, identity=identity, priority=priority)),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
