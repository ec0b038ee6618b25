"""The scrape loop: one task for every autoscaled ModelEndpoint (and every one with LoRA
adapters) of this process.

Every ``MEP_OPERATOR_AUTOSCALING_INTERVAL_SECONDS`` it reads each running replica's
(Ready or not) metrics port (``http://<pod IP>:9400/metrics``, no API key; at most
``MEP_OPERATOR_AUTOSCALING_MAX_SCRAPES`` requests at once, each with a 2 s
timeout), adds the requests gateways hold (annotations), records one sample per
ModelEndpoint and asks :func:`autoscaling.decide`. A changed decision is kept
here and the ModelEndpoint is put in the reconcile queue, whose reconcile applies
it to the Deployment and writes ``status.autoscaling``. A wake (a fresh held
annotation on a ModelEndpoint at zero) does not wait for the loop: the
ModelEndpoint's watch event reaches the reconcile at once, which asks
:meth:`Scaler.replicas`, which scales up from the annotation alone.

For a ModelEndpoint with ``spec.adapters``, the same loop reads each ready replica's
``GET /adapters`` on the metrics port (which adapters it has loaded, and why one failed)
for ``status.adapters``.

Cost per replica and period: one HTTP GET of the three series the load is made of
(``/metrics?name[]=...``: about 1 kB, not the ~86 kB of the whole text, vLLM's histograms)
and its parse, well under a millisecond of CPU.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from . import autoscaling as a
from . import constants as c
from . import metrics
from .spec import Endpoint

log = logging.getLogger(__name__)
Key = tuple[str, str]
SCRAPE_TIMEOUT_S = 2.0


def _iso(t: datetime.datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


def _parse_iso(value: Any) -> datetime.datetime | None:
    try:
        t = datetime.datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except (TypeError, ValueError):
        return None
    return t if t.tzinfo else t.replace(tzinfo=datetime.UTC)


@dataclass
class Track:
    """What the autoscaler knows about one ModelEndpoint."""

    history: a.History
    desired: int
    load: float = 0.0
    last_scale: str | None = None
    message: str = ""
    finished: dict[str, float] = field(default_factory=dict)  # pod uid -> finished counter
    held_seen: dict[str, a.HeldEntry] = field(default_factory=dict)  # annotation key -> as last seen


def metrics_targets(pods: list[dict[str, Any]]) -> list[tuple[str, str, bool]]:
    """(pod uid, base URL of its metrics port, whether it is Ready) of each running, not
    deleting runtime pod."""
    out = []
    for pod in pods:
        meta, status = pod.get("metadata") or {}, pod.get("status") or {}
        if meta.get("deletionTimestamp") or not status.get("podIP") or status.get("phase", "Running") != "Running":
            continue
        ready = any(cond.get("type") == "Ready" and cond.get("status") == "True"
                    for cond in status.get("conditions") or [])
        port = next((p.get("containerPort") for p in pod.get("ports") or []
                     if p.get("name") == c.RUNTIME_METRICS_PORT_NAME), c.RUNTIME_METRICS_PORT)
        out.append((str(meta.get("uid")), f"http://{status['podIP']}:{port}", ready))
    return out


def ready_replicas(pods: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """(pod uid, base URL of its metrics port) of each ready, not deleting, runtime pod."""
    return [(uid, base) for uid, base, ready in metrics_targets(pods) if ready]


def adapter_summary(names: list[str], reports: list[Any]) -> list[dict[str, Any]]:
    """Per adapter: how many replicas report it loaded, and vLLM's reason where one failed.

    ``reports``: each ready replica's ``GET /adapters`` answer,
    ``{"adapters": [{"name", "state", "error"}]}``.
    """
    out = []
    for name in names:
        loaded, errors = 0, []
        for report in reports:
            for entry in (report or {}).get("adapters") or []:
                if isinstance(entry, dict) and entry.get("name") == name:
                    if entry.get("state") == "loaded":
                        loaded += 1
                    elif entry.get("state") == "failed" and entry.get("error"):
                        errors.append(str(entry["error"]))
        item: dict[str, Any] = {"name": name, "loadedReplicas": loaded}
        if errors:
            item["message"] = errors[0][:500]
        out.append(item)
    return out


class Scaler:
    """Replica counts for autoscaled ModelEndpoints, kept in memory and in their status."""

    def __init__(self, enqueue: Callable[[Key, str], None], post_event: Callable[..., Any],
                 interval: float, max_scrapes: int, clock: Callable[[], float] = time.monotonic,
                 wallclock: Callable[[], datetime.datetime] = lambda: datetime.datetime.now(datetime.UTC)) -> None:
        self.enqueue = enqueue
        self.post_event = post_event
        self.interval = interval
        self.clock = clock
        self.wallclock = wallclock
        self.tracks: dict[Key, Track] = {}
        # The /adapters report of each ready replica, per ModelEndpoint with adapters.
        self.adapters: dict[Key, list[Any]] = {}
        self._scrapes = asyncio.Semaphore(max_scrapes)
        self._session: aiohttp.ClientSession | None = None

    # --- called by the reconcile ---------------------------------------------------

    def _track(self, ep: Endpoint, deployment: dict[str, Any] | None) -> Track:
        track = self.tracks.get(ep.key)
        if track is None:
            # First sight since this process started: go on from what the status (or the
            # Deployment) says, never from max or zero; scale-down waits a whole window.
            spec = ep.spec.autoscaling
            assert spec is not None
            saved = (ep.status.get("autoscaling") or {})
            desired = saved.get("desiredReplicas")
            if desired is None and deployment is not None:
                desired = (deployment.get("spec") or {}).get("replicas")
            if desired is None:
                desired = max(spec.min_replicas, 1)
            history = a.History(since=self.clock())
            last_active = _parse_iso(saved.get("lastActiveTime"))
            if last_active is not None:
                history.last_active = self.clock() - max(0.0, (self.wallclock() - last_active).total_seconds())
            track = self.tracks[ep.key] = Track(history, int(desired), float(saved.get("load") or 0.0),
                                                saved.get("lastScaleTime"), str(saved.get("message") or ""))
        return track

    def replicas(self, ep: Endpoint, deployment: dict[str, Any] | None) -> int:
        """The Deployment's replica count for ``ep`` now; a wake scales up at once."""
        spec = ep.spec.autoscaling
        assert spec is not None
        track = self._track(ep, deployment)
        held = self._held(ep, track)
        if held > 0:
            track.history.touch(self.clock())
            need = max(1, a.recommend(held, spec))
            if track.desired < need:
                self._scale(ep, track, need, held, f"woken by {held} held request{'s' if held != 1 else ''}")
        bounded = max(spec.min_replicas, min(spec.max_replicas, track.desired))
        if bounded != track.desired:
            self._scale(ep, track, bounded, track.load, "the replica bounds changed")
        return track.desired

    def _held(self, ep: Endpoint, track: Track) -> int:
        held, track.held_seen = a.held_requests(ep.annotations, track.held_seen, self.clock(), self.wallclock())
        return held

    def status(self, ep: Endpoint) -> dict[str, Any]:
        """``status.autoscaling``: written with the reconcile that applies a decision (the
        loop does not write the status on every sample)."""
        track = self.tracks.get(ep.key)
        if track is None:
            return dict(ep.status.get("autoscaling") or {})
        out: dict[str, Any] = {"desiredReplicas": track.desired, "load": round(track.load, 2)}
        if track.last_scale:
            out["lastScaleTime"] = track.last_scale
        if track.history.last_active is not None:
            ago = self.clock() - track.history.last_active
            # Rounded to the scrape period, so that the status changes only when activity does.
            out["lastActiveTime"] = _iso(self.wallclock() - datetime.timedelta(seconds=max(0.0, ago)))
        if track.message:
            out["message"] = track.message
        return out

    def forget(self, key: Key) -> None:
        """The ModelEndpoint is gone."""
        self.adapters.pop(key, None)
        self.forget_track(key)

    def forget_track(self, key: Key) -> None:
        """Autoscaling is off for ``key``: if it comes back on, it starts from what is then running
        (the Deployment), not from the count it decided before."""
        if self.tracks.pop(key, None) is not None:
            for gauge in (metrics.AUTOSCALER_LOAD, metrics.AUTOSCALER_DESIRED, metrics.AUTOSCALER_CURRENT):
                try:
                    gauge.remove(*key)
                except KeyError:
                    pass

    def _scale(self, ep: Endpoint, track: Track, replicas: int, load: float, why: str) -> None:
        before = track.desired
        track.desired = replicas
        track.last_scale = _iso(self.wallclock())
        track.message = f"scaled {before} -> {replicas}: {why}"
        metrics.AUTOSCALER_DESIRED.labels(*ep.key).set(replicas)
        log.info("%s/%s %s", ep.namespace, ep.name, track.message)
        task = self.post_event(ep, "Normal", "Scaled", track.message)
        if asyncio.iscoroutine(task):
            asyncio.ensure_future(task)

    # --- the loop ---------------------------------------------------------------------

    async def run(self, endpoints: Callable[[], list[tuple[Endpoint, list[dict[str, Any]], int]]],
                  active: asyncio.Event) -> None:
        """Forever: every ``interval``, sample and decide for every autoscaled ModelEndpoint.

        ``endpoints()`` gives (endpoint, its pods, the Deployment's current replicas).
        """
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=SCRAPE_TIMEOUT_S))
        try:
            while True:
                started = self.clock()
                if active.is_set():
                    try:
                        await self.tick(endpoints())
                    except Exception:  # a bug must not end the loop
                        log.exception("autoscaler tick failed")
                await asyncio.sleep(max(0.0, self.interval - (self.clock() - started)))
        finally:
            await self._session.close()

    async def tick(self, items: list[tuple[Endpoint, list[dict[str, Any]], int]]) -> None:
        await asyncio.gather(*(self._one(ep, pods, current) for ep, pods, current in items))

    async def _one(self, ep: Endpoint, pods: list[dict[str, Any]], current: int) -> None:
        if ep.spec.adapters is not None:
            await self._adapters(ep, pods)
        if ep.spec.autoscaling is not None:
            await self._load(ep, pods, current)

    # --- LoRA adapters: what each ready replica has loaded -------------------------------

    def adapter_status(self, ep: Endpoint) -> list[dict[str, Any]] | None:
        """``status.adapters``: per adapter of the spec, the ready replicas that loaded it."""
        if ep.spec.adapters is None:
            return None
        seen = self.adapters.get(ep.key)
        if seen is None:
            return list(ep.status.get("adapters") or []) or None
        return adapter_summary([a.name for a in ep.spec.adapters], seen)

    async def _adapters(self, ep: Endpoint, pods: list[dict[str, Any]]) -> None:
        urls = [base + "/adapters" for _, base in ready_replicas(pods)]
        reports = await asyncio.gather(*(self._get_json(url) for url in urls))
        seen = [r for r in reports if r is not None]
        if seen != self.adapters.get(ep.key):
            self.adapters[ep.key] = seen
            self.enqueue(ep.key, "adapters")

    async def _get_json(self, url: str) -> Any:
        assert self._session is not None
        async with self._scrapes:
            try:
                async with self._session.get(url) as resp:
                    return await resp.json() if resp.status == 200 else None
            except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
                log.debug("reading %s failed: %r", url, exc)
                return None

    # --- load: requests in flight ------------------------------------------------------

    async def _load(self, ep: Endpoint, pods: list[dict[str, Any]], current: int) -> None:
        spec = ep.spec.autoscaling
        assert spec is not None
        track = self._track(ep, None)
        # NotReady pods too: one that failed its probe under load still serves what it took.
        # Only a Ready one whose load is unknown stops a decision (a loading or crashing pod
        # does not answer, and holds nothing).
        targets = metrics_targets(pods)
        loads = await asyncio.gather(*(self._scrape(base + a.LOAD_METRICS_PATH) for _, base, _ in targets))
        failed = [uid for (uid, _, ready), load in zip(targets, loads, strict=True) if load is None and ready]
        ready_count = sum(1 for *_, ready in targets if ready)
        held = self._held(ep, track)
        now = self.clock()
        metrics.AUTOSCALER_CURRENT.labels(*ep.key).set(current)
        if failed:
            # A replica whose load is unknown could hide requests: no decision this period.
            track.message = f"cannot read the metrics of {len(failed)} replica(s); not scaling down"
            if held > 0:
                self.enqueue(ep.key, "autoscaler")
            return
        served = False
        seen: dict[str, float] = {}
        for (uid, _, _), load in zip(targets, loads, strict=True):
            if load is None:  # a NotReady pod not answering: its count is kept, not restarted
                if uid in track.finished:
                    seen[uid] = track.finished[uid]
                continue
            seen[uid] = load.finished
            if load.finished > track.finished.get(uid, 0.0):
                served = True
        track.finished = seen
        total = a.total_load((x for x in loads if x is not None), held)
        track.load = total
        track.history.add(a.Sample(now, total, served, starting=current > ready_count),
                          float(spec.scale_down_delay_seconds))
        metrics.AUTOSCALER_LOAD.labels(*ep.key).set(total)
        metrics.AUTOSCALER_DESIRED.labels(*ep.key).set(track.desired)
        decision = a.decide(spec, track.desired, track.history, now)
        if decision.replicas != track.desired:
            self._scale(ep, track, decision.replicas, decision.load, decision.reason)
            self.enqueue(ep.key, "autoscaler")
        elif current != track.desired:
            self.enqueue(ep.key, "autoscaler")  # the Deployment lags (a failed apply): again

    async def _scrape(self, url: str) -> a.ReplicaLoad | None:
        assert self._session is not None
        async with self._scrapes:
            try:
                async with self._session.get(url) as resp:
                    if resp.status != 200:
                        return None
                    return a.parse_replica_metrics(await resp.text())
            except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
                log.debug("scraping %s failed: %r", url, exc)
                return None
