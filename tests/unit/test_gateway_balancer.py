"""Replica choice: LeastRequests and CHWBL with its load bound; prefix keys (pure)."""

from __future__ import annotations

import collections

from hypothesis import given, settings
from hypothesis import strategies as st

from modelendpoint_gateway import balancer as b
from modelendpoint_gateway.prefix import prefix_key


def replicas(n: int) -> list[b.Replica]:
    return [b.Replica(f"ns/pod-{i}", f"10.0.0.{i}", 8000) for i in range(n)]


def test_least_requests_picks_the_least_loaded():
    rs = replicas(3)
    rs[0].in_flight, rs[1].in_flight, rs[2].in_flight = 5, 1, 3
    assert b.least_requests(rs) is rs[1]
    assert b.least_requests(rs, exclude=[rs[1]]) is rs[2]
    assert b.least_requests(rs, exclude=rs) is None


def test_least_requests_ties_rotate():
    rs = replicas(3)
    assert [b.least_requests(rs, start=i).id for i in range(3)] == [r.id for r in rs]


def test_ipv6_netloc():
    assert b.Replica("ns/p", "fd00::1", 8000).netloc == "[fd00::1]:8000"


def test_ring_is_the_same_in_every_process_and_visits_each_replica_once():
    ids = [r.id for r in replicas(4)]
    ring = b.Ring(ids, 256)
    walk = list(ring.walk(b.hash64("some prompt")))
    assert sorted(walk) == sorted(ids)
    assert walk == list(b.Ring(list(reversed(ids)), 256).walk(b.hash64("some prompt")))
    # blake2b, not Python's salted hash(): a fixed value, the same across gateway replicas.
    assert b.hash64("x") == int.from_bytes(__import__("hashlib").blake2b(b"x", digest_size=8).digest(), "big")


def test_same_prefix_same_replica_while_idle_and_different_prefixes_spread():
    rs = {r.id: r for r in replicas(4)}
    ring = b.Ring(list(rs), 256)
    first = b.chwbl(ring, rs, "You are a helpful assistant.", 125)
    assert all(b.chwbl(ring, rs, "You are a helpful assistant.", 125) is first for _ in range(20))
    spread = collections.Counter(b.chwbl(ring, rs, f"system prompt {i}", 125).id for i in range(400))
    assert len(spread) == 4 and min(spread.values()) > 50   # roughly even: 100 each


def test_a_loaded_replica_hands_its_prefix_on_at_the_bound():
    rs = {r.id: r for r in replicas(2)}
    ring = b.Ring(list(rs), 256)
    home = b.chwbl(ring, rs, "shared prefix", 125)
    other = next(r for r in rs.values() if r is not home)
    # With 2 replicas and 125 %: bound = ceil(1.25 * (total + 1) / 2).
    home.in_flight = 2       # total 2: bound ceil(1.875) = 2; home would have 3 > 2
    assert b.chwbl(ring, rs, "shared prefix", 125) is other
    other.in_flight = 2      # total 4: bound ceil(3.125) = 4; home fits again
    assert b.chwbl(ring, rs, "shared prefix", 125) is home


def test_exclusion_for_retries():
    rs = {r.id: r for r in replicas(3)}
    ring = b.Ring(list(rs), 16)
    home = b.chwbl(ring, rs, "k", 125)
    second = b.chwbl(ring, rs, "k", 125, exclude=[home])
    assert second is not None and second is not home
    assert b.chwbl(ring, rs, "k", 125, exclude=list(rs.values())) is None


@settings(max_examples=200)
@given(n=st.integers(1, 6), pct=st.integers(100, 300), keys=st.lists(st.sampled_from("abcdefgh"), min_size=1,
                                                                         max_size=120))
def test_no_replica_ever_exceeds_the_bound(n, pct, keys):
    """Requests that arrive and stay in flight: after each placement every replica is within the bound."""
    rs = {r.id: r for r in replicas(n)}
    ring = b.Ring(list(rs), 32)
    for total, key in enumerate(keys):
        chosen = b.chwbl(ring, rs, key, pct)
        assert chosen is not None
        bound = b.load_bound(total, n, pct)
        assert chosen.in_flight + 1 <= bound
        chosen.in_flight += 1
        assert max(r.in_flight for r in rs.values()) <= max(bound, 1)


def test_prefix_key_of_chat_is_role_and_text_in_order_cut_at_the_length():
    body = {"messages": [{"role": "system", "content": "You are terse."},
                         {"role": "user", "content": [{"type": "text", "text": "Hi"}]},
                         {"role": "user", "content": "x" * 500}]}
    key = prefix_key(body, 100)
    assert key is not None and len(key) == 100
    assert key.startswith("system\x1fYou are terse.\x1euser\x1fHi\x1euser\x1fxxx")
    # Same start, different end: same key; a different system prompt: another key.
    other_end = {"messages": body["messages"][:2] + [{"role": "user", "content": "x" * 90 + "y" * 10}]}
    assert prefix_key(other_end, 100) == key
    assert prefix_key({"messages": [{"role": "system", "content": "You are verbose."}]}, 100) != key
    # Role matters: the same text as a user turn is another template prefix.
    assert prefix_key({"messages": [{"role": "user", "content": "You are terse."}]}, 20) != prefix_key(
        {"messages": [{"role": "system", "content": "You are terse."}]}, 20)


def test_prefix_key_of_completions_and_others():
    assert prefix_key({"prompt": "Once upon a time" * 20}, 16) == "Once upon a time"
    assert prefix_key({"prompt": ["first prompt", "second"]}, 5) == "first"
    assert prefix_key({"prompt": [101, 102, 103]}, 7) == "101,102"
    assert prefix_key({"system": "Be brief", "messages": [{"role": "user", "content": "q"}]}, 100).startswith(
        "system\x1fBe brief")                                             # Anthropic's messages
    assert prefix_key({"instructions": "sys", "input": "q"}, 100).startswith("system\x1fsys")  # Responses API
    assert prefix_key({"model": "m"}, 100) is None
    assert prefix_key({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {
        "url": "https://example/cat.png"}}]}]}, 100) == "user\x1fhttps://example/cat.png\x1e"
