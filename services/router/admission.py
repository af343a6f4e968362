"""Admission control: a request rate limit (asyncio-throttle) and a hard bound on sequences in the router.

Past either limit a request is refused at once with RESOURCE_EXHAUSTED: never an unbounded queue,
never an out-of-memory crash.
"""

from __future__ import annotations

import asyncio

from asyncio_throttle import Throttler

from minedraft import metrics
from minedraft.errors import ResourceExhausted


class Admission:
    def __init__(self, max_sequences: int, rate_per_s: float | None = None) -> None:
        self.max_sequences = max_sequences
        self._throttler = Throttler(rate_limit=max(1, round(rate_per_s)), period=1.0) if rate_per_s else None

    async def admit(self, in_flight: int, sequences: int = 1) -> None:
        """Returns if the request (of `sequences` samples) may enter; raises ResourceExhausted otherwise."""
        if in_flight + sequences > self.max_sequences:
            metrics.REFUSED.labels("capacity").inc()
            raise ResourceExhausted(f"the server holds {in_flight} sequences, its limit; retry later")
        if self._throttler is not None:
            try:
                await asyncio.wait_for(self._throttler.acquire(), timeout=0.001)  # refused, never queued
            except TimeoutError:
                metrics.REFUSED.labels("rate").inc()
                raise ResourceExhausted("request rate limit reached; retry later") from None
