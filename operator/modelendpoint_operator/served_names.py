"""Who owns a served model name: one pure rule shared by the operator and the gateway.

Two ModelEndpoints in one scope (the namespaces a gateway serves, or an
operator watches) may announce the same ``status.servedModelName``. Exactly
one of them gets the name's traffic: among those not being deleted, the one
with the oldest ``metadata.creationTimestamp``; ties (timestamps have second
resolution) go to the smallest ``(namespace, name)``. The operator sets the
condition ``Routable=False`` (reason ``ServedNameConflict``) on the others;
the gateway routes the name to the owner only. Both call the functions here,
so they can never disagree about the winner.

A ModelEndpoint without ``status.servedModelName`` (no status written yet)
claims nothing. Plain functions on the objects as the API server returns them
(dicts); no I/O.

LoRA adapters (``spec.adapters: [{name, source}]``) are served under their own
names, so their names are claims too, by the same rule: :func:`name_claims`,
:func:`name_owners` and :func:`name_conflicts` treat a ModelEndpoint's served
name and each of its adapters' names as claims of that ModelEndpoint (with its
creation time), and each name -- a served name or an adapter's -- has one
owner. Only a ModelEndpoint that claims its served name (it has a status, it
is not being deleted) claims its adapters' names. :func:`claim_of`,
:func:`owners` and :func:`conflicts` keep looking at served names only.

A published gateway (reachable from outside the cluster) serves no keyless
model that did not opt in with ``allowUnauthenticated``:
:func:`withheld_from_public_gateway` is that rule, for the gateway's 403 and
the operator's ``Routable=False`` (reason ``KeyRequired``) alike.
"""

from __future__ import annotations

import datetime
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

# Objects without a parsable creationTimestamp sort after every real one.
_NEVER = datetime.datetime.max.replace(tzinfo=datetime.UTC)


@dataclass(frozen=True, order=True)
class Claim:
    """One ModelEndpoint's claim on a name; ordering = precedence (smallest wins).

    ``served_name`` is the name claimed: the ModelEndpoint's served model name,
    or with ``adapter`` one of its adapters' names (``adapter`` takes no part in
    the precedence: one ModelEndpoint claims a name once).
    """

    created: datetime.datetime
    namespace: str
    name: str
    served_name: str
    adapter: bool = field(default=False, compare=False)

    @property
    def key(self) -> tuple[str, str]:
        return (self.namespace, self.name)


def parse_timestamp(value: Any) -> datetime.datetime:
    """An RFC 3339 time as the API server writes it (``2026-01-02T03:04:05Z``), UTC-aware."""
    if isinstance(value, datetime.datetime):
        return value if value.tzinfo else value.replace(tzinfo=datetime.UTC)
    if not isinstance(value, str) or not value:
        return _NEVER
    text = value.strip()
    if text.endswith(("Z", "z")):
        text = text[:-1] + "+00:00"
    try:
        parsed = datetime.datetime.fromisoformat(text)
    except ValueError:
        return _NEVER
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=datetime.UTC)


def claim_of(obj: Mapping[str, Any]) -> Claim | None:
    """The claim of one ModelEndpoint object, or None when it claims nothing."""
    meta = obj.get("metadata") or {}
    if meta.get("deletionTimestamp"):
        return None
    served = (obj.get("status") or {}).get("servedModelName")
    if not isinstance(served, str) or not served:
        return None
    return Claim(parse_timestamp(meta.get("creationTimestamp")), str(meta.get("namespace") or ""),
                 str(meta.get("name") or ""), served)


def adapter_names(obj: Mapping[str, Any]) -> tuple[str, ...]:
    """The names of a ModelEndpoint's ``spec.adapters``, in order, each once (malformed entries skipped)."""
    out: list[str] = []
    adapters = (obj.get("spec") or {}).get("adapters")
    for entry in adapters if isinstance(adapters, list) else ():
        name = entry.get("name") if isinstance(entry, Mapping) else None
        if isinstance(name, str) and name and name not in out:
            out.append(name)
    return tuple(out)


