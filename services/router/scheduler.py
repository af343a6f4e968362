"""Lanes of requests, each run round after round: draft, then verify.

Modes: `ar` (one lane, target only), `sd` (one lane: propose, then verify) and `psd` (two lanes whose
loops run concurrently). Each service runs one call at a time, first come first served, so while the
target verifies lane A the draft proposes for lane B: the overlap comes from the two loops alone.
A lane is only ever drafted from its own verified state, so no work is thrown away.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from dataclasses import dataclass, field

import grpc

from minedraft.errors import Unavailable
from minedraft.protos import common_pb2, draft_pb2, draft_pb2_grpc, monitor_pb2, target_pb2, target_pb2_grpc
from services.router.request import Request

log = logging.getLogger(__name__)

MODES = ("ar", "sd", "psd")


@dataclass
class Lane:
    index: int
    active: list[Request] = field(default_factory=list)
    counters: monitor_pb2.LaneCounters = field(default_factory=monitor_pb2.LaneCounters)

    def __post_init__(self) -> None:
        self.counters.lane = self.index


class Scheduler:
    def __init__(self, target: target_pb2_grpc.TargetStub, draft: draft_pb2_grpc.DraftStub | None,
                 mode: str = "psd", k: int = 4, max_batch: int = 16) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}")
        if mode != "ar" and draft is None:
            raise ValueError(f"mode {mode} needs a draft service")
        self.target, self.draft = target, draft
        self.mode, self.k, self.max_batch = mode, k, max_batch
        self.lanes = [Lane(i) for i in range(2 if mode == "psd" else 1)]
        self.waiting: deque[Request] = deque()
        self.events: deque[monitor_pb2.DeviceEvent] = deque(maxlen=100_000)  # for the benchmark's timeline
        self._wake = asyncio.Condition()
        self._tasks: list[asyncio.Task] = []

    @property
    def in_flight(self) -> int:
        return len(self.waiting) + sum(len(lane.active) for lane in self.lanes)

    async def submit(self, request: Request) -> None:
        """Queues a request; it joins the smaller lane at that lane's next round boundary."""
        self.waiting.append(request)
        async with self._wake:
            self._wake.notify_all()

    def record(self, device: str, kind: str, lane: Lane, stats: common_pb2.StepStats, tokens: int) -> None:
        self.events.append(monitor_pb2.DeviceEvent(
            device=device, kind=kind, lane=lane.index, start=stats.started_at,
            end=stats.started_at + stats.forward_ms / 1e3, batch_size=stats.batch_size, tokens=tokens))

    def snapshot(self, clear: bool = False) -> monitor_pb2.RouterStats:
        stats = monitor_pb2.RouterStats(mode=self.mode, k=self.k, lanes=[lane.counters for lane in self.lanes],
                                        events=list(self.events))
        if clear:
            self.events.clear()
            for lane in self.lanes:
                lane.counters = monitor_pb2.LaneCounters(lane=lane.index)
        return stats

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._run_lane(lane), name=f"lane-{lane.index}") for lane in self.lanes]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _run_lane(self, lane: Lane) -> None:
        while True:
            await self._retire(lane)
            joining = self._take_waiting(lane)
            if joining:
                await self._prefill(lane, joining)
            if not lane.active:
                async with self._wake:
                    await self._wake.wait_for(lambda: bool(self.waiting))
                continue
            await self._round(lane)

    def _take_waiting(self, lane: Lane) -> list[Request]:
        """Moves waiting requests into this lane while it is (one of) the smallest and not full."""
        joining: list[Request] = []
        while self.waiting and len(lane.active) + len(joining) < self.max_batch:
            others = min((len(o.active) for o in self.lanes if o is not lane), default=self.max_batch)
            if len(lane.active) + len(joining) > others:
                break
            request = self.waiting.popleft()
            if not request.cancelled:
                joining.append(request)
        return joining

    async def _retire(self, lane: Lane) -> None:
        """Removes finished and cancelled requests and frees their state on both services."""
        done = [r for r in lane.active if r.done]
        if not done:
            return
        lane.active = [r for r in lane.active if not r.done]
        ids = [r.seq_id for r in done]
        calls = [self.target.Release(common_pb2.ReleaseRequest(seq_ids=ids))]
        drafted_ids = [r.seq_id for r in done if r.draft_len]
        if self.draft is not None and drafted_ids:
            calls.append(self.draft.Release(common_pb2.ReleaseRequest(seq_ids=drafted_ids)))
        for result in await asyncio.gather(*calls, return_exceptions=True):
            if isinstance(result, Exception):
                log.warning("release failed: %s", result)

    async def _prefill(self, lane: Lane, joining: list[Request]) -> None:
        """Prompts run on the target (first token) and the draft (cache) at the same time."""
        target_call = self.target.Prefill(target_pb2.TargetPrefillRequest(seqs=[
            target_pb2.TargetPrefillSeq(seq_id=r.seq_id, tokens=r.prompt_ids, sampling=_sampling_proto(r))
            for r in joining]))
        calls = [target_call]
        if self.mode != "ar":
            calls.append(self.draft.Prefill(draft_pb2.DraftPrefillRequest(seqs=[
                draft_pb2.DraftPrefillSeq(seq_id=r.seq_id, tokens=r.prompt_ids, sampling=_sampling_proto(r))
                for r in joining])))
        results = await asyncio.gather(*calls, return_exceptions=True)
        if isinstance(results[0], Exception):
            for request in joining:
                request.fail(_as_unavailable(results[0], "target prefill"))
            lane.active.extend(joining)  # retired (and released) at the next boundary
            return
        self.record("target", "prefill", lane, results[0].stats, sum(len(r.prompt_ids) for r in joining))
        draft_ok = self.mode != "ar" and not isinstance(results[1], Exception)
        if draft_ok:
            self.record("draft", "prefill", lane, results[1].stats, sum(len(r.prompt_ids) for r in joining))
        for request, first in zip(joining, results[0].tokens, strict=True):
            request.draft_len = len(request.prompt_ids) if draft_ok else 0
            request.add_tokens([first.token_id])
        lane.active.extend(joining)

    async def _round(self, lane: Lane) -> None:
        loop = asyncio.get_running_loop()
        started = loop.time()
        requests = list(lane.active)
        drafts = await self._propose(lane, requests) if self.mode != "ar" else {}
        try:
            response = await self.target.Verify(target_pb2.VerifyRequest(seqs=[
                target_pb2.VerifySeq(seq_id=r.seq_id, drafts=drafts.get(r.seq_id, [])) for r in requests]))
        except grpc.aio.AioRpcError as error:
            for request in requests:
                request.fail(_as_unavailable(error, "target verify"))
            return
        counters = lane.counters
        counters.verify_ms += response.stats.forward_ms
        counters.verify_calls += 1
        counters.sequences_in_rounds += len(requests)
        self.record("target", "verify", lane, response.stats,
                    sum(len(drafts.get(r.seq_id, [])) + 1 for r in requests))
        for request, verdict in zip(requests, response.verdicts, strict=True):
            proposed = [d.token_id for d in drafts.get(request.seq_id, [])]
            committed = len(request.tokens)
            if proposed:
                request.draft_len = committed + verdict.accepted
            request.drafted += len(proposed)
            request.accepted += verdict.accepted
            request.rounds += 1
            if not request.done:
                request.add_tokens([*proposed[:verdict.accepted], verdict.next_token])
        counters.rounds += 1
        counters.round_ms += (loop.time() - started) * 1e3

    async def _propose(self, lane: Lane, requests: list[Request]) -> dict[str, list[common_pb2.DraftToken]]:
        """Drafts up to k tokens per request; a request that can take only one more token gets none."""
        seqs = []
        for r in requests:
            k = min(self.k, r.remaining - 1)
            if k > 0 and r.draft_len and not r.done:
                tokens = r.tokens
                seqs.append(draft_pb2.ProposeSeq(seq_id=r.seq_id, k=k, commit=draft_pb2.Commit(
                    keep=r.draft_len, append=tokens[r.draft_len:])))
        if not seqs:
            return {}
        try:
            response = await self.draft.Propose(draft_pb2.ProposeRequest(seqs=seqs))
        except grpc.aio.AioRpcError as error:  # the draft only accelerates: verify without drafts
            log.warning("draft propose failed, this round runs target-only: %s", error.details())
            return {}
        lane.counters.draft_ms += response.stats.forward_ms
        lane.counters.propose_calls += 1
        self.record("draft", "propose", lane, response.stats, sum(s.k for s in seqs))
        return {p.seq_id: list(p.tokens) for p in response.proposals}


def _sampling_proto(request: Request) -> common_pb2.SamplingParams:
    s = request.sampling
    return common_pb2.SamplingParams(temperature=s.temperature, top_p=s.top_p, top_k=s.top_k, seed=s.seed)


def _as_unavailable(error: BaseException, what: str) -> Unavailable:
    details = error.details() if isinstance(error, grpc.aio.AioRpcError) else str(error)
    return Unavailable(f"{what} failed: {details}")
