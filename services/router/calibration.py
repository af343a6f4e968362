"""auto's start-up calibration: stage times measured on this machine before the first request."""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from minedraft.protos import common_pb2
from services.router import messages

if TYPE_CHECKING:
    from services.router.scheduler import Scheduler

log = logging.getLogger(__name__)
# A short stage time is the faster of two calls: one call alone can be far off on a busy host (a verify of 4
# drafts took 217 ms where 8 took 152), and auto's first plans rest on these numbers alone. A long call's
# jitter is a small part of it, and a second one would cost seconds each (2 AVX2 cores: a full lane's verify
# of 8 drafts takes 9 s, and calibrating twice took 3.6 minutes of start-up).
SECOND_SAMPLE_BELOW_MS = 1000.0


async def _timed(call, request) -> tuple[object, float]:
    """The response and its forward time: the faster of two calls when the first was short."""
    first = await call(request)
    if first.stats.forward_ms >= SECOND_SAMPLE_BELOW_MS:
        return first, first.stats.forward_ms
    second = await call(request)
    return second, min(first.stats.forward_ms, second.stats.forward_ms)


async def calibrate(scheduler: Scheduler, batches: tuple[int, ...] | None = None, prompt_len: int = 16) -> None:
    """Measures a draft step, and a verify of 0, k and k_max drafts, at batch 1, 4 and a full lane, so auto's
    plans rest on this machine's stage times (rounds keep them current). The full lane matters: verify cost
    grows faster with the batch at large k than small batches suggest. On shared cores each is measured with
    every core and with half."""
    batches = batches or tuple(sorted({1, min(4, scheduler.max_batch), scheduler.max_batch}))
    lengths = sorted({0, scheduler.k, scheduler.k_max})
    for batch in batches:
        for shared in sorted({False, bool(scheduler.share_cores)}):
            await _calibrate_batch(scheduler, batch, prompt_len, lengths, shared)
    lo, hi = batches[0], batches[-1]
    log.info("calibrated: draft step %.1f ms (batch %d) / %.1f ms (batch %d); verify of %s drafts %s ms "
             "(batch %d) / %s ms (batch %d)", scheduler.stages.draft_step(lo), lo, scheduler.stages.draft_step(hi),
             hi, lengths, [round(scheduler.stages.verify(lo, k)) for k in lengths], lo,
             [round(scheduler.stages.verify(hi, k)) for k in lengths], hi)


async def _calibrate_batch(scheduler: Scheduler, batch: int, prompt_len: int, lengths: list[int],
                           shared: bool) -> None:
    """One draft step and verifies of each length at this batch, with all cores or (shared) half."""
    threads, sampling = scheduler.threads_for(shared), common_pb2.SamplingParams()
    ids = [f"calibrate-{batch}-{i}" for i in range(batch)]
    prompt = list(range(prompt_len))
    prompts = [(seq_id, prompt, sampling) for seq_id in ids]
    await scheduler.draft.stub.Prefill(messages.draft_prefill(prompts, threads))
    firsts = await scheduler.target.stub.Prefill(messages.target_prefill(prompts, threads))
    propose = messages.propose([(f.seq_id, prompt_len, [f.token_id], scheduler.k_max) for f in firsts.tokens],
                               threads)
    proposed, ms = await _timed(scheduler.draft.stub.Propose, propose)  # the same commit each time
    scheduler.stages.observe_propose(batch, scheduler.k_max, ms, shared)
    for k in lengths:  # each verify extends the sequences a little; only its duration matters here
        verify = messages.verify([(p.seq_id, p.tokens[:k]) for p in proposed.proposals], threads)
        scheduler.stages.observe_verify(batch, k, (await _timed(scheduler.target.stub.Verify, verify))[1], shared)
    await asyncio.gather(scheduler.draft.stub.Release(messages.release(ids)),
                         scheduler.target.stub.Release(messages.release(ids)))
