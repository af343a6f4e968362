"""The draft's prefill as auto's stage model sees it: new prompts are a per-round cost of speculating, sequences
re-sent after the draft lost them are not (they are paid once, when speculation resumes). Real draft service."""

import asyncio

import grpc
from transformers import AutoTokenizer

from minedraft.engine.sampling import Sampling
from minedraft.protos import draft_pb2_grpc
from services.router import messages
from services.router.backends import Backend
from services.router.drafting import Drafter
from services.router.lanes import Lane
from services.router.leases import CallMetadata
from services.router.recorder import Recorder
from services.router.request import Request
from services.router.stage_model import StageModel
from services.router.text_stream import TextStream


async def prefill_twice(cluster, tokenizer) -> tuple[float, float, list[Request]]:
    token = [CallMetadata([("authorization", f"Bearer {cluster.internal_token}")])]
    async with grpc.aio.insecure_channel(cluster.draft_address, interceptors=token) as channel:
        stages = StageModel()
        drafter = Drafter(Backend("draft", channel, draft_pb2_grpc.DraftStub), stages, Recorder(), 30.0, 512)
        requests = [Request(seq_id=f"drafting-{i}", prompt_ids=tokenizer.encode(p, add_special_tokens=False),
                            sampling=Sampling(), max_tokens=8, text=TextStream(tokenizer, []), eos_ids=frozenset())
                    for i, p in enumerate(["def add(a, b):", "Hello there, how are you today?"])]
        await drafter.prefill(requests, Lane(0), threads=0, catching_up=True)
        after_new = stages.draft_prefill_ms
        await drafter.prefill(requests, Lane(0), threads=0, catching_up=True)  # the draft lost them: re-sent
        after_resend = stages.draft_prefill_ms
        await drafter.draft.stub.Release(messages.release(r.seq_id for r in requests))
        return after_new, after_resend, requests


def test_only_new_prompts_count_as_the_drafts_prefill_cost(tiny_clusters, tiny_pair) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_pair[0])
    after_new, after_resend, requests = asyncio.run(prefill_twice(tiny_clusters["psd"], tokenizer))
    assert after_new > 0, "new prompts are charged"
    assert after_resend == after_new, "a re-send is not"
    assert all(r.draft_sent and r.draft_len == len(r.tokens) for r in requests)
