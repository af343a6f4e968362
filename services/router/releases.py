"""Freeing finished sequences on the services, without ever waiting on one that is down."""

from __future__ import annotations

import asyncio
import logging

import grpc

from minedraft.serving.telemetry import batch_span
from services.router import messages
from services.router.backends import Backend
from services.router.request import Request

log = logging.getLogger(__name__)
MAX_HELD_IDS = 4096  # per service; past that, the services' leases free the rest


class Releaser:
    def __init__(self, target: Backend, draft: Backend | None) -> None:
        self.target, self.draft = target, draft
        self._unreleased: dict[Backend, list[str]] = {}  # ids to release once their service is back

    async def release(self, done: list[Request]) -> None:
        """Releases these requests' sequences on the target and (if it holds them) the draft. A service that is
        down gets them when it is back: one that only timed out is alive, and its cache slots count."""
        releases = {self.target: [r.seq_id for r in done]}
        if self.draft is not None:
            releases[self.draft] = [r.seq_id for r in done if r.draft_sent]
        for backend, ids in list(releases.items()):
            ids = self._unreleased.pop(backend, []) + ids
            if not backend.up:
                self._unreleased[backend] = ids[-MAX_HELD_IDS:]
            releases[backend] = ids if backend.up else []
        releases = {backend: ids for backend, ids in releases.items() if ids}
        with batch_span("release", [r.span for r in done], **{"minedraft.batch_size": len(done)}):
            results = await asyncio.gather(*(backend.stub.Release(messages.release(ids), timeout=10)
                                             for backend, ids in releases.items()), return_exceptions=True)
        for backend, result in zip(releases, results, strict=True):
            if not isinstance(result, grpc.aio.AioRpcError):
                continue
            if result.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                log.info("release still queued behind a forward at its deadline; the service finishes it")
            else:
                log.warning("release on %s failed (its lease frees them): %s", backend.name, result.code().name)
            if result.code() == grpc.StatusCode.UNAVAILABLE:
                backend.mark_down("release: UNAVAILABLE")
