"""The routing table: watched ModelEndpoints and pods -> who serves which name, where.

Pure: the watch loops (discovery.py) feed it the objects as the API server
sends them; nothing here does I/O. It keeps only what routing needs of each
object (a few fields), so memory stays small with thousands of pods.

- A ModelEndpoint takes part once it has ``status.servedModelName``; among
  several with one name the served-name rule (operator/served_names.py)
  picks the owner.
- Its LoRA adapters (``spec.adapters[].name``) are names it claims too, by
  the same rule: each name, served or an adapter's, has one owner, and a
  request naming it goes to that owner's replicas.
- A pod is a replica of the ModelEndpoint named by its
  ``serving.modelendpoint.dev/endpoint`` label, in its namespace. It is ready
  when its ``Ready`` condition is True, it is not being deleted and it has a
  pod IP; its port is the container port named ``http``. Pods are read
  directly (not EndpointSlices) so that the local node's loopback pod IPs,
  which EndpointSlices refuse, work as on a real cluster.
"""

from __future__ import annotations

import datetime
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from modelendpoint_operator import constants as c
from modelendpoint_operator import served_names

Key = tuple[str, str]  # (namespace, name)

LEAST_REQUESTS = "LeastRequests"
PREFIX_HASH = "PrefixHash"

# Serving states of a ModelEndpoint, as the gateway sees it.
READY = "ready"          # at least one ready replica: forward
WAKEABLE = "wakeable"    # autoscaled, no ready replica: hold and ask for one (wake)
STARTING = "starting"    # replicas wanted, none ready yet (loading, restarting): hold
OFF = "off"              # replicas: 0 without autoscaling: switched off, 503 at once
FAILED = "failed"        # phase Failed and nothing ready: 503 at once


@dataclass(frozen=True)
class PrefixHashOptions:
    mean_load_percentage: int = 125
    replication: int = 256
    prefix_char_length: int = 100


@dataclass(frozen=True)
class EndpointInfo:
    """What routing needs of one ModelEndpoint."""

    namespace: str
    name: str
    created: datetime.datetime
    served_name: str | None
    claim: served_names.Claim | None
    # Every name claimed: the served name's claim first, then one per adapter (spec.adapters).
    claims: tuple[served_names.Claim, ...] = ()
    adapters: frozenset[str] = frozenset()  # names of spec.adapters (LoRA), served by its replicas
    phase: str | None = None
    message: str = ""
    replicas: int = 1
    autoscaling: bool = False
    min_replicas: int | None = None
    key_secret: str | None = None  # apiKeySecretRef.name
    key_field: str | None = None   # apiKeySecretRef.key
    allow_unauthenticated: bool = False  # spec.allowUnauthenticated: published without a key on purpose
    strategy: str = LEAST_REQUESTS
    prefix_hash: PrefixHashOptions = PrefixHashOptions()
    sse: bool = True               # rawOpenAIOutput: streams are SSE unless false

    @property
    def key(self) -> Key:
        return (self.namespace, self.name)

    @property
    def open(self) -> bool:
        """No apiKeySecretRef: any caller may use it (the runtime checks nothing either)."""
        return self.key_secret is None


@dataclass(frozen=True)
class PodInfo:
    """What routing needs of one runtime pod."""

    namespace: str
    name: str
    endpoint: str              # the ModelEndpoint's name (label)
    ready: bool
    host: str | None           # pod IP
    port: int | None           # container port "http"

    @property
    def key(self) -> Key:
        return (self.namespace, self.name)

    @property
    def endpoint_key(self) -> Key:
        return (self.namespace, self.endpoint)

    @property
    def routable(self) -> bool:
        return self.ready and self.host is not None and self.port is not None


def _int(value: Any, default: int) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else default


