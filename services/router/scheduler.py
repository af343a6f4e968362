"""Lanes of requests, each run round after round: draft, then verify.

Modes: `ar` (one lane, target only), `sd` (one lane: propose, then verify) and `psd` (two lanes whose
loops run concurrently). Each service runs one call at a time, first come first served, so while the
target verifies lane A the draft proposes for lane B: the overlap comes from the two loops alone.
A lane is only ever drafted from its own verified state, so no work is thrown away.

The draft only accelerates: when it fails, rounds go on target-only, and speculation resumes (after
re-sending each sequence's tokens) once the draft is serving again. Output never changes.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque

import grpc

from minedraft import metrics
from minedraft.errors import Unavailable
from minedraft.protos import common_pb2, monitor_pb2, target_pb2
from minedraft.serving.telemetry import batch_span
from services.router import messages
from services.router.auto_plan import AutoPlanner
from services.router.backends import Backend
from services.router.calibration import CalibrationCache, calibrate
from services.router.drafting import PREFILL_S_PER_TOKEN, Drafter, draft_backlog
from services.router.faults import target_call_failed, target_refused
from services.router.lanes import Lane, hand_over, overlapped, take_waiting
from services.router.modes import MODES
from services.router.policy import Plan
from services.router.recorder import Recorder
from services.router.releases import Releaser
from services.router.request import Request
from services.router.stage_model import StageModel

log = logging.getLogger(__name__)


class Scheduler:
    def __init__(self, target: Backend, draft: Backend | None, mode: str = "auto", k: int = 4,
                 max_batch: int = 16, draft_timeout_s: float = 10.0, k_max: int | None = None,
                 draft_prefill_tokens: int = 512, share_cores: int = 0, target_timeout_s: float = 30.0,
                 max_lane_tokens: int = 0, tetris_extra: int = 0, draft_stop_below: float = 0.0) -> None:
        """`share_cores`: draft and target share this many CPU cores of one host; each call then asks for all
        of them when it runs alone and half when the other service runs beside it (0: no hints).
        `target_timeout_s`: the deadline of a Verify (a Prefill's grows with its tokens); past it the target
        counts as down and its requests fail, rather than hang. `max_lane_tokens`: most prompt + completion
        tokens the sequences of one lane may come to hold (0: only max_batch and the services' caches bound it).
        `tetris_extra`: draft k + this many per sequence and keep the lane's best k × size (tetris.py; 0: off);
        `draft_stop_below`: a sequence's drafting stops after a token the draft gave less probability."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}")
        if mode != "ar" and draft is None:
            raise ValueError(f"mode {mode} needs a draft service")
        self.target, self.draft = target, draft
        self.mode, self.k, self.max_batch = mode, k, max_batch
        self.target_timeout_s, self.share_cores = target_timeout_s, share_cores
        self.max_lane_tokens, self.tetris_extra = max_lane_tokens, tetris_extra
        self._prefill_allowance_s = 0.0  # of the target prefills in flight (see _target_prefill)
        self.releaser = Releaser(target, draft)
        self.lanes = [Lane(i) for i in range(2 if mode in ("psd", "auto") else 1)]
        self.stages = StageModel(lane_capacity=max_batch)
        self.k_max = k_max or 2 * k
        self.plan = Plan(lanes=len(self.lanes), k=k, tokens_per_s=0.0)
        self.planner = AutoPlanner(self.stages, k, self.k_max)
        self.waiting: deque[Request] = deque()
        self.recorder = Recorder()
        self.drafter = Drafter(draft, self.stages, self.recorder, draft_timeout_s, draft_prefill_tokens,
                               draft_stop_below) if draft is not None else None
        self._work = asyncio.Event()
        self._tasks: list[asyncio.Task] = []

    @property
    def in_flight(self) -> int:
        return len(self.waiting) + sum(lane.size for lane in self.lanes)

    def live(self) -> list[Request]:
        """Requests whose sequences the services hold for us (the leases to renew)."""
        return [r for lane in self.lanes for r in lane.live()]

    @property
    def target_up(self) -> bool:
        return self.target.up

    @property
    def speculating(self) -> bool:
        return self.mode != "ar" and self.draft is not None and self.draft.up

    def submit(self, request: Request) -> None:
        """Queues a request; it joins the smaller lane at that lane's next round boundary."""
        self.waiting.append(request)
        self._work.set()

    def withdraw(self, request: Request) -> None:
        """Takes a request out of this cell, wherever it is (it goes on in another cell)."""
        for lane in self.lanes:
            lane.discard(request)
        if request in self.waiting:
            self.waiting.remove(request)

    def poke(self) -> None:
        self._work.set()

    def threads_for(self, shared: bool) -> int:
        """CPU threads for a call (0: the service's own setting, when the cores are not shared)."""
        if not self.share_cores:
            return 0
        return max(1, self.share_cores // 2) if shared else self.share_cores

    def snapshot(self, clear: bool = False) -> monitor_pb2.RouterStats:
        return self.recorder.snapshot(self.mode, self.round_k, self.lanes, clear)

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._run_lane(lane), name=f"lane-{lane.index}") for lane in self.lanes]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    @property
    def round_k(self) -> int:
        return self.plan.k if self.mode == "auto" else self.k

    async def calibrate(self, cache: CalibrationCache | None = None) -> None:
        """auto: stage times measured before serving (or read from `cache`: calibration.py), then the first plan."""
        if self.mode == "auto" and self.draft is not None:
            await calibrate(self, cache)
            self._replan()
            log.info("calibrated; plan %s", self.plan)

    def _replan(self) -> None:
        """auto: choose one lane or two, and k, for the sequences now in flight."""
        if self.mode != "auto":
            return
        self.stages.asked = [r.max_tokens for r in (*self.waiting, *self.live())]  # what completions may make
        plan = self.planner.next(self.plan, self.in_flight, self.speculating,
                                 lambda: draft_backlog(self.live(), self.draft.epoch))
        if (plan.lanes, plan.k) != (self.plan.lanes, self.plan.k):
            log.info("plan for %d sequences: %d lane(s), k=%d, %.2f tokens/s predicted (alpha %.2f, %d rounds measured "
                     "since a probe; draft prefill %.1f ms a sequence round at k=%d; pace %.2fx)", self.in_flight,
                     plan.lanes, plan.k, plan.tokens_per_s, self.stages.alpha, self.stages.rounds,
                     self.stages.draft_prefill_per_round(self.planner.resume_k), self.planner.resume_k,
                     self.stages.pace.factor)
        self.plan = plan

    def _lane_open(self, lane: Lane) -> bool:
        return lane.index < self.plan.lanes

    async def _run_lane(self, lane: Lane) -> None:
        while True:
            try:
                await self._retire(lane)
                self._replan()
                lane.active.extend(lane.incoming)
                lane.incoming.clear()
                if hand_over(self.lanes, self.plan.lanes, lane):
                    self._work.set()
                joining = take_waiting(self.lanes, self.plan.lanes, lane, self.waiting, self.max_batch,
                                       self.max_lane_tokens) if self._lane_open(lane) else []
                metrics.WAITING.set(len(self.waiting))
                metrics.LANE_SEQUENCES.labels(str(lane.index)).set(len(lane.active) + len(joining))
                if joining:
                    lane.active.extend(joining)  # before the call: a lane error fails them too, leases cover them
                    await self._prefill(lane, joining)
                if not lane.active:
                    if not (self.waiting and self._lane_open(lane)) and not lane.incoming:
                        self._work.clear()
                        await self._work.wait()
                    continue
                await self._round(lane)
            except asyncio.CancelledError:
                raise
            except Exception as error:  # a bug must not stop the lane: fail its requests, keep serving
                log.exception("lane %d round failed", lane.index)
                for request in lane.active:
                    if not request.done:
                        request.fail(Unavailable(f"internal router error: {error}"))

    async def _retire(self, lane: Lane) -> None:
        """Removes finished and cancelled requests and frees their state on both services (one that is down is
        not waited for: releases.py)."""
        done = [r for r in lane.active if r.done]
        if not done:
            return
        lane.active = [r for r in lane.active if not r.done]
        for request in (r for r in done if r.finish_reason in ("stop", "eos", "length")):  # not failed or cancelled
            self.stages.completed(len(request.generated), request.max_tokens, natural=request.finish_reason != "length",
                                  drafted=bool(request.drafted))
        await self.releaser.release(done)

    async def _prefill(self, lane: Lane, joining: list[Request]) -> None:
        """Prompts run on the target (first token) and the draft (cache) at the same time."""
        with batch_span("prefill", [r.span for r in joining], **{
                "minedraft.lane": lane.index, "minedraft.batch_size": len(joining)}):
            await self._prefill_batch(lane, joining)

    async def _prefill_batch(self, lane: Lane, joining: list[Request]) -> None:
        tokens = sum(len(r.tokens) for r in joining)  # a request moved from another cell brings its output
        # On separate devices the draft caches the prompts while the target runs them. On cores the two share,
        # the target runs them alone, with every core (prefill is compute-bound: half the cores, twice the wait
        # for the first token), and the draft catches up at the lane's next propose (stale, below).
        at_once = self.speculating and self.round_k and not self.share_cores
        with_draft = [r for r in joining if r.speculate] if at_once else []
        threads = self.threads_for(shared=bool(with_draft) or overlapped(self.lanes, self.plan.lanes, lane))
        prompts = [(r.seq_id, r.tokens, r.sampling_proto()) for r in joining]
        allowance = tokens * PREFILL_S_PER_TOKEN
        shared_prompts = messages.shared_prompts(joining)
        calls = [self._target_prefill(messages.target_prefill(prompts, threads, shared_prompts), allowance)]
        if with_draft:
            calls.append(self.drafter.prefill(with_draft, lane, threads))
        lane.prefilling = True
        try:
            results = await asyncio.gather(*calls, return_exceptions=True)
        finally:
            lane.prefilling = False
        if isinstance(results[0], Exception):
            target_call_failed(self.target, joining, results[0], "prefill")
            return
        self.recorder.device_call("target", "prefill", lane, results[0].stats, tokens)
        for request, first in zip(joining, results[0].tokens, strict=True):
            if first.HasField("error"):
                target_refused(request, first.error)
            else:
                request.add_tokens([first.token_id], [first.logprob] if first.HasField("logprob") else [])

    async def _target_prefill(self, request, allowance_s: float):
        """A target Prefill; while it runs, the other lane's Verify may queue behind it, so Verify deadlines
        grow by its allowance (else a long prompt would time out the other lane and mark the target down)."""
        self._prefill_allowance_s += allowance_s
        try:
            return await self.target.stub.Prefill(request, timeout=self.target_timeout_s + allowance_s)
        finally:
            self._prefill_allowance_s -= allowance_s

    async def _round(self, lane: Lane) -> None:
        requests = [r for r in lane.active if not r.done]  # one that failed at prefill never reaches a Verify
        if not requests:
            return
        with batch_span("round", [r.span for r in requests], **{
                "minedraft.lane": lane.index, "minedraft.k": self.round_k if self.speculating else 0,
                "minedraft.batch_size": len(requests)}) as span:
            drafted, accepted = await self._round_batch(lane, requests)
            span.set_attribute("minedraft.drafted", drafted)
            span.set_attribute("minedraft.accepted", accepted)

    async def _round_batch(self, lane: Lane, requests: list[Request]) -> tuple[int, int]:
        """One draft + verify round for these requests; returns (tokens drafted, tokens accepted)."""
        loop = asyncio.get_running_loop()
        started, k, lanes, draft_ms_before = loop.time(), self.round_k, self.plan.lanes, lane.draft_ms
        shared = bool(self.share_cores) and overlapped(self.lanes, self.plan.lanes, lane)
        drafts = await self.drafter.propose(lane, requests, self.round_k, shared, self.threads_for(shared),
                                            self.tetris_extra) if self.speculating else {}
        response = await self._verify(lane, requests, drafts, shared)
        if response is None:
            return 0, 0
        accepted_total, measured = 0, [0, 0]  # drafted and accepted where acceptance is measured (settled)
        for request, verdict in zip(requests, response.verdicts, strict=True):
            if verdict.HasField("error"):
                target_refused(request, verdict.error)
                continue
            proposed = [d.token_id for d in drafts.get(request.seq_id, [])]
            if proposed:
                request.draft_len = len(request.tokens) + verdict.accepted
                measures = self.stages.measures(len(request.generated), request.max_tokens)
                cap = None if self.tetris_extra else min(k, request.remaining - 1)  # TETRIS cuts are not early stops
                self.stages.observe_round(len(proposed), verdict.accepted, cap, measures)
                measured = [measured[0] + len(proposed) * measures, measured[1] + verdict.accepted * measures]
            self.recorder.verdict(lane, request, len(proposed), verdict.accepted)
            accepted_total += verdict.accepted
            if not request.done:
                request.add_tokens([*proposed[:verdict.accepted], verdict.next_token], verdict.logprobs)
        drafted_total = sum(len(d) for d in drafts.values())
        self.stages.observe_acceptance(*measured)
        if self.mode == "auto":  # priced under the plan the round started on
            beside = any(other is not lane and other.active for other in self.lanes) and lanes == 2
            self.planner.price(lanes, k, len(requests), sum(1 for d in drafts.values() if d),
                               lane.draft_ms - draft_ms_before, response.stats.forward_ms, beside)
        elapsed = loop.time() - started
        lane.round_served(len(requests), elapsed)
        self.recorder.round_done(lane, elapsed)
        return drafted_total, accepted_total

    async def _verify(self, lane: Lane, requests: list[Request], drafts: dict[str, list[common_pb2.DraftToken]],
                      shared: bool) -> target_pb2.VerifyResponse | None:
        try:
            response = await self.target.stub.Verify(messages.verify(
                [(r.seq_id, drafts.get(r.seq_id, [])) for r in requests], self.threads_for(shared)),
                timeout=self.target_timeout_s + self._prefill_allowance_s)
        except grpc.aio.AioRpcError as error:
            target_call_failed(self.target, requests, error, "verify")
            return None
        longest = max(map(len, drafts.values()), default=0)
        self.stages.observe_verify(len(requests), longest, response.stats.forward_ms, shared)
        self.recorder.verify(lane, len(requests), response.stats,
                             sum(len(drafts.get(r.seq_id, [])) + 1 for r in requests))
        return response
