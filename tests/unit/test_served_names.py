"""The served-name ownership rule shared by the operator and the gateway (contract.md)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from modelendpoint_operator import served_names as sn


def obj(ns: str, name: str, served: str | None, created: str = "2026-01-01T00:00:00Z",
        deleting: bool = False) -> dict:
    meta = {"namespace": ns, "name": name, "creationTimestamp": created}
    if deleting:
        meta["deletionTimestamp"] = "2026-01-02T00:00:00Z"
    out: dict = {"metadata": meta}
    if served is not None:
        out["status"] = {"servedModelName": served}
    return out


def test_the_oldest_owns_the_name():
    objs = [obj("b", "new", "llama", "2026-01-02T00:00:00Z"), obj("z", "old", "llama", "2026-01-01T00:00:00Z")]
    assert sn.owners(objs) == {"llama": ("z", "old")}
    assert sn.conflicts(objs) == {("b", "new"): ("z", "old")}


def test_ties_go_to_the_smallest_namespace_then_name():
    same = "2026-01-01T00:00:00Z"
    objs = [obj("b", "a", "m", same), obj("a", "z", "m", same), obj("a", "y", "m", same)]
    assert sn.owners(objs) == {"m": ("a", "y")}
    assert set(sn.conflicts(objs)) == {("b", "a"), ("a", "z")}


def test_no_status_or_being_deleted_claims_nothing():
    objs = [obj("a", "old", "m", "2025-01-01T00:00:00Z", deleting=True), obj("a", "nostatus", None),
            obj("a", "young", "m", "2026-06-01T00:00:00Z")]
    assert sn.owners(objs) == {"m": ("a", "young")}
    assert sn.conflicts(objs) == {}
    assert sn.claim_of(obj("a", "x", "")) is None


def test_different_names_do_not_conflict():
    objs = [obj("a", "one", "m1"), obj("a", "two", "m2")]
    assert sn.owners(objs) == {"m1": ("a", "one"), "m2": ("a", "two")}
    assert sn.conflicts(objs) == {}


def test_timestamps_compare_as_times_not_text():
    # Fractional seconds or an offset must not reorder by string comparison.
    a = obj("a", "a", "m", "2026-01-01T10:00:00+02:00")   # 08:00Z
    b = obj("a", "b", "m", "2026-01-01T09:00:00Z")
    assert sn.owners([b, a]) == {"m": ("a", "a")}
    assert sn.parse_timestamp("not a time") > sn.parse_timestamp("2999-01-01T00:00:00Z")


def test_conflict_message_names_the_owner():
    text = sn.conflict_message("llama", ("prod", "llama-a"))
    assert "prod/llama-a" in text and "'llama'" in text


names = st.sampled_from(["m1", "m2", "m3"])
objects = st.lists(st.builds(obj, st.sampled_from(["a", "b"]), st.sampled_from(["x", "y", "z", "w"]), names,
                             st.sampled_from(["2026-01-01T00:00:00Z", "2026-01-01T00:00:01Z",
                                              "2025-12-31T23:59:59Z"]), st.booleans()),
                   max_size=8, unique_by=lambda o: (o["metadata"]["namespace"], o["metadata"]["name"]))


@given(objects)
def test_exactly_one_owner_per_name_and_order_does_not_matter(objs):
    owners = sn.owners(objs)
    assert owners == sn.owners(list(reversed(objs)))
    live = [o for o in objs if not o["metadata"].get("deletionTimestamp")]
    assert set(owners) == {o["status"]["servedModelName"] for o in live}
    losers = sn.conflicts(objs)
    for o in live:
        key = (o["metadata"]["namespace"], o["metadata"]["name"])
        assert (key in losers) != (owners[o["status"]["servedModelName"]] == key)


@pytest.mark.parametrize(("public", "has_key", "opted_in", "withheld"), [
    (True, False, False, True),
    (True, False, True, False),
    (True, True, False, False),
    (False, False, False, False),
])
def test_only_a_published_gateway_withholds_a_keyless_model_that_did_not_opt_in(public, has_key, opted_in,
                                                                                 withheld):
    assert sn.withheld_from_public_gateway(public, has_key, opted_in) is withheld