def parse_endpoint(obj: Mapping[str, Any]) -> EndpointInfo:
    """A ModelEndpoint object (as the API server returns it) -> EndpointInfo."""
    meta = obj.get("metadata") or {}
    spec = obj.get("spec") or {}
    status = obj.get("status") or {}
    served = status.get("servedModelName")
    auto = spec.get("autoscaling")
    ref = spec.get("apiKeySecretRef") or {}
    lb = spec.get("loadBalancing") or {}
    ph = lb.get("prefixHash") or {}
    key_secret = ref.get("name") if isinstance(ref, Mapping) and isinstance(ref.get("name"), str) else None
    return EndpointInfo(
        namespace=str(meta.get("namespace") or ""),
        name=str(meta.get("name") or ""),
        created=served_names.parse_timestamp(meta.get("creationTimestamp")),
        served_name=served if isinstance(served, str) and served else None,
        claim=served_names.claim_of(obj),
        claims=served_names.name_claims(obj),
        adapters=frozenset(served_names.adapter_names(obj)),
        phase=status.get("phase") if isinstance(status.get("phase"), str) else None,
        message=str(status.get("message") or ""),
        replicas=_int(spec.get("replicas"), 1),
        autoscaling=isinstance(auto, Mapping),
        min_replicas=_int(auto.get("minReplicas"), 1) if isinstance(auto, Mapping) else None,
        key_secret=key_secret or None,
        key_field=(str(ref.get("key") or "") or None) if key_secret else None,
        allow_unauthenticated=spec.get("allowUnauthenticated") is True,
        strategy=PREFIX_HASH if lb.get("strategy") == PREFIX_HASH else LEAST_REQUESTS,
        prefix_hash=PrefixHashOptions(
            mean_load_percentage=max(100, _int(ph.get("meanLoadPercentage"), 125)),
            replication=min(10_000, max(1, _int(ph.get("replication"), 256))),
            prefix_char_length=min(1_000_000, max(1, _int(ph.get("prefixCharLength"), 100))),
        ),
        sse=spec.get("rawOpenAIOutput") is not False,
    )


def _container_port(spec: Mapping[str, Any]) -> int | None:
    """The port named ``http``, preferring the runtime container's."""
    containers = [ct for ct in spec.get("containers") or [] if isinstance(ct, Mapping)]
    containers.sort(key=lambda ct: ct.get("name") != c.RUNTIME_CONTAINER)
    for ct in containers:
        for p in ct.get("ports") or []:
            if isinstance(p, Mapping) and p.get("name") == c.RUNTIME_PORT_NAME:
                port = p.get("containerPort")
                if isinstance(port, int) and 0 < port < 65536:
                    return port
    return None


def parse_pod(obj: Mapping[str, Any]) -> PodInfo | None:
    """A runtime pod -> PodInfo; None for a pod that belongs to no ModelEndpoint."""
    meta = obj.get("metadata") or {}
    labels = meta.get("labels") or {}
    endpoint = labels.get(c.LABEL_ENDPOINT)
    if labels.get(c.LABEL_MANAGED_BY) != c.MANAGED_BY_VALUE or not endpoint:
        return None
    status = obj.get("status") or {}
    ready = any(isinstance(cond, Mapping) and cond.get("type") == "Ready" and cond.get("status") == "True"
                for cond in status.get("conditions") or [])
    ip = status.get("podIP") or None
    return PodInfo(
        namespace=str(meta.get("namespace") or ""),
        name=str(meta.get("name") or ""),
        endpoint=str(endpoint),
        ready=ready and not meta.get("deletionTimestamp") and bool(ip),
        host=str(ip) if ip else None,
        port=_container_port(obj.get("spec") or {}),
    )


def serving_state(info: EndpointInfo, ready_replicas: int) -> str:
    """How a request for this ModelEndpoint is treated right now."""
    if ready_replicas > 0:
        return READY
    if info.phase == "Failed":
        return FAILED
    if info.autoscaling:
        return WAKEABLE
    if info.replicas == 0:
        return OFF
    return STARTING


