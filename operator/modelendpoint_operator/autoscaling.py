"""The autoscaler's decision: load -> replicas (pure; no I/O, the clock is an argument).

The load of a ModelEndpoint is the requests in flight on its ready replicas
(running plus waiting in each vLLM engine, from the runtime's metrics) plus the
requests gateways hold for it (their ``held.gateway...`` annotations). Every few
seconds :mod:`.scaler` records one :class:`Sample` and asks :func:`decide`:

- desired = ceil(load / targetRequests), clamped to [minReplicas, maxReplicas];
- up at once;
- down only to the highest recommendation of the last ``scaleDownDelaySeconds``
  (a window, like the HPA's stabilisation window, so a noisy signal cannot flap),
  and only once the window is full of samples (after a restart, nothing goes down
  before a whole window has been seen);
- never below one replica while anything is in flight or held;
- to zero only with minReplicas 0 and nothing in flight, held or served (a
  finished-requests counter that moved) for ``scaleDownDelaySeconds``, counted from
  when the replicas asked for are ready (a replica still loading is not idle).
"""

from __future__ import annotations

import datetime
import json
import math
import urllib.parse
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families

from .spec import AutoscalingSpec

HELD_ANNOTATION_PREFIX = "held.gateway.serving.modelendpoint.dev/"
# A gateway refreshes its entry every 5 s while it holds requests; older entries are
# from a gateway that died or lost its connection, and count for nothing.
HELD_FRESH_SECONDS = 15.0

RUNNING = "vllm:num_requests_running"
WAITING = "vllm:num_requests_waiting"
FINISHED_TOTAL = "vllm:request_success_total"  # a counter, by finish reason
# The runtime's metrics, only those three series (its `name[]` selector, by sample name).
LOAD_METRICS_PATH = "/metrics?" + "&".join(f"name[]={urllib.parse.quote(n)}" for n in (RUNNING, WAITING,
                                                                                      FINISHED_TOTAL))


@dataclass(frozen=True)
class ReplicaLoad:
    """What one replica's metrics say."""

    in_flight: float
    finished: float  # requests finished since the process started (a counter)


_LOAD_SAMPLES = (RUNNING + "{", RUNNING + " ", WAITING + "{", WAITING + " ", FINISHED_TOTAL + "{",
                 FINISHED_TOTAL + " ")


def parse_replica_metrics(text: str) -> ReplicaLoad:
    """The runtime's Prometheus text -> its load (vLLM's gauges and finished counter).

    The scrape asks for those three series only (:data:`LOAD_METRICS_PATH`); the lines
    are filtered here too, so that a runtime that ignores the selector (an older one)
    costs no more: its whole text is about 100 kB (vLLM's histograms), some 20 ms of
    CPU to parse, a hundred times more than the lines needed.
    """
    lines = "\n".join(line for line in text.splitlines() if line.startswith(_LOAD_SAMPLES))
    in_flight = finished = 0.0
    for family in text_string_to_metric_families(lines + "\n"):
        for sample in family.samples:
            if sample.name in (RUNNING, WAITING):
                in_flight += sample.value
            elif sample.name == FINISHED_TOTAL:
                finished += sample.value
    return ReplicaLoad(in_flight, finished)


@dataclass(frozen=True)
class HeldEntry:
    """A gateway's held-requests annotation as this process last saw it."""

    value: str
    since: float  # this process' monotonic clock: when the entry was this old (``age``)
    age: float = 0.0


