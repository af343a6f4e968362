"""The router's calls to the draft: caching sequences there and asking it for proposals.

The draft only accelerates. Whatever goes wrong here costs speed, never output: a draft that does not answer
in time is marked down (rounds go on target-only until it is back), and a sequence it refuses goes on without
drafts (faults.py)."""

from __future__ import annotations

from collections.abc import Iterable

import grpc

from minedraft.protos import common_pb2
from services.router import messages, tetris
from services.router.backends import Backend
from services.router.faults import draft_call_failed, draft_refused
from services.router.recorder import Lane, Recorder
from services.router.request import Request
from services.router.stage_model import StageModel


def token_chunks(requests: list[Request], max_tokens: int) -> list[list[Request]]:
    """Consecutive groups of requests holding at most max_tokens tokens each (a longer one goes alone)."""
    chunks: list[list[Request]] = []
    size = 0
    for request in requests:
        if not chunks or size + len(request.tokens) > max_tokens:
            chunks.append([])
            size = 0
        chunks[-1].append(request)
        size += len(request.tokens)
    return chunks


# A sequence may stop drafting after a token its draft gave less than this probability (such a token is often
# rejected, and so would the next be). Off by default: on the default pair at k = 4 the gain was within this
# VM's run-to-run noise (README, "The CPU engine").
DRAFT_STOP_BELOW = 0.0
# A prefill's deadline (draft or target) grows by this per token sent, past the stage's own timeout. Slow CPUs
# need it: on 2 AVX2 cores with a core per stage (psd) the 1.5B target prefills ~0.07 s a token, and a draft
# chunk of 512 tokens outlasted a flat 10 s, and so did the re-sync after it, over and over.
PREFILL_S_PER_TOKEN = 0.1
# A propose whose sequences bring more new tokens than this first caches tokens the draft missed (a spell of
# target-only rounds): not a draft step's cost. A few (a round whose drafts TETRIS cut) ride along at about a step's.
CATCH_UP_TOKENS = 8


def drafts_for(request: Request) -> bool:
    """Whether a round drafts for this request (one that can take only one more token gets none)."""
    return request.speculate and not request.done and request.remaining > 1


def draft_backlog(requests: Iterable[Request], epoch: int) -> int:
    """Tokens the draft would be sent before these requests could speculate again (as Drafter.propose would:
    all of a request's tokens where the draft does not hold them, else those past what it holds)."""
    return sum(len(r.tokens) - (r.draft_len if r.draft_epoch == epoch else 0) for r in requests if drafts_for(r))


class Drafter:
    def __init__(self, draft: Backend, stages: StageModel, recorder: Recorder, timeout_s: float,
                 prefill_tokens: int, stop_below: float = 0.0) -> None:
        self.draft, self.stages, self.recorder = draft, stages, recorder
        self.timeout_s, self.prefill_tokens, self.stop_below = timeout_s, prefill_tokens, stop_below

    async def prefill(self, requests: list[Request], lane: Lane, threads: int, catching_up: bool = False) -> None:
        """Sends the draft every token of these requests.

        In chunks of at most `prefill_tokens` prompt tokens (one request at least), so no call's duration grows
        with the batch: one call for 16 long prompts once outlasted the draft timeout, and the re-sync after it
        (every sequence at once) outlasted it again, over and over."""
        for chunk in token_chunks(requests, self.prefill_tokens):
            epoch, lengths = self.draft.epoch, [len(r.tokens) for r in chunk]
            fresh = [r for r in chunk if not r.draft_sent]
            new_tokens = sum(len(r.prompt_ids) for r in fresh)  # what they made before is a re-send, paid once
            for request in chunk:
                request.draft_sent = True
            try:
                response = await self.draft.stub.Prefill(messages.draft_prefill(
                    [(r.seq_id, r.tokens, r.sampling_proto()) for r in chunk], threads, replace=catching_up,
                    same_prompt_as=messages.shared_prompts(chunk)),
                    timeout=self.timeout_s + PREFILL_S_PER_TOKEN * sum(lengths))
            except grpc.aio.AioRpcError as error:
                draft_call_failed(self.draft, chunk, error, "prefill")
                return
            self.recorder.device_call("draft", "prefill", lane, response.stats, sum(lengths))
            self.stages.observe_draft_sent(sum(lengths), response.stats.forward_ms)
            if fresh:  # beside the target's prefill (not catching up) a prompt costs no round any time
                # Only new prompts count as a cost of speculating: re-sending sequences the draft lost (down, or a
                # spell of target-only decoding) is paid once, when speculation resumes.
                share = response.stats.forward_ms * new_tokens / sum(lengths) if catching_up else 0.0
                self.stages.observe_draft_prefill(share, len(fresh))
                lane.draft_ms += share  # this round's cost
            refused = {e.seq_id: e for e in response.errors}
            for request, length in zip(chunk, lengths, strict=True):
                if request.seq_id in refused:
                    draft_refused(request, refused[request.seq_id])
                else:
                    request.draft_len, request.draft_epoch = length, epoch

    async def propose(self, lane: Lane, requests: list[Request], k: int, shared: bool, threads: int,
                      extra: int = 0) -> dict[str, list[common_pb2.DraftToken]]:
        """Drafts up to k tokens per request; a request that can take only one more token gets none.

        `extra` > 0 (TETRIS): drafts k + extra each, and keeps the lane's k × size best positions (tetris.py)."""
        wanted = [r for r in requests if drafts_for(r)] if k > 0 else []
        stale = [r for r in wanted if r.draft_epoch != self.draft.epoch]
        if stale:  # new to the draft, or the draft restarted or lost them since: send their tokens first
            await self.prefill(stale, lane, threads, catching_up=True)
        ready = [r for r in wanted if r.speculate and r.draft_epoch == self.draft.epoch]
        if not ready or not self.draft.up:
            return {}
        seqs = [(r.seq_id, r.draft_len, r.tokens[r.draft_len:], min(k + extra, r.remaining - 1)) for r in ready]
        try:
            # TETRIS ranks all k + extra positions itself: no early stop there
            request = messages.propose(seqs, threads, with_logprobs=extra > 0, stop_below=0.0 if extra else
                                       self.stop_below)
            response = await self.draft.stub.Propose(request, timeout=self.timeout_s)
        except grpc.aio.AioRpcError as error:  # verify without drafts: same output, just slower
            draft_call_failed(self.draft, ready, error, "propose")
            return {}
        steps = max((len(p.tokens) for p in response.proposals), default=0)  # fewer than k on an early stop
        if max(len(new) for _, _, new, _ in seqs) <= CATCH_UP_TOKENS:  # else it cached many it missed, too
            self.stages.observe_propose(len(seqs), steps, response.stats.forward_ms, shared)
        self.recorder.propose(lane, response.stats, sum(len(p.tokens) for p in response.proposals))
        drafts = {}
        for request, proposal in zip(ready, response.proposals, strict=True):
            if proposal.HasField("error"):
                draft_refused(request, proposal.error)
            else:
                drafts[request.seq_id] = list(proposal.tokens)
        if not extra:
            return drafts
        greedy = {r.seq_id: r.sampling.greedy for r in ready}
        scores = {seq_id: tetris.position_scores(tokens, greedy[seq_id]) for seq_id, tokens in drafts.items()}
        return tetris.select(drafts, scores, k * len(ready))