class Table:
    """ModelEndpoints and pods in scope, with the served-name and endpoint-name owners.

    Every mutator returns the keys of the ModelEndpoints whose routing may have
    changed, so the caller refreshes only those.
    """

    def __init__(self) -> None:
        self.endpoints: dict[Key, EndpointInfo] = {}
        self.pods: dict[Key, PodInfo] = {}
        self._pods_of: dict[Key, set[Key]] = {}
        self._claimants: dict[str, set[Key]] = {}    # claimed name (served or adapter) -> endpoints claiming it
        self._named: dict[str, set[Key]] = {}        # metadata.name -> endpoints (for /v2/{name})
        self.owner_of_name: dict[str, Key] = {}      # claimed name (served or adapter) -> owner
        self.owner_of_endpoint_name: dict[str, Key] = {}

    # --- ModelEndpoints ---------------------------------------------------------

    def upsert_endpoint(self, info: EndpointInfo) -> set[Key]:
        old = self.endpoints.get(info.key)
        self.endpoints[info.key] = info
        changed = {info.key}
        names = {cl.served_name for cl in info.claims}
        if old is not None:
            for cl in old.claims:
                names.add(cl.served_name)
                self._claimants.get(cl.served_name, set()).discard(info.key)
        for cl in info.claims:
            self._claimants.setdefault(cl.served_name, set()).add(info.key)
        self._named.setdefault(info.name, set()).add(info.key)
        changed |= self._recompute_names(names)
        changed |= self._recompute_endpoint_name(info.name)
        return changed

    def delete_endpoint(self, key: Key) -> set[Key]:
        old = self.endpoints.pop(key, None)
        if old is None:
            return set()
        changed = {key}
        for cl in old.claims:
            self._claimants.get(cl.served_name, set()).discard(key)
        changed |= self._recompute_names({cl.served_name for cl in old.claims})
        self._named.get(old.name, set()).discard(key)
        changed |= self._recompute_endpoint_name(old.name)
        return changed

    def replace_endpoints(self, infos: Iterable[EndpointInfo], namespace: str | None) -> set[Key]:
        """A full list of one watch scope (a namespace, or all with None): drop what it no longer has."""
        fresh = {i.key: i for i in infos}
        changed: set[Key] = set()
        for key in [k for k in self.endpoints if (namespace is None or k[0] == namespace) and k not in fresh]:
            changed |= self.delete_endpoint(key)
        for info in fresh.values():
            if self.endpoints.get(info.key) != info:
                changed |= self.upsert_endpoint(info)
        return changed

    def _recompute_names(self, names: set[str]) -> set[Key]:
        changed: set[Key] = set()
        for name in names:
            keys = self._claimants.get(name) or set()
            best = served_names.winner(cl for k in keys for cl in self.endpoints[k].claims if cl.served_name == name)
            before = self.owner_of_name.get(name)
            if best is None:
                self.owner_of_name.pop(name, None)
                self._claimants.pop(name, None)
            else:
                self.owner_of_name[name] = best.key
            if before != (best.key if best else None):
                changed |= {k for k in (before, best.key if best else None) if k is not None}
        return changed

    def _recompute_endpoint_name(self, name: str) -> set[Key]:
        keys = self._named.get(name) or set()
        before = self.owner_of_endpoint_name.get(name)
        if not keys:
            self._named.pop(name, None)
            self.owner_of_endpoint_name.pop(name, None)
            return {before} if before else set()
        # The same precedence as served names: the oldest, then (namespace, name).
        best = min(keys, key=lambda k: (self.endpoints[k].created, k))
        self.owner_of_endpoint_name[name] = best
        return {k for k in (before, best) if k is not None and before != best}

    # --- pods ---------------------------------------------------------------------

    def upsert_pod(self, info: PodInfo) -> set[Key]:
        old = self.pods.get(info.key)
        if old == info:
            return set()
        self.pods[info.key] = info
        changed = {info.endpoint_key}
        if old is not None and old.endpoint_key != info.endpoint_key:
            self._pods_of.get(old.endpoint_key, set()).discard(info.key)
            changed.add(old.endpoint_key)
        self._pods_of.setdefault(info.endpoint_key, set()).add(info.key)
        return changed

    def delete_pod(self, key: Key) -> set[Key]:
        old = self.pods.pop(key, None)
        if old is None:
            return set()
        pods = self._pods_of.get(old.endpoint_key)
        if pods is not None:
            pods.discard(key)
            if not pods:
                del self._pods_of[old.endpoint_key]
        return {old.endpoint_key}

    def replace_pods(self, infos: Iterable[PodInfo], namespace: str | None) -> set[Key]:
        fresh = {i.key: i for i in infos}
        changed: set[Key] = set()
        for key in [k for k in self.pods if (namespace is None or k[0] == namespace) and k not in fresh]:
            changed |= self.delete_pod(key)
        for info in fresh.values():
            changed |= self.upsert_pod(info)
        return changed

    # --- reads ----------------------------------------------------------------------

    def ready_pods(self, key: Key) -> list[PodInfo]:
        """The routable replicas of a ModelEndpoint, by pod name (a stable order)."""
        pods = [self.pods[k] for k in self._pods_of.get(key, ())]
        return sorted((p for p in pods if p.routable), key=lambda p: p.name)

    def owns_name(self, key: Key) -> bool:
        info = self.endpoints.get(key)
        return (info is not None and info.claim is not None
                and self.owner_of_name.get(info.claim.served_name) == key)

    def names_owned(self, key: Key) -> list[str]:
        """The names a ModelEndpoint owns: its served name (if it owns it) and its adapters' it owns, in order."""
        info = self.endpoints.get(key)
        if info is None:
            return []
        return [cl.served_name for cl in info.claims if self.owner_of_name.get(cl.served_name) == key]

    def snapshot(self) -> dict[str, tuple[Key, str, list[str]]]:
        """claimed name -> (owner, state, ready addresses): the whole table, for tests and debugging."""
        out: dict[str, tuple[Key, str, list[str]]] = {}
        for name, key in sorted(self.owner_of_name.items()):
            pods = self.ready_pods(key)
            out[name] = (key, serving_state(self.endpoints[key], len(pods)),
                         [f"{p.host}:{p.port}" for p in pods])
        return out
