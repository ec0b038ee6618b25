"""The gateway's routing table from watched ModelEndpoints and pods (pure)."""

from __future__ import annotations

from fixtures_gateway import mep_obj, pod_obj
from modelendpoint_gateway import table as t


def test_endpoint_fields():
    info = t.parse_endpoint(mep_obj(
        "e", "ns", "served", replicas=3, autoscaling={"minReplicas": 0, "maxReplicas": 2},
        apiKeySecretRef={"name": "keys", "key": "k"}, rawOpenAIOutput=False,
        loadBalancing={"strategy": "PrefixHash",
                       "prefixHash": {"meanLoadPercentage": 150, "replication": 10, "prefixCharLength": 42}}))
    assert (info.namespace, info.name, info.served_name, info.phase) == ("ns", "e", "served", "Ready")
    assert (info.replicas, info.autoscaling, info.min_replicas) == (3, True, 0)
    assert (info.key_secret, info.key_field, info.open) == ("keys", "k", False)
    assert info.strategy == t.PREFIX_HASH and info.prefix_hash == t.PrefixHashOptions(150, 10, 42)
    assert info.sse is False


def test_endpoint_defaults():
    info = t.parse_endpoint(mep_obj("e", "ns", None))
    assert info.served_name is None and info.claim is None
    assert (info.replicas, info.autoscaling, info.open, info.strategy, info.sse) == (
        1, False, True, t.LEAST_REQUESTS, True)
    assert info.prefix_hash == t.PrefixHashOptions(125, 256, 100)


def test_pod_readiness_and_port():
    assert t.parse_pod(pod_obj("p", "ns", "e", "10.0.0.1", 8000)).routable
    assert not t.parse_pod(pod_obj("p", "ns", "e", ready=False)).routable
    assert not t.parse_pod(pod_obj("p", "ns", "e", deleting=True)).routable
    assert not t.parse_pod(pod_obj("p", "ns", "e", ip=None)).routable
    assert not t.parse_pod(pod_obj("p", "ns", "e", port=None)).routable   # no port named http
    other = pod_obj("p", "ns", "e")
    other["metadata"]["labels"]["app.kubernetes.io/managed-by"] = "someone-else"
    assert t.parse_pod(other) is None
    # The runtime container's port wins over a sidecar's port of the same name.
    two = pod_obj("p", "ns", "e", port=8000)
    two["spec"]["containers"].insert(0, {"name": "sidecar", "ports": [{"name": "http", "containerPort": 1}]})
    assert t.parse_pod(two).port == 8000


def build(*objs) -> t.Table:
    tbl = t.Table()
    for o in objs:
        if o["kind"] == "Pod":
            tbl.upsert_pod(t.parse_pod(o))
        else:
            tbl.upsert_endpoint(t.parse_endpoint(o))
    return tbl


def test_snapshot_routes_names_to_ready_pods_only():
    tbl = build(mep_obj("a", "ns", "model-a"), mep_obj("b", "ns", "model-b", replicas=0),
                pod_obj("a-1", "ns", "a", "10.0.0.1"), pod_obj("a-2", "ns", "a", "10.0.0.2", ready=False),
                pod_obj("x-1", "other", "a", "10.0.0.9"))  # same endpoint name, other namespace: not a's
    assert tbl.snapshot() == {
        "model-a": (("ns", "a"), t.READY, ["10.0.0.1:8000"]),
        "model-b": (("ns", "b"), t.OFF, []),
    }


def test_same_served_name_goes_to_the_oldest_and_moves_when_it_goes():
    tbl = build(mep_obj("young", "a", "m", created=10), mep_obj("old", "b", "m", created=0))
    assert tbl.owner_of_name["m"] == ("b", "old")
    changed = tbl.delete_endpoint(("b", "old"))
    assert tbl.owner_of_name["m"] == ("a", "young")
    assert ("a", "young") in changed
    # Renaming the owner's served name frees the old name.
    tbl.upsert_endpoint(t.parse_endpoint(mep_obj("young", "a", "m2", created=10)))
    assert "m" not in tbl.owner_of_name and tbl.owner_of_name["m2"] == ("a", "young")


def test_endpoint_name_for_v2_paths():
    tbl = build(mep_obj("e", "late", "m1", created=5), mep_obj("e", "early", "m2", created=1))
    assert tbl.owner_of_endpoint_name["e"] == ("early", "e")
    tbl.delete_endpoint(("early", "e"))
    assert tbl.owner_of_endpoint_name["e"] == ("late", "e")


