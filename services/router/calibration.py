"""auto's start-up calibration: stage times measured on this machine before the first request."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from minedraft.cache_files import older_than, prune_older_than, source_digest, write_atomically
from minedraft.protos import common_pb2
from services.router import messages

if TYPE_CHECKING:
    from services.router.scheduler import Scheduler

log = logging.getLogger(__name__)
# A short stage time is the faster of two calls: one call alone can be far off on a busy host (a verify of 4
# drafts took 217 ms where 8 took 152), and auto's first plans rest on these numbers alone. The second call comes
# in a second pass, after every batch's first: a host is often busy for a while just after the services start, so
# back-to-back calls were both slow. On 2 AVX2 cores, twice in a row, a first start (both models quantised as they
# loaded) calibrated batch 1's verifies of 4 and 8 drafts 1.5-1.9x slower than later starts did, while its
# batch-16 calls, measured last, matched them; a demo planned on that calibration dropped to target-only after
# one round and streamed 7 tokens/s, and 10.9 on a calibration measured afresh. A batch whose first pass took
# longer than this is measured once: a long call's jitter is a small part of it, and a second pass would cost
# seconds (2 AVX2 cores: a full lane's verify of 8 drafts takes 9 s; calibrating twice took 3.6 minutes).
SECOND_PASS_BELOW_MS = 15_000.0  # over a first pass that may itself be slowed 1.5-1.9x
# A host can stay busy through both passes, and then only some calls are slowed: on the Zen 4 EPYC one start
# calibrated batch 4's target-only verify (4 rows) at 148 ms, above batch 1's verify of 4 drafts (5 rows) at 106,
# where the session's other starts measured 70-98 for the first; auto, planning with it and cached, kept speculating
# at C = 4 (0.75-0.82x ar). A call may cost at most CONSISTENT_WITHIN times one of the same stage with more rows on
# the same cores (within one undisturbed calibration at most 1.13x), or at most NOISE_MS more (tiny models' calls
# of a few ms jitter by more than the ratio); else its batch is measured again, up to EXTRA_PASSES times, each
# after a pause (a busy spell slows back-to-back calls alike), and a calibration still inconsistent is used but
# not kept (a kept one it was to replace is removed).
CONSISTENT_WITHIN = 1.25
NOISE_MS = 10.0
EXTRA_PASSES = 2
EXTRA_PASS_PAUSE_S = 2.0
FORMAT = 3  # of a cached calibration: raise it when what is measured, or how, changes
# A kept calibration older than this is measured again: a host's speed drifts (a VM moved, a neighbour came),
# and each commit's code makes a new key, so older files would otherwise stay forever.
MAX_AGE_DAYS = 7.0
KEPT_FILES = "[0-9a-f]" * 32 + ".json"  # what `_key` names: nothing else in a user's folder is removed


Observation = tuple[str, int, int, float, bool]  # ("propose" | "verify", batch, k, ms, shared cores),
# or ("prefill", batch, tokens, ms, False): the draft caching prompts prices re-sending it tokens (probe.py)


@dataclass
class CalibrationCache:
    """Where calibrations are kept, one file per key; `refresh`: measure anyway and replace the file."""

    folder: str
    refresh: bool = False
    engines: list[str] = field(default_factory=list)  # the services' `engine_key`s, from their Renew answers
    max_age_days: float = MAX_AGE_DAYS

    @property
    def max_age_s(self) -> float:
        return self.max_age_days * 86400.0


async def calibrate(scheduler: Scheduler, cache: CalibrationCache | None = None, batches: tuple[int, ...] | None = None,
                    prompt_len: int = 16) -> None:
    """Measures a draft step, and a verify of 0, k and k_max drafts, at batch 1, 4 and a full lane, so auto's
    plans rest on this machine's stage times (rounds keep them current). The full lane matters: verify cost
    grows faster with the batch at large k than small batches suggest. On shared cores each is measured with
    every core and with half; a batch whose calls are short is measured again after every batch's first pass, and
    each of its stage times is the faster of the two (of more, where a call cost more than one with more rows:
    `_slowed`). With a `cache`, a calibration of the same engines (`engine_key`) and settings is read back instead
    of measured again (2 AVX2 cores: 1.8 minutes of start-up)."""
    batches = batches or tuple(sorted({1, min(4, scheduler.max_batch), scheduler.max_batch}))
    lengths = sorted({0, scheduler.k, scheduler.k_max})
    known = cache is not None and len(cache.engines) == 2 and all(cache.engines)  # an unnamed engine: no key
    path = Path(cache.folder) / f"{_key(scheduler, cache.engines, batches, lengths, prompt_len)}.json" \
        if known else None
    fresh = path is not None and not cache.refresh and not older_than(path, cache.max_age_s)
    observations = _read(path) if fresh else None
    cached = observations is not None
    if not cached:
        passes = [await _calibrate_batch(scheduler, batch, prompt_len, lengths) for batch in batches]
        short = [sum(ms for *_, ms, _ in measured) < SECOND_PASS_BELOW_MS for measured in passes]
        again = [i for i in range(len(batches)) if short[i]]
        for extra in range(1 + EXTRA_PASSES):
            if extra and again:
                await asyncio.sleep(EXTRA_PASS_PAUSE_S)
            for i in again:
                passes[i] = _faster(passes[i], await _calibrate_batch(scheduler, batches[i], prompt_len, lengths))
            slowed = _slowed(passes)
            again = sorted({i for i, *_ in slowed if short[i]})
        observations = [observation for measured in passes for observation in measured]
        if slowed:
            log.warning("calibration inconsistent (a busy host?), used but not kept: %s",
                        "; ".join(f"{call} {ms:.0f} ms against {other} {other_ms:.0f}" for _, call, ms, other, other_ms
                                  in slowed))
            if path:
                path.unlink(missing_ok=True)
        elif path and write_atomically(path, lambda temporary: temporary.write_text(json.dumps(observations))):
            prune_older_than(path.parent, KEPT_FILES, cache.max_age_s)
    stages = scheduler.stages
    for stage, batch, k, ms, shared in observations:
        if stage == "prefill":
            stages.observe_draft_sent(k, ms)
        else:
            (stages.observe_propose if stage == "propose" else stages.observe_verify)(batch, k, ms, shared, paced=False)
    lo, hi = batches[0], batches[-1]
    log.info("calibrated%s: draft step %.1f ms (batch %d) / %.1f ms (batch %d); verify of %s drafts %s ms "
             "(batch %d) / %s ms (batch %d)", f" (read from {path})" if cached else "",
             scheduler.stages.draft_step(lo), lo, scheduler.stages.draft_step(hi),
             hi, lengths, [round(scheduler.stages.verify(lo, k)) for k in lengths], lo,
             [round(scheduler.stages.verify(hi, k)) for k in lengths], hi)


def _key(scheduler: Scheduler, engines: list[str], batches: tuple[int, ...], lengths: list[int],
         prompt_len: int) -> str:
    """A digest of both services' engines and everything the measurements above depend on."""
    settings = [engines, batches, lengths, prompt_len, scheduler.k_max, scheduler.share_cores, FORMAT,
                source_digest(Path(__file__))]
    return hashlib.sha256(json.dumps(settings).encode()).hexdigest()[:32]


