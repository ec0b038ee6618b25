"""The hold/wake state machine and the held annotation's key and value (fake clock)."""

from __future__ import annotations

import json

from modelendpoint_gateway.hold import ANNOTATION_PREFIX, HeldCounts, annotation_key, annotation_value

K = ("ns", "model")


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_annotation_key_and_value():
    assert annotation_key("gateway-7d9f-abcde") == f"{ANNOTATION_PREFIX}/gateway-7d9f-abcde"
    assert ANNOTATION_PREFIX == "held.gateway.serving.modelendpoint.dev"
    long = "g" * 62 + "-" + "x" * 10
    name = annotation_key(long).split("/", 1)[1]
    assert len(name) <= 63 and name[-1].isalnum()       # a valid annotation name part
    value = json.loads(annotation_value(3, 1767225600.0))
    assert value == {"held": 3, "at": "2026-01-01T00:00:00Z"}


def test_first_hold_writes_at_once_refreshes_every_5s_and_removes_when_none():
    clock = Clock()
    h = HeldCounts(clock)
    assert h.due() == []
    assert h.add(K) is True                  # the first: write now
    assert h.due() == [(K, 1)]
    h.written(K, 1)
    assert h.add(K) is False
    assert h.due() == []                     # written 0 s ago
    clock.t += 5
    assert h.due() == [(K, 2)]               # refreshed with the current count
    h.written(K, 2)
    h.remove(K)
    assert h.remove(K) is True               # none left: remove
    assert h.due() == [(K, None)]
    h.written(K, None)
    assert h.due() == [] and h.total == 0


def test_a_failed_write_is_retried_after_a_second():
    clock = Clock()
    h = HeldCounts(clock)
    h.add(K)
    h.failed(K)
    assert h.due() == []
    clock.t += 1
    assert h.due() == [(K, 1)]


def test_a_deleted_endpoint_gets_no_more_writes():
    clock = Clock()
    h = HeldCounts(clock)
    h.add(K)
    h.written(K, 1)
    h.remove(K)
    h.gone(K)
    assert h.due() == []


def test_totals_across_models():
    h = HeldCounts(Clock())
    h.add(("a", "x"))
    h.add(("a", "x"))
    h.add(("b", "y"))
    assert (h.total, h.held(("a", "x")), h.held(("b", "y"))) == (3, 2, 1)
    assert h.remove(("c", "none")) is False
