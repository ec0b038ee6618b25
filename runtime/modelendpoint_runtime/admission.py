"""Admission control and drain state.

vLLM queues every request it is given; under overload that queue grows
without bound and every client times out. Instead, the runtime counts the
generation requests it holds (running in the engine plus waiting in its
queue) and refuses the next one beyond ``MAX_CONCURRENT_REQUESTS`` at once
with 503 and ``Retry-After``, so a load balancer can try another replica.

Single event loop, so plain integers are enough: no awaits happen between a
check and its update.
"""

from __future__ import annotations

import asyncio


class Admission:
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_flight = 0
        self.draining = False
        self._idle = asyncio.Event()
        self._idle.set()

    def try_acquire(self) -> bool:
        """Take a slot; False when full or draining (the caller answers 503)."""
        if self.draining or self.in_flight >= self.limit:
            return False
        self.in_flight += 1
        self._idle.clear()
        return True

    def release(self) -> None:
        self.in_flight -= 1
        if self.in_flight <= 0:
            self.in_flight = 0
            self._idle.set()

    def start_drain(self) -> None:
        self.draining = True

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until nothing is in flight; False if the timeout passed first."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
            return True
        except TimeoutError:
            return self.in_flight == 0