def held_requests(annotations: Mapping[str, str], seen: Mapping[str, HeldEntry], now: float,
                  wall_now: datetime.datetime) -> tuple[int, dict[str, HeldEntry]]:
    """Requests the gateways hold for a ModelEndpoint, from their fresh annotations, and what
    to pass as ``seen`` next time.

    An entry's ``at`` is the gateway's clock, which may be off from this one: it is trusted
    only for an entry seen for the first time (after a start, or a new gateway). After that
    an entry's age is counted here (``now``, monotonic), from the last change of its value: a
    gateway rewrites it every 5 s while it holds. So a skew between the two clocks at most
    delays a wake by one refresh, and a dead gateway's entry still ages out.
    """
    total = 0
    out: dict[str, HeldEntry] = {}
    for key, value in annotations.items():
        if not key.startswith(HELD_ANNOTATION_PREFIX):
            continue
        try:
            entry = json.loads(value)
            at = datetime.datetime.fromisoformat(str(entry["at"]).replace("Z", "+00:00"))
            held = int(entry["held"])
        except (ValueError, KeyError, TypeError):
            continue
        if at.tzinfo is None:
            at = at.replace(tzinfo=datetime.UTC)
        before = seen.get(key)
        if before is None:
            out[key] = HeldEntry(value, now, max(0.0, (wall_now - at).total_seconds()))
        elif before.value != value:
            out[key] = HeldEntry(value, now)  # rewritten since the last look: fresh
        else:
            out[key] = before
        kept = out[key]
        if held > 0 and kept.age + (now - kept.since) <= HELD_FRESH_SECONDS:
            total += held
    return total, out


@dataclass(frozen=True)
class Sample:
    at: float  # seconds on the scaler's monotonic clock
    load: float  # in flight on ready replicas plus held
    served: bool  # a request finished since the previous sample
    # A replica asked for is not ready yet (loading its model): it could not have served,
    # so the time is not idle; else a model slower to load than scaleDownDelaySeconds
    # would go back to zero before its first replica ever served.
    starting: bool = False


@dataclass
class History:
    """The samples of one ModelEndpoint (the last scaleDownDelaySeconds of them)."""

    since: float  # when observation started: no scale-down before a whole window
    samples: deque[Sample] = field(default_factory=deque)
    last_active: float | None = None  # the last sample with load or a finished request

    def add(self, sample: Sample, window: float) -> None:
        self.samples.append(sample)
        if sample.load > 0 or sample.served or sample.starting:
            self.last_active = sample.at
        while self.samples and self.samples[0].at < sample.at - window:
            self.samples.popleft()

    def touch(self, now: float) -> None:
        """Activity seen outside a sample (a wake): the idle clock starts again."""
        self.last_active = now


@dataclass(frozen=True)
class Decision:
    replicas: int
    load: float
    reason: str


def recommend(load: float, spec: AutoscalingSpec) -> int:
    want = math.ceil(load / spec.target_requests) if load > 0 else 0
    return max(spec.min_replicas, min(spec.max_replicas, want))


def decide(spec: AutoscalingSpec, current: int, history: History, now: float) -> Decision:
    """How many replicas there should be now (``current``: what the autoscaler set last)."""
    window = float(spec.scale_down_delay_seconds)
    latest = history.samples[-1] if history.samples else None
    load = latest.load if latest else 0.0
    busy = load > 0
    up = recommend(load, spec)
    if busy:
        up = max(up, 1)
    if up > current:
        return Decision(up, load, f"{_load_words(load)}, target {spec.target_requests} per replica")
    if up == current:
        return Decision(current, load, "load matches")
    if current > spec.max_replicas:
        return Decision(spec.max_replicas, load, f"maxReplicas is {spec.max_replicas}")
    # Going down: the highest recommendation of the window, and only with a full window.
    if now - history.since < window:
        return Decision(current, load, "observing the load before scaling down")
    recent = [s for s in history.samples if s.at >= now - window]
    floor = max((recommend(s.load, spec) for s in recent), default=up)
    if any(s.load > 0 for s in recent):
        floor = max(floor, 1)
    idle_for = now - history.last_active if history.last_active is not None else now - history.since
    if floor == 0 and idle_for < window:
        floor = 1  # something was served or held within the delay: not to zero yet
    target = max(up, floor)
    if target >= current:
        return Decision(current, load, "load stayed high within the scale-down delay")
    if target == 0:
        return Decision(0, load, f"idle for {int(idle_for)}s (scaleDownDelaySeconds {int(window)})")
    return Decision(target, load, f"{_load_words(load)} for {int(window)}s, target {spec.target_requests} "
                                  "per replica")


def _load_words(load: float) -> str:
    n = int(load) if float(load).is_integer() else round(load, 1)
    return f"{n} request{'s' if n != 1 else ''} in flight"


def total_load(replicas: Iterable[ReplicaLoad], held: int) -> float:
    return sum(r.in_flight for r in replicas) + held
