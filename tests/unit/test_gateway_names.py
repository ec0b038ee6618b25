"""Adapter names in the shared served-name rule (operator/served_names.py), as the gateway uses it.

The served-name functions the operator's Routable condition calls (owners,
conflicts) must not change; the name_* functions add adapters' names as
claims under the same rule.
"""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from modelendpoint_operator import served_names as sn


def obj(ns: str, name: str, served: str | None, created: str = "2026-01-01T00:00:00Z", deleting: bool = False,
        adapters: list[str] | None = None) -> dict:
    meta = {"namespace": ns, "name": name, "creationTimestamp": created}
    if deleting:
        meta["deletionTimestamp"] = "2026-01-02T00:00:00Z"
    out: dict = {"metadata": meta, "spec": {"model": "m"}}
    if adapters is not None:
        out["spec"]["adapters"] = [{"name": a, "source": f"hf/{a}"} for a in adapters]
    if served is not None:
        out["status"] = {"servedModelName": served}
    return out


def test_adapter_names_skip_malformed_entries_and_repeats():
    body = obj("a", "e", "m")
    body["spec"]["adapters"] = [{"name": "x"}, {"name": ""}, {"source": "s"}, "junk", {"name": 3}, {"name": "x"},
                                {"name": "y"}]
    assert sn.adapter_names(body) == ("x", "y")
    assert sn.adapter_names({"spec": {"adapters": "nope"}}) == ()
    assert sn.adapter_names({}) == ()


def test_name_claims_served_name_first_then_adapters():
    claims = sn.name_claims(obj("a", "e", "m", adapters=["m-sql", "m", "m-chat"]))
    assert [(c.served_name, c.adapter) for c in claims] == [("m", False), ("m-sql", True), ("m-chat", True)]
    assert {c.key for c in claims} == {("a", "e")} and len({c.created for c in claims}) == 1
    assert sn.name_claims(obj("a", "e", None, adapters=["x"])) == ()
    assert sn.name_claims(obj("a", "e", "m", deleting=True, adapters=["x"])) == ()


def test_the_oldest_claim_owns_a_name_served_or_adapter():
    objs = [obj("b", "young", "shared", "2026-01-02T00:00:00Z", adapters=["young-only"]),
            obj("a", "old", "base", "2026-01-01T00:00:00Z", adapters=["shared"])]
    owners = sn.name_owners(objs)
    assert {n: c.key for n, c in owners.items()} == {
        "base": ("a", "old"), "shared": ("a", "old"), "young-only": ("b", "young")}
    assert owners["shared"].adapter and not owners["base"].adapter
    assert sn.name_conflicts(objs) == {("b", "young"): {"shared": ("a", "old")}}
    # The served-name functions the operator calls are unchanged: adapters play no part there.
    assert sn.owners(objs) == {"shared": ("b", "young"), "base": ("a", "old")}
    assert sn.conflicts(objs) == {}
    assert "a/old" in sn.adapter_conflict_message("shared", ("a", "old"))


names = st.sampled_from(["m1", "m2", "m3"])
objects = st.lists(st.builds(obj, st.sampled_from(["a", "b"]), st.sampled_from(["x", "y", "z", "w"]),
                             st.one_of(st.none(), names),
                             st.sampled_from(["2026-01-01T00:00:00Z", "2026-01-01T00:00:01Z"]), st.booleans(),
                             st.one_of(st.none(), st.lists(names, max_size=3))),
                   max_size=8, unique_by=lambda o: (o["metadata"]["namespace"], o["metadata"]["name"]))


@given(objects)
def test_one_owner_per_name_order_free_and_served_names_agree_without_adapters(objs):
    owners = sn.name_owners(objs)
    assert owners == sn.name_owners(list(reversed(objs)))
    claimed = {c.served_name for o in objs for c in sn.name_claims(o)}
    assert set(owners) == claimed
    losers = sn.name_conflicts(objs)
    for o in objs:
        for c in sn.name_claims(o):
            assert (c.served_name in losers.get(c.key, {})) != (owners[c.served_name].key == c.key)
    plain = [{**o, "spec": {"model": "m"}} for o in objs]
    assert {n: c.key for n, c in sn.name_owners(plain).items()} == sn.owners(plain)
    assert {k: next(iter(v.values())) for k, v in sn.name_conflicts(plain).items()} == sn.conflicts(plain)
