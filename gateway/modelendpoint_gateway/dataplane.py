"""The compiled data plane (``MEP_GATEWAY_DATA_PLANE=compiled``): its snapshot, and its process.

A Python event loop is one CPU, and at a thousand concurrent streams the
per-chunk work of this gateway's own HTTP path fills it (docs/benchmarks.md).
With ``compiled``, the gateway starts ``modelendpoint-gateway-dataplane`` (a
Rust binary built from gateway/dataplane, in the operator image) and gives it
the API port's listening socket. That process accepts every connection and
serves the fast path itself: a plain request for a name that has a ready
replica, with a key that opens it. Every other connection (``/models``,
health, unknown names, missing or wrong keys, holds and wakes, a model
switched off, ``/v2``, anything unusual at the HTTP level) it hands back here
with the bytes it has read, over a Unix socket (the descriptor itself, by
SCM_RIGHTS), and this gateway answers it as if it had accepted it. So there
is one set of rules: this process decides what the fast path may serve
(:func:`snapshot_message`, pure) and renders every error body it may send.

What the split costs, documented in docs/gateway.md: in-flight counts
(LeastRequests, the CHWBL bound) are kept by each data plane for its own
requests; a key removed from its Secret stops working on the fast path at the
next key refresh, as here.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import json
import logging
import os
import shutil
import socket
import sys
from collections.abc import Callable
from typing import Any

from . import errors, table
from .http import in_task
from .keys import KeySet
from .router import Router
from .settings import GatewaySettings

logger = logging.getLogger("modelendpoint_gateway")

BINARY = "modelendpoint-gateway-dataplane"
_LENGTH = 8  # each handoff: an 8-byte big-endian length, then that many bytes read from the client


def find_binary(setting: str) -> str | None:
    """The data plane's executable: the setting's path, else on PATH, else beside this Python."""
    if setting:
        return setting if os.access(setting, os.X_OK) else None
    found = shutil.which(BINARY)
    if found:
        return found
    beside = os.path.join(os.path.dirname(sys.executable), BINARY)
    return beside if os.access(beside, os.X_OK) else None


@functools.lru_cache(maxsize=4096)
def _unreachable(model: str, retry_after: int, attempts: int) -> dict[str, Any]:
    """The 502 the fast path answers when no replica of ``model`` could be reached, after 1 to
    ``attempts`` tries, in both dialects (cached: every snapshot carries one per model)."""
    errs = [errors.upstream_unreachable(model, n, retry_after) for n in range(1, attempts + 1)]
    return {
        "status": errs[0].status,
        "headers": [[k, v] for k, v in errs[0].headers],
        "openai": [e.body_bytes(errors.OPENAI).decode() for e in errs],
        "anthropic": [e.body_bytes(errors.ANTHROPIC).decode() for e in errs],
    }


def snapshot_message(router: Router, keyset_of: Callable[[table.EndpointInfo], KeySet | None],
                     withheld: Callable[[table.EndpointInfo], bool], settings: GatewaySettings) -> dict[str, Any]:
    """What the fast path may serve now: per ModelEndpoint with a ready replica, its names (served
    name and adapters'), replicas, balancing, and key digests; the error bodies it may answer with.

    Absent (so answered here): models without a ready replica, a keyless model this gateway does
    not publish (``withheld``), and a keyed one whose keys are not fresh (``keyset_of`` is None).
    """
    names_of: dict[tuple[str, str], list[str]] = collections.defaultdict(list)
    for name, model in router.names():
        names_of[model.key].append(name)
    models = []
    for key, names in sorted(names_of.items()):
        model = router.models[key]
        info = model.info
        if model.state != table.READY or not model.replicas:
            continue
        if info.open:
            if withheld(info):
                continue
            digests = None
        else:
            keyset = keyset_of(info)
            if keyset is None:
                continue
            digests = sorted(d.hex() for d in keyset.digests)
        served = model.served_name
        models.append({
            "served_name": served,
            "names": names,
            "adapters": [n for n in names if model.is_adapter_name(n)],
            "replicas": [{"id": r.id, "host": r.host, "port": r.port} for r in model.replicas],
            "prefix_hash": {
                "replication": info.prefix_hash.replication,
                "mean_load_percentage": info.prefix_hash.mean_load_percentage,
                "prefix_char_length": info.prefix_hash.prefix_char_length,
            } if info.strategy == table.PREFIX_HASH else None,
            "keys": digests,
            "unreachable": _unreachable(served, settings.retry_after_seconds, settings.max_attempts),
        })
    broken = errors.upstream_broken()
    return {
        "models": models,
        "upstream_broken_event": {d: broken.sse_event(d).decode() for d in (errors.OPENAI, errors.ANTHROPIC)},
        "anthropic_suffixes": list(errors.ANTHROPIC_SUFFIXES),
    }


def process_config(settings: GatewaySettings, fds: tuple[int, int, int], threads: int) -> dict[str, Any]:
    """The data plane's settings (its one argument), from ours: the one source of each."""
    listen_fd, control_fd, handoff_fd = fds
    s = settings
    return {
        "listen_fd": listen_fd, "control_fd": control_fd, "handoff_fd": handoff_fd,
        "max_header_bytes": s.max_header_bytes, "max_body_bytes": s.max_body_bytes,
        "client_idle_seconds": s.client_idle_seconds,
        "client_write_timeout_seconds": s.client_write_timeout_seconds,
        "connect_timeout_seconds": s.connect_timeout_seconds, "upstream_idle_seconds": s.upstream_idle_seconds,
        "max_idle_per_replica": s.max_idle_connections_per_replica, "max_attempts": s.max_attempts,
        "drain_timeout_seconds": s.drain_timeout_seconds, "access_log": s.access_log,
        "replica_header": s.replica_header, "threads": threads,
    }


class HandoffReader:
    """Splits the handoff stream into (descriptor, bytes) pairs (pure but for the socket it is fed from)."""

    def __init__(self) -> None:
        self.buffer = bytearray()
        self.fds: collections.deque[int] = collections.deque()
        self.need: int | None = None

    def feed(self, data: bytes, fds: list[int]) -> list[tuple[int, bytes]]:
        self.fds.extend(fds)
        self.buffer += data
        out = []
        while True:
            if self.need is None:
                if len(self.buffer) < _LENGTH:
                    break
                self.need = int.from_bytes(self.buffer[:_LENGTH], "big")
                del self.buffer[:_LENGTH]
            if len(self.buffer) < self.need or not self.fds:
                break
            payload = bytes(self.buffer[:self.need])
            del self.buffer[:self.need]
            self.need = None
            out.append((self.fds.popleft(), payload))
        return out


class DataPlane:
    """The running binary: its start, snapshots pushed to it, metrics asked of it, handoffs taken from it."""

    def __init__(self, settings: GatewaySettings, binary: str, adopt: Callable[[socket.socket, bytes], object]) -> None:
        self.settings = settings
        self.binary = binary
        self.adopt = adopt
        self.proc: asyncio.subprocess.Process | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._replies: dict[int, asyncio.Future[str]] = {}
        self._next_id = 0
        self._handoff: socket.socket | None = None
        self._reader = HandoffReader()
        self._tasks: list[asyncio.Task[None]] = []
        self._last: str | None = None

    async def start(self, listener: socket.socket, threads: int) -> None:
        control, control_child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        handoff, handoff_child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        fds = (listener.fileno(), control_child.fileno(), handoff_child.fileno())
        config = process_config(self.settings, fds, threads)
        try:
            self.proc = await asyncio.create_subprocess_exec(self.binary, "--config", json.dumps(config),
                                                             pass_fds=fds)
        finally:
            for s in (listener, control_child, handoff_child):
                s.close()  # the data plane's now
        reader, self._writer = await asyncio.open_unix_connection(sock=control)
        self._tasks.append(asyncio.ensure_future(self._read_replies(reader)))
        handoff.setblocking(False)
        self._handoff = handoff
        asyncio.get_running_loop().add_reader(handoff.fileno(), self._on_handoff)
        logger.info("compiled data plane started", extra={"fields": {"pid": self.proc.pid, "binary": self.binary}})

    def _on_handoff(self) -> None:
        assert self._handoff is not None
        try:
            data, fds, _flags, _addr = socket.recv_fds(self._handoff, 1 << 20, 16)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data, fds = b"", []
        if not data and not fds:
            asyncio.get_running_loop().remove_reader(self._handoff.fileno())  # the data plane is gone
            return
        for fd, payload in self._reader.feed(data, fds):
            try:
                sock = socket.socket(fileno=fd)
            except OSError:
                os.close(fd)
                continue
            self.adopt(sock, payload)

    async def _read_replies(self, reader: asyncio.StreamReader) -> None:
        while line := await reader.readline():
            try:
                reply = json.loads(line)
            except ValueError:
                continue
            fut = self._replies.pop(reply.get("id"), None)
            if fut is not None and not fut.done():
                fut.set_result(reply.get("metrics", ""))

    def _send(self, message: dict[str, Any]) -> None:
        if self._writer is not None and not self._writer.is_closing():
            self._writer.write(json.dumps(message, separators=(",", ":")).encode() + b"\n")

    def push(self, snapshot: dict[str, Any]) -> None:
        """Send a snapshot (when it differs from the last one sent)."""
        text = json.dumps(snapshot, separators=(",", ":"), sort_keys=True)
        if text != self._last:
            self._last = text
            self._send({"op": "snapshot", "snapshot": snapshot})

    async def metrics(self, timeout: float = 5.0) -> str:
        """The data plane's Prometheus text ("" if it does not answer)."""
        self._next_id += 1
        fut: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._replies[self._next_id] = fut
        self._send({"op": "metrics", "id": self._next_id})
        await in_task()  # asyncio.timeout below
        try:
            async with asyncio.timeout(timeout):
                return await fut
        except TimeoutError:
            self._replies.pop(self._next_id, None)
            return ""

    def drain(self) -> None:
        """No new connections; idle ones close; busy ones finish (within the drain timeout)."""
        self._send({"op": "drain"})

    async def wait(self) -> int:
        assert self.proc is not None
        return await self.proc.wait()

    async def stop(self, timeout: float) -> None:
        """Wait up to ``timeout`` for the process to end (after drain), then kill it; close our sockets."""
        if self.proc is not None and self.proc.returncode is None:
            try:
                async with asyncio.timeout(timeout):
                    await self.proc.wait()
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        for t in self._tasks:
            t.cancel()
        if self._handoff is not None:
            asyncio.get_running_loop().remove_reader(self._handoff.fileno())
            self._handoff.close()
            self._handoff = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None