def _faster(first: list[Observation], second: list[Observation]) -> list[Observation]:
    """Two passes' observations of one batch (made in the same order), each at the faster of its two times."""
    return [(*a[:3], min(a[3], b[3]), a[4]) for a, b in zip(first, second, strict=True)]


def _slowed(passes: list[list[Observation]]) -> list[tuple[int, str, float, str, float]]:
    """Each draft step or verify that cost over CONSISTENT_WITHIN times, and over NOISE_MS more than, a call of the
    same stage with more rows (sequences for a draft step, sequences × (drafts + 1) for a verify) on the same cores:
    (its batch's index in `passes`, the call, its ms, the other call, its ms). Undisturbed, cost grows with rows."""
    calls = [(i, f"{stage} {batch}x{k}{' shared' if shared else ''}", stage, shared,
              batch * (k + 1) if stage == "verify" else batch, ms)
             for i, measured in enumerate(passes) for stage, batch, k, ms, shared in measured if stage != "prefill"]
    return [(i, name, ms, other, other_ms) for i, name, stage, shared, rows, ms in calls
            for _, other, other_stage, other_shared, other_rows, other_ms in calls
            if (other_stage, other_shared) == (stage, shared) and other_rows > rows
            and ms > CONSISTENT_WITHIN * other_ms and ms - other_ms > NOISE_MS]


def _read(path: Path) -> list[Observation] | None:
    """The kept observations, or None where there are none that make sense (absent, unreadable, misshapen)."""
    try:
        kept = [(str(stage), int(batch), int(k), float(ms), bool(shared))
                for stage, batch, k, ms, shared in json.loads(path.read_text())]
    except (OSError, ValueError, TypeError):
        return None
    return kept if kept and all(stage in ("propose", "verify", "prefill") for stage, *_ in kept) else None


async def _calibrate_batch(scheduler: Scheduler, batch: int, prompt_len: int,
                           lengths: list[int]) -> list[Observation]:
    """One draft step and verifies of each length at this batch, with all cores and (on shared cores) half;
    one prefill serves both."""
    sampling = common_pb2.SamplingParams()
    ids = [f"calibrate-{batch}-{i}" for i in range(batch)]
    prompt = list(range(prompt_len))
    prompts = [(seq_id, prompt, sampling) for seq_id in ids]
    threads = scheduler.threads_for(False)
    cached = await scheduler.draft.stub.Prefill(messages.draft_prefill(prompts, threads))
    firsts = await scheduler.target.stub.Prefill(messages.target_prefill(prompts, threads))
    observations: list[Observation] = [("prefill", batch, batch * prompt_len, cached.stats.forward_ms, False)]
    for shared in sorted({False, bool(scheduler.share_cores)}):
        threads = scheduler.threads_for(shared)
        propose = messages.propose([(f.seq_id, prompt_len, [f.token_id], scheduler.k_max) for f in firsts.tokens],
                                   threads)
        proposed = await scheduler.draft.stub.Propose(propose)
        observations.append(("propose", batch, scheduler.k_max, proposed.stats.forward_ms, shared))
        for k in lengths:  # each verify extends the sequences a little; only its duration matters here
            verify = messages.verify([(p.seq_id, p.tokens[:k]) for p in proposed.proposals], threads)
            verified = await scheduler.target.stub.Verify(verify)
            observations.append(("verify", batch, k, verified.stats.forward_ms, shared))
    await asyncio.gather(scheduler.draft.stub.Release(messages.release(ids)),
                         scheduler.target.stub.Release(messages.release(ids)))
    return observations