def test_readiness_flip_is_one_change():
    tbl = build(mep_obj("a", "ns", "m"), pod_obj("a-1", "ns", "a", "10.0.0.1"))
    assert tbl.upsert_pod(t.parse_pod(pod_obj("a-1", "ns", "a", "10.0.0.1"))) == set()  # nothing new
    assert tbl.upsert_pod(t.parse_pod(pod_obj("a-1", "ns", "a", "10.0.0.1", ready=False))) == {("ns", "a")}
    assert tbl.snapshot()["m"][1:] == (t.STARTING, [])
    assert tbl.delete_pod(("ns", "a-1")) == {("ns", "a")}


def test_relist_drops_what_is_gone_in_that_scope_only():
    tbl = build(mep_obj("a", "ns1", "m1"), mep_obj("b", "ns2", "m2"), pod_obj("a-1", "ns1", "a"),
                pod_obj("b-1", "ns2", "b"))
    changed = tbl.replace_endpoints([], "ns1")
    assert changed == {("ns1", "a")} and set(tbl.owner_of_name) == {"m2"}
    tbl.replace_pods([t.parse_pod(pod_obj("b-2", "ns2", "b"))], None)
    assert set(tbl.pods) == {("ns2", "b-2")}


def test_serving_states():
    def state(ready: int, **spec) -> str:
        return t.serving_state(t.parse_endpoint(mep_obj("e", "ns", "m", **spec)), ready)

    assert state(1, replicas=0) == t.READY      # a replica still ready serves, whatever the spec says now
    assert state(0, replicas=0) == t.OFF
    assert state(0, replicas=0, autoscaling={"minReplicas": 0}) == t.WAKEABLE
    assert state(0) == t.STARTING
    assert t.serving_state(t.parse_endpoint(mep_obj("e", "ns", "m", phase="Failed")), 0) == t.FAILED


def adapters(*names: str) -> list[dict]:
    return [{"name": n, "source": f"org/{n}"} for n in names]


def test_adapter_names_are_claims_of_their_endpoint():
    tbl = build(mep_obj("a", "ns", "base", adapters=adapters("base-sql", "base-chat")),
                pod_obj("a-1", "ns", "a", "10.0.0.1"))
    info = tbl.endpoints[("ns", "a")]
    assert info.adapters == {"base-sql", "base-chat"}
    assert [(cl.served_name, cl.adapter) for cl in info.claims] == [
        ("base", False), ("base-sql", True), ("base-chat", True)]
    assert {n: v[0] for n, v in tbl.snapshot().items()} == {n: ("ns", "a") for n in ("base", "base-sql", "base-chat")}
    assert tbl.names_owned(("ns", "a")) == ["base", "base-sql", "base-chat"]
    assert tbl.owns_name(("ns", "a"))


def test_no_status_claims_no_adapter_either():
    tbl = build(mep_obj("a", "ns", None, adapters=adapters("lora")))
    assert tbl.owner_of_name == {} and tbl.endpoints[("ns", "a")].adapters == {"lora"}


def test_an_adapter_name_and_a_served_name_follow_the_one_rule():
    # The older one owns the name, whether it claims it as an adapter or as its served name.
    tbl = build(mep_obj("old", "ns", "base", created=0, adapters=adapters("shared")),
                mep_obj("young", "ns", "shared", created=10, adapters=adapters("young-lora")))
    assert tbl.owner_of_name == {"base": ("ns", "old"), "shared": ("ns", "old"), "young-lora": ("ns", "young")}
    assert not tbl.owns_name(("ns", "young"))
    assert tbl.names_owned(("ns", "young")) == ["young-lora"]
    # The adapter goes from the spec: the name moves to the younger one at once.
    changed = tbl.upsert_endpoint(t.parse_endpoint(mep_obj("old", "ns", "base", created=0, adapters=[])))
    assert ("ns", "young") in changed and tbl.owner_of_name["shared"] == ("ns", "young")
    assert tbl.owns_name(("ns", "young"))


def test_adapters_added_removed_and_deleted_with_their_endpoint():
    tbl = build(mep_obj("a", "ns", "base"))
    tbl.upsert_endpoint(t.parse_endpoint(mep_obj("a", "ns", "base", adapters=adapters("x", "y"))))
    assert set(tbl.owner_of_name) == {"base", "x", "y"}
    tbl.upsert_endpoint(t.parse_endpoint(mep_obj("a", "ns", "base", adapters=adapters("y"))))
    assert set(tbl.owner_of_name) == {"base", "y"}
    tbl.delete_endpoint(("ns", "a"))
    assert tbl.owner_of_name == {}
