"""Discovery: list, watch from the list's version, re-list on 410; the router follows (fake cluster view)."""

from __future__ import annotations

import asyncio

from fixtures_gateway import FakeCluster, mep_obj, pod_obj
from modelendpoint_gateway import table
from modelendpoint_gateway.discovery import Discovery
from modelendpoint_gateway.router import Router


async def until(predicate, timeout: float = 2.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        assert loop.time() < deadline, "condition not reached"
        await asyncio.sleep(0.005)


async def started(cluster: FakeCluster, namespaces: list[str] | None = None) -> tuple[Discovery, Router, list]:
    router = Router()
    changes: list = []
    d = Discovery(cluster, router, namespaces or [], on_change=changes.extend)
    d.start()
    await asyncio.wait_for(d.synced.wait(), 2)
    return d, router, changes


async def test_initial_lists_then_events():
    c = FakeCluster()
    c.put(mep_obj("a", "ns", "model-a"))
    c.put(pod_obj("a-1", "ns", "a", "10.0.0.1"))
    d, router, changes = await started(c)
    try:
        model = router.by_served_name("model-a")
        assert model is not None and [r.netloc for r in model.replicas] == ["10.0.0.1:8000"]
        waiter = model.changed()
        c.put(pod_obj("a-1", "ns", "a", "10.0.0.1", ready=False))
        await asyncio.wait_for(waiter, 1.0)            # a readiness flip wakes waiters at once
        assert model.replicas == [] and model.state == table.STARTING
        c.put(pod_obj("a-2", "ns", "a", "10.0.0.2"))
        await until(lambda: [r.host for r in model.replicas] == ["10.0.0.2"])
        c.delete("ModelEndpoint", "ns", "a")
        await until(lambda: router.by_served_name("model-a") is None)
        assert model.deleted
    finally:
        await d.stop()


async def test_410_relists_and_catches_up_on_what_the_watch_missed():
    c = FakeCluster()
    c.put(mep_obj("a", "ns", "model-a"))
    d, router, _ = await started(c)
    try:
        lists = c.lists
        # Changes the watch never delivers (written straight into the fake's state), then 410.
        c.objects["modelendpoints"].pop(("ns", "a"))
        c.objects["modelendpoints"][("ns", "b")] = mep_obj("b", "ns", "model-b")
        c.expire_watches()
        await until(lambda: router.by_served_name("model-b") is not None)
        assert router.by_served_name("model-a") is None
        assert c.lists > lists
    finally:
        await d.stop()


async def test_namespaces_limit_the_scope():
    c = FakeCluster()
    c.put(mep_obj("a", "in", "model-a"))
    c.put(mep_obj("b", "out", "model-b"))
    d, router, _ = await started(c, ["in"])
    try:
        assert router.by_served_name("model-a") is not None
        assert router.by_served_name("model-b") is None
        c.put(mep_obj("c", "out", "model-c"))
        c.put(mep_obj("d", "in", "model-d"))
        await until(lambda: router.by_served_name("model-d") is not None)
        assert router.by_served_name("model-c") is None
    finally:
        await d.stop()


async def test_list_errors_back_off_and_retry():
    c = FakeCluster()
    c.put(mep_obj("a", "ns", "model-a"))
    calls = {"n": 0}
    real = c.list

    async def flaky(resource, namespace):
        calls["n"] += 1
        if calls["n"] <= 2:
            raise ConnectionError("API server restarting")
        return await real(resource, namespace)

    c.list = flaky  # type: ignore[method-assign]
    router = Router()
    d = Discovery(c, router, [], backoff_max=0.05)
    d.start()
    try:
        await asyncio.wait_for(d.synced.wait(), 5)
        assert router.by_served_name("model-a") is not None
    finally:
        await d.stop()


async def test_served_name_conflict_routes_to_the_oldest():
    c = FakeCluster()
    c.put(mep_obj("new", "b", "shared", created=100))
    c.put(mep_obj("old", "a", "shared", created=1))
    d, router, _ = await started(c)
    try:
        assert router.by_served_name("shared").key == ("a", "old")
        c.delete("ModelEndpoint", "a", "old")
        await until(lambda: router.by_served_name("shared").key == ("b", "new"))
    finally:
        await d.stop()