def name_claims(obj: Mapping[str, Any]) -> tuple[Claim, ...]:
    """Every name one ModelEndpoint claims: its served name first, then its adapters' names.

    Empty when it claims no served name (no status yet, or being deleted). An
    adapter named like the served name (the CRD refuses it) adds nothing.
    """
    base = claim_of(obj)
    if base is None:
        return ()
    return (base, *(Claim(base.created, base.namespace, base.name, a, adapter=True)
                    for a in adapter_names(obj) if a != base.served_name))


def name_owners(objects: Iterable[Mapping[str, Any]]) -> dict[str, Claim]:
    """Every claimed name (served names and adapters' names) -> the claim that owns it."""
    best: dict[str, Claim] = {}
    for obj in objects:
        for claim in name_claims(obj):
            current = best.get(claim.served_name)
            if current is None or claim < current:
                best[claim.served_name] = claim
    return best


def name_conflicts(objects: Iterable[Mapping[str, Any]]) -> dict[tuple[str, str], dict[str, tuple[str, str]]]:
    """(namespace, name) of each ModelEndpoint that loses a name it claims -> {that name: the owner's key}.

    A name lost is either its served name (the Routable condition of
    :func:`conflicts`) or one of its adapters' names (that adapter gets no
    gateway traffic by that name).
    """
    objs = list(objects)
    owner_of = name_owners(objs)
    out: dict[tuple[str, str], dict[str, tuple[str, str]]] = {}
    for obj in objs:
        for claim in name_claims(obj):
            owner = owner_of[claim.served_name]
            if owner.key != claim.key:
                out.setdefault(claim.key, {})[claim.served_name] = owner.key
    return out


def winner(claims: Iterable[Claim]) -> Claim | None:
    """The claim that owns the name among ``claims`` (all for the same name)."""
    return min(claims, default=None)


def owners(objects: Iterable[Mapping[str, Any]]) -> dict[str, tuple[str, str]]:
    """served name -> (namespace, name) of the ModelEndpoint that owns it."""
    best: dict[str, Claim] = {}
    for obj in objects:
        claim = claim_of(obj)
        if claim is None:
            continue
        current = best.get(claim.served_name)
        if current is None or claim < current:
            best[claim.served_name] = claim
    return {name: claim.key for name, claim in best.items()}


def conflicts(objects: Iterable[Mapping[str, Any]]) -> dict[tuple[str, str], tuple[str, str]]:
    """(namespace, name) of each ModelEndpoint that loses its served name -> the owner's.

    The operator sets ``Routable=False`` with reason ``ServedNameConflict`` on
    exactly these, naming the owner in the message; every other ModelEndpoint
    with a served name is routable.
    """
    objs = list(objects)
    owner_of = owners(objs)
    out: dict[tuple[str, str], tuple[str, str]] = {}
    for obj in objs:
        claim = claim_of(obj)
        if claim is not None and owner_of[claim.served_name] != claim.key:
            out[claim.key] = owner_of[claim.served_name]
    return out


def conflict_message(served_name: str, owner: tuple[str, str]) -> str:
    """The text of the ``Routable=False`` condition (one wording for the operator and the docs)."""
    return (f"served model name {served_name!r} is owned by ModelEndpoint {owner[0]}/{owner[1]} "
            "(the oldest one with that name); this one gets no gateway traffic")


def withheld_from_public_gateway(gateway_public: bool, has_key: bool, allow_unauthenticated: bool) -> bool:
    """A published gateway serves no keyless model that did not opt in (the gateway's 403, the operator's condition)."""
    return gateway_public and not has_key and not allow_unauthenticated


def key_required_message(served_name: str) -> str:
    """Why a keyless model gets no traffic from a published gateway (its 403 and the Routable condition)."""
    return (f"the model `{served_name}` has no API key (apiKeySecretRef), and the gateway is reachable from "
            "outside the cluster: its ModelEndpoint needs apiKeySecretRef, or allowUnauthenticated: true to be "
            "published without a key")


def adapter_conflict_message(adapter: str, owner: tuple[str, str]) -> str:
    """Why an adapter's name gets no gateway traffic here (the same rule as served names)."""
    return (f"adapter name {adapter!r} is claimed first by ModelEndpoint {owner[0]}/{owner[1]} "
            "(the oldest one claiming that name); the gateway routes that name there, not to this adapter")
