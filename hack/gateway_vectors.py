"""Shared test vectors of the gateway's two data planes: balancing and prefix keys.

``python hack/gateway_vectors.py`` writes tests/unit/vectors/gateway_dataplane.json
from the Python gateway's own functions (balancer.py, prefix.py); the Rust data
plane's tests (gateway/dataplane, ``cargo test``) read the same file, and
tests/unit/test_gateway_dataplane.py checks that the file is what this script
makes now. So a change to either side's hashing, ring, bound or prefix rules
that the other does not share fails a test.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "gateway"))

from modelendpoint_gateway import balancer, prefix  # noqa: E402

OUT = REPO / "tests" / "unit" / "vectors" / "gateway_dataplane.json"

IDS = ["ns/pod-a", "ns/pod-b", "ns/pod-c", "other/m-7f9c-0", "ns/pod-é"]
TEXTS = ["", "a", "ns/pod-a#0", "hello world", "système\x1fprompt\x1e", "🙂" * 3, "x" * 1000]
CHAT = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi"}]
BODIES: list[tuple[dict[str, Any], int, bool]] = [
    # (body, prefixCharLength, exotic: the Rust side may defer it to Python)
    ({"messages": CHAT}, 1000, False),
    ({"messages": CHAT}, 10, False),
    ({"messages": CHAT * 50}, 200, False),
    ({"messages": [{"role": "user", "content": [
        {"type": "text", "text": "look"}, {"type": "image_url", "image_url": {"url": "http://x/" + "i" * 400}}]}]},
     1000, False),
    ({"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": "AAAA"}}]}]},
     100, False),
    ({"messages": [{"role": "user", "content": [{"file": {"file_id": "", "data": ""}}]}]}, 100, False),
    ({"messages": [{"content": "no role"}, "a bare string", ["list", {"text": "part"}], 5]}, 100, False),
    ({"messages": [{"role": None, "content": None}, {"role": "", "content": 7}]}, 100, False),
    ({"messages": [{"role": 3, "content": "numeric role"}]}, 100, True),
    ({"system": "Be kind.", "messages": [{"role": "user", "content": "hey"}]}, 1000, False),
    ({"system": [{"type": "text", "text": "blocks"}], "messages": [{"role": "user", "content": "hey"}]}, 1000, False),
    ({"system": {"not": "text"}, "messages": [{"role": "user", "content": "hey"}]}, 1000, False),
    ({"messages": []}, 100, False),
    ({"instructions": "Be brief.", "input": "Tell me"}, 100, False),
    ({"instructions": None, "input": "Tell me"}, 100, False),
    ({"input": [{"role": "user", "content": "from responses"}], "instructions": "sys"}, 100, False),
    ({"input": ["a", "b"]}, 100, False),
    ({"input": "plain embedding input"}, 5, False),
    ({"prompt": "Once upon a time, " * 40}, 120, False),
    ({"prompt": ["first prompt", "second"]}, 100, False),
    ({"prompt": [1, 2, 3, 40000]}, 100, False),
    ({"prompt": list(range(500))}, 50, False),
    ({"prompt": [[5, 6, 7], [8]]}, 100, False),
    ({"prompt": [True, 2]}, 100, True),
    ({"prompt": [1.5, 2]}, 100, True),
    ({"prompt": ""}, 100, False),
    ({"prompt": "", "input": "fallback"}, 100, False),
    ({"prompt": []}, 100, False),
    ({"prompt": 42}, 100, False),
    ({"model": "m"}, 100, False),
    ({"messages": [{"role": "user", "content": "ünïcödé 🙂 " * 30}]}, 77, False),
]


def vectors() -> dict[str, Any]:
    hashes = [{"text": t, "hash": f"{balancer.hash64(t):016x}"} for t in TEXTS]
    rings = []
    for ids, replication in ((IDS[:2], 1), (IDS[:3], 8), (IDS, 256)):
        ring = balancer.Ring(ids, replication)
        for key in ("", "k", "a longer prefix key", "ns/pod-a#3"):
            rings.append({"ids": ids, "replication": replication, "key": key,
                          "walk": list(ring.walk(balancer.hash64(key)))})
    chwbl = []
    for loads, pct in (([0, 0, 0], 125), ([5, 0, 0], 125), ([3, 3, 0], 150), ([9, 1, 1, 1, 0], 100),
                       ([0, 0], 400)):
        ids = IDS[:len(loads)]
        replicas = {}
        for rid, load in zip(ids, loads, strict=True):
            replicas[rid] = balancer.Replica(rid, "127.0.0.1", 1)
            replicas[rid].in_flight = load
        ring = balancer.Ring(ids, 64)
        for key in ("p1", "p2", "p3", "some system prompt"):
            chosen = balancer.chwbl(ring, replicas, key, pct)
            chwbl.append({"ids": ids, "loads": loads, "replication": 64, "mean_load_percentage": pct, "key": key,
                          "chosen": chosen.id if chosen else None})
    bounds = [{"total": t, "replicas": r, "pct": p, "bound": balancer.load_bound(t, r, p)}
              for t, r, p in ((0, 1, 125), (10, 3, 125), (7, 2, 100), (99, 4, 150), (1, 5, 50))]
    prefixes = [{"body": body, "limit": limit, "exotic": exotic, "key": prefix.prefix_key(body, limit)}
                for body, limit, exotic in BODIES]
    return {"hash64": hashes, "rings": rings, "chwbl": chwbl, "load_bound": bounds, "prefix_key": prefixes}


def render() -> str:
    return json.dumps(vectors(), indent=1, ensure_ascii=False) + "\n"


if __name__ == "__main__":
    OUT.write_text(render())
    print(f"wrote {OUT.relative_to(REPO)}")
