"""Draft faults, sharply: only a draft that does not answer is down; anything else costs one sequence its
speculation, and a hung draft never stalls the lanes (real processes, SIGSTOP)."""

from __future__ import annotations

import asyncio
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import grpc

from minedraft.app.client import collect, make_request, stream
from minedraft.app.launcher import Cluster
from minedraft.engine.sampling import Sampling
from minedraft.protos import common_pb2, draft_pb2
from services.router.drafting import PREFILL_S_PER_TOKEN, Drafter
from services.router.faults import draft_refused
from services.router.lanes import Lane
from services.router.recorder import Recorder
from services.router.request import Request
from services.router.stage_model import StageModel
from tests.conftest import channel_to, cluster_args
from tests.test_end_to_end import PROMPTS
from tests.test_faults import reference, wait_until


def a_request() -> Request:
    return Request(seq_id="r", prompt_ids=[1, 2], sampling=Sampling(), max_tokens=8, text=None, eos_ids=frozenset())


def test_a_refused_sequence_goes_on_target_only_and_a_lost_one_is_sent_again() -> None:
    refused, lost = a_request(), a_request()
    lost.draft_epoch = refused.draft_epoch = 0
    draft_refused(refused, common_pb2.SeqError(code=grpc.StatusCode.INVALID_ARGUMENT.value[0], message="no"))
    draft_refused(lost, common_pb2.SeqError(code=grpc.StatusCode.NOT_FOUND.value[0], message="expired"))
    assert not refused.speculate and refused.draft_epoch == 0  # not retried every round
    assert lost.speculate and lost.draft_epoch == -1  # re-sent (replacing) at the next propose


def test_a_hung_draft_stalls_nothing_and_speculation_resumes(tiny_pair, tiny_clusters) -> None:
    """SIGSTOP, not kill: the draft's socket stays open and calls simply never return. Rounds go on
    target-only after one draft timeout; retiring requests does not wait on releases to the hung draft."""
    expected = reference(tiny_clusters, 200)
    with Cluster(cluster_args("psd", *tiny_pair, max_batch=4, draft_timeout=1)) as cluster:
        cluster.wait_ready(timeout_s=120)
        draft = cluster.procs["draft"]

        def one(prompt: str) -> list[int]:
            with channel_to(cluster) as channel:
                return collect(stream(channel, make_request(prompt=prompt, max_tokens=200), timeout=120)).token_ids

        draft.send_signal(signal.SIGSTOP)
        try:
            started = time.monotonic()
            with ThreadPoolExecutor(len(PROMPTS)) as pool:
                results = list(pool.map(one, PROMPTS))
            hung_s = time.monotonic() - started
            assert results == [expected[p] for p in PROMPTS]
            with channel_to(cluster) as channel:  # more streams, each a lane boundary of its own
                for prompt in PROMPTS[:3]:
                    begun = time.monotonic()
                    assert collect(stream(channel, make_request(prompt=prompt, max_tokens=8))).token_ids == \
                        expected[prompt][:8]
                    assert time.monotonic() - begun < 5, "a lane boundary waited on the hung draft"
        finally:
            draft.send_signal(signal.SIGCONT)
        print(f"{len(PROMPTS)} streams of 200 tokens with the draft stopped: {hung_s:.1f}s")

        def speculating_again() -> bool:
            with channel_to(cluster) as channel:
                result = collect(stream(channel, make_request(prompt=PROMPTS[1], max_tokens=64)))
            assert result.token_ids == expected[PROMPTS[1]][:64]
            return int(result.stats["drafted_tokens"]) > 0

        wait_until(speculating_again, 30, "speculation to resume once the draft answers again")


def test_a_draft_prefill_deadline_grows_with_its_tokens() -> None:
    """A long draft prefill on a slow CPU outlasted a flat deadline, and so did the re-sync after it, over and
    over (psd at C = 8 on 2 AVX2 cores): each call's deadline is the draft timeout plus PREFILL_S_PER_TOKEN per
    token sent, chunk by chunk. The stub stands for the draft's gRPC stub and records each call's deadline."""
    calls: list[tuple[int, float]] = []

    class RecordingStub:
        async def Prefill(self, request: draft_pb2.DraftPrefillRequest,
                          timeout: float) -> draft_pb2.DraftPrefillResponse:
            calls.append((sum(len(seq.tokens) for seq in request.seqs), timeout))
            return draft_pb2.DraftPrefillResponse()

    draft = SimpleNamespace(stub=RecordingStub(), epoch=3, up=True)
    drafter = Drafter(draft, StageModel(), Recorder(), timeout_s=10.0, prefill_tokens=512)
    requests = [Request(seq_id=f"r{i}", prompt_ids=list(range(200)), sampling=Sampling(), max_tokens=8, text=None,
                        eos_ids=frozenset()) for i in range(3)]
    asyncio.run(drafter.prefill(requests, Lane(0), threads=2))
    assert [tokens for tokens, _ in calls] == [400, 200]  # chunks of at most 512 prompt tokens
    assert [timeout for _, timeout in calls] == [10.0 + PREFILL_S_PER_TOKEN * 400, 10.0 + PREFILL_S_PER_TOKEN * 200]
    assert all(r.draft_len == 200 and r.draft_epoch == 3 for r in requests)
