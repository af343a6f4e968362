"""Runs model work off the event loop, one call at a time, on the device's single worker thread."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import torch

T = TypeVar("T")


class DeviceWorker:
    """First come, first served: one thread owns the model and its sequence state."""

    def __init__(self, name: str, threads: int = 0) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self.threads = threads  # CPU threads a call uses unless it asks for others (0: torch's default)
        self.threads_now = 0

    def _use_threads(self, threads: int) -> None:
        # Set on the worker thread itself: OpenMP keeps the thread count per calling thread.
        threads = min(threads, len(os.sched_getaffinity(0)))  # a caller cannot oversubscribe the cores
        if threads and threads != self.threads_now:
            torch.set_num_threads(threads)
            self.threads_now = threads

    async def run(self, fn: Callable[..., T], *args, threads: int = 0) -> tuple[T, float, float, int]:
        """Returns (result, queue_ms, run_ms, threads it ran with). `threads`: CPU threads for this call (0: the
        worker's own)."""
        submitted = time.perf_counter()
        started: list[float] = []
        ran_with: list[int] = []

        def timed() -> T:
            started.append(time.perf_counter())
            self._use_threads(threads or self.threads)
            ran_with.append(self.threads_now)  # read here: the next queued call may change it before we resume
            return fn(*args)

        result = await asyncio.get_running_loop().run_in_executor(self._executor, timed)
        done = time.perf_counter()
        return result, (started[0] - submitted) * 1e3, (done - started[0]) * 1e3, ran_with[0]

    def shutdown(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)
