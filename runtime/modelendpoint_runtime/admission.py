"""Admission control and drain state.

vLLM queues every request it is given; under overload that queue grows
without bound and every client times out. Instead, the runtime counts the
work it holds (running in the engine plus waiting in its queue) and refuses
more beyond ``MAX_CONCURRENT_REQUESTS`` at once with 503 and ``Retry-After``,
so a load balancer can try another replica.

Work is counted in sequences, not HTTP requests: a request weighs
prompts x max(n, best_of) (``limits.sequences``), so one request with a batch
of prompts and ``n: 16`` cannot slip sixteen hundred sequences past a limit
meant for hundreds. A request heavier than the whole limit is admitted only
when nothing else is in flight (it runs alone rather than never).

Single event loop, so plain integers are enough: no awaits happen between a
check and its update.
"""

from __future__ import annotations

import asyncio


class Admission:
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_flight = 0  # admitted weight (sequences)
        self.requests = 0  # admitted requests
        self.draining = False
        self._idle = asyncio.Event()
        self._idle.set()

    def try_acquire(self, weight: int = 1) -> bool:
        """Take ``weight`` slots; False when they do not fit or when draining (the caller answers 503)."""
        if self.draining:
            return False
        weight = min(max(weight, 1), self.limit)  # heavier than the limit: only alone
        if self.in_flight + weight > self.limit:
            return False
        self.in_flight += weight
        self.requests += 1
        self._idle.clear()
        return True

    def release(self, weight: int = 1) -> None:
        self.in_flight -= min(max(weight, 1), self.limit)
        self.requests -= 1
        if self.in_flight <= 0 or self.requests <= 0:
            self.in_flight = 0
            self.requests = 0
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
