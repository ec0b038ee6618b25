"""hack/bench_operator.py's report: what "API requests per object" counts, and what not."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _bench():
    path = REPO / "hack" / "bench_operator.py"
    spec = importlib.util.spec_from_file_location("bench_operator", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("bench_operator", module)
    spec.loader.exec_module(module)
    return module


RESULT = {"count": 1000, "namespaces": 10, "replicas": 1, "p50": 17.0, "p99": 33.0, "max": 34.0,
          "total": 36.0, "created_in": 3.0, "peak_rss_mib": 119.0,
          "reconciler_requests_per_object": 3.0, "kopf_patches_per_object": 0.0,
          "event_posts_per_object": 1.5, "event_objects_per_object": 1.5, "phases": {"Ready": 1000}}


def test_report_counts_the_event_posts_and_says_what_is_excluded() -> None:
    text = _bench().render(RESULT, "`make bench-operator`")
    assert "| Event POSTs (phase transitions) per object | 1.50 (Event objects: 1.50) |" in text
    assert "| All of the above: API requests per object | 4.50 |" in text
    assert "Not counted: the watch\nstreams" in text and "peering" in text
