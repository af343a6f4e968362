"""Runs model work off the event loop, one call at a time, on the device's single worker thread."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")


class DeviceWorker:
    """First come, first served: one thread owns the model and its sequence state."""

    def __init__(self, name: str) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self.busy_s = 0.0  # total time spent running calls, for busy-fraction metrics

    async def run(self, fn: Callable[..., T], *args) -> tuple[T, float, float]:
        """Returns (result, queue_ms, run_ms)."""
        submitted = time.perf_counter()
        started: list[float] = []

        def timed() -> T:
            started.append(time.perf_counter())
            return fn(*args)

        try:
            result = await asyncio.get_running_loop().run_in_executor(self._executor, timed)
        finally:
            if started:
                self.busy_s += time.perf_counter() - started[0]
        done = time.perf_counter()
        return result, (started[0] - submitted) * 1e3, (done - started[0]) * 1e3

    def shutdown(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)
