"""API keys: parsing a Secret's value, the caller's key, and the refreshed cache (fake clock and reader)."""

from __future__ import annotations

import asyncio

import pytest

from modelendpoint_gateway.keys import KeySet, KeyStore, KeysUnavailable, decode_secret_data, parse_keys, presented_key


@pytest.mark.parametrize("text, keys", [
    ("sk-1", ("sk-1",)),
    ("  sk-1\n", ("sk-1",)),
    ("sk-1,sk-2", ("sk-1", "sk-2")),
    ("sk-1, sk-2 ,sk-3", ("sk-1", "sk-2", "sk-3")),
    ("sk-1\nsk-2\n", ("sk-1", "sk-2")),
    ("sk-1,\nsk-2", ("sk-1", "sk-2")),
])
def test_parse_keys(text, keys):
    assert parse_keys(text) == keys


@pytest.mark.parametrize("text", ["", "  \n", "sk-1,,sk-2", ",sk-1", "sk-1,", "sk-1,\n,sk-2"])
def test_empty_value_or_entry_is_refused(text):
    with pytest.raises(ValueError):
        parse_keys(text)


def test_presented_key():
    assert presented_key("Bearer sk-1") == "sk-1"
    assert presented_key("bearer   sk-1  ") == "sk-1"
    assert presented_key("Basic abc") is None
    assert presented_key("Bearer ") is None
    assert presented_key(None, "sk-anthropic") == "sk-anthropic"
    assert presented_key("Bearer sk-1", "other") == "sk-1"


def test_keyset_keeps_only_digests():
    ks = KeySet.of(("sk-secret-1",))
    assert ks.opens("sk-secret-1") and not ks.opens("sk-secret-2") and not ks.opens(None)
    assert b"sk-secret-1" not in b"".join(ks.digests)


def test_decode_secret_data():
    assert decode_secret_data({"data": {"k": "c2stMQ=="}, "stringData": {"s": "x"}}) == {"k": "sk-1", "s": "x"}


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def store(secrets: dict, clock: Clock, calls: list) -> KeyStore:
    async def fetch(ns: str, name: str):
        calls.append((ns, name))
        value = secrets.get((ns, name))
        if isinstance(value, Exception):
            raise value
        return value

    return KeyStore(fetch, refresh_seconds=10, clock=clock)


async def test_read_once_then_from_memory():
    secrets = {("ns", "s"): {"k": "sk-1,sk-2"}}
    calls: list = []
    ks = store(secrets, Clock(), calls)
    a, b = await asyncio.gather(ks.keys("ns", "s", "k"), ks.keys("ns", "s", "k"))
    assert a.opens("sk-2") and b.opens("sk-1")
    assert calls == [("ns", "s")]                  # concurrent first uses share one read
    await ks.keys("ns", "s", "k")
    assert calls == [("ns", "s")]


async def test_a_removed_key_stops_working_after_the_next_refresh():
    secrets = {("ns", "s"): {"k": "sk-old,sk-new"}}
    clock, calls = Clock(), []
    ks = store(secrets, clock, calls)
    assert (await ks.keys("ns", "s", "k")).opens("sk-old")
    secrets[("ns", "s")] = {"k": "sk-new"}
    clock.t = 10
    await ks.refresh_all()
    keys = await ks.keys("ns", "s", "k")
    assert not keys.opens("sk-old") and keys.opens("sk-new")


async def test_stale_keys_are_not_trusted_but_a_failed_refresh_keeps_the_last_ones_for_a_while():
    secrets: dict = {("ns", "s"): {"k": "sk-1"}}
    clock, calls = Clock(), []
    ks = store(secrets, clock, calls)
    await ks.keys("ns", "s", "k")
    secrets[("ns", "s")] = ConnectionError("API server down")
    clock.t = 20
    await ks.refresh_all()
    assert (await ks.keys("ns", "s", "k")).opens("sk-1")   # 20 s old: within 3 periods
    clock.t = 31
    with pytest.raises(KeysUnavailable):
        await ks.keys("ns", "s", "k")
    secrets[("ns", "s")] = {"k": "sk-2"}
    await ks.refresh_all()
    assert (await ks.keys("ns", "s", "k")).opens("sk-2")


async def test_a_missing_secret_key_or_bad_value_opens_nothing(caplog):
    secrets = {("ns", "bad"): {"k": "sk-1,,sk-2"}, ("ns", "other"): {"x": "sk-1"}}
    ks = store(secrets, Clock(), [])
    assert (await ks.keys("ns", "gone", "k")).digests == frozenset()
    assert (await ks.keys("ns", "other", "k")).digests == frozenset()
    assert (await ks.keys("ns", "bad", "k")).digests == frozenset()
    assert "sk-1" not in caplog.text                  # logged, but never the keys
    assert "empty entry" in caplog.text


async def test_the_first_read_failing_is_unavailable_not_unauthorized():
    ks = store({("ns", "s"): ConnectionError("down")}, Clock(), [])
    with pytest.raises(KeysUnavailable):
        await ks.keys("ns", "s", "k")


async def test_retain_forgets_unused_secrets():
    ks = store({("ns", "s"): {"k": "a"}}, Clock(), [])
    await ks.keys("ns", "s", "k")
    ks.retain(set())
    assert ks.entries == {}
